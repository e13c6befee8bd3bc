"""The service table: longest-prefix match on serviceIDs, then priority, then weight.

As in the reference: an entry (one prefix) holds targets; the targets of the highest
priority present are candidates, and one is chosen at random in proportion to weight.

A service may ask for client affinity (``set_affinity``, by serviceID prefix, longest
match): then ``resolve(service_id, key=client, now=now)`` picks among the candidates by
rendezvous hashing on the client, behind a sticky table (sal/affinity.py). Priority
comes first, so failover and draining (a target removed) still win over affinity.
"""
import random
from dataclasses import dataclass, field
from enum import Enum

from .affinity import Affinity, Sticky, rendezvous
from .serviceid import ServicePrefix


class Action(Enum):
    FORWARD = "forward"   # send the SYN on to an IPv4 next hop
    DEMUX = "demux"       # hand to a local listener (a gateway: a legacy backend)
    DELAY = "delay"       # hold: ask a controller (the gateway drops; the legacy SYN retries)
    DROP = "drop"


@dataclass(slots=True)
class Target:
    action: Action
    target: object = None        # FORWARD: address text; DEMUX: a backend object
    priority: int = 1
    weight: int = 1
    hits: int = 0


@dataclass(slots=True)
class Entry:
    prefix: ServicePrefix
    targets: list = field(default_factory=list)


class ServiceTable:
    def __init__(self, rng: random.Random | None = None):
        self._by_bits: dict[int, dict[int, Entry]] = {}
        self._rng = rng or random.Random()
        self._affinity: dict[int, dict[int, tuple[ServicePrefix, Affinity]]] = {}   # bits -> value -> policy
        self.sticky = Sticky()

    def set_affinity(self, prefix: ServicePrefix, affinity: Affinity | None) -> None:
        """Client affinity for the serviceIDs under ``prefix`` (None: none, the default).
        The policy outlives the prefix's targets: it holds for instances yet to come."""
        level = self._affinity.setdefault(prefix.bits, {})
        if affinity is None:
            level.pop(prefix.value, None)
            if not level:
                del self._affinity[prefix.bits]
        else:
            level[prefix.value] = (prefix, affinity)

    def affinity(self, service_id: bytes) -> tuple[ServicePrefix, Affinity] | None:
        """The longest-prefix affinity policy covering ``service_id``, with its prefix."""
        value = int.from_bytes(service_id, "big")
        for bits in sorted(self._affinity, reverse=True):
            found = self._affinity[bits].get(value >> (256 - bits) << (256 - bits) if bits else 0)
            if found is not None:
                return found
        return None

    def add(self, prefix: ServicePrefix, action: Action, target=None,
            priority: int = 1, weight: int = 1) -> Target:
        if weight < 1:
            raise ValueError("weight must be at least 1")
        level = self._by_bits.setdefault(prefix.bits, {})
        entry = level.setdefault(prefix.value, Entry(prefix))
        t = Target(action, target, priority, weight)
        entry.targets.append(t)
        return t

    def remove(self, prefix: ServicePrefix, target=None) -> int:
        """Remove the targets of ``prefix`` (those equal to ``target`` when given)."""
        level = self._by_bits.get(prefix.bits, {})
        entry = level.get(prefix.value)
        if entry is None:
            return 0
        before = len(entry.targets)
        entry.targets = [t for t in entry.targets if target is not None and t.target != target]
        if not entry.targets:
            del level[prefix.value]
        return before - len(entry.targets)

    def match(self, service_id: bytes) -> Entry | None:
        """The longest-prefix entry for ``service_id``."""
        value = int.from_bytes(service_id, "big")
        for bits in sorted(self._by_bits, reverse=True):
            masked = value >> (256 - bits) << (256 - bits) if bits else 0
            entry = self._by_bits[bits].get(masked)
            if entry is not None and entry.targets:
                return entry
        return None

    def resolve(self, service_id: bytes, key: bytes | None = None, now: float | None = None) -> Target | None:
        """Pick the target for a new flow: top priority, then weighted random — or, when
        the service asks for client affinity and ``key`` (the client) is given, the
        client's target: sticky for the policy's timeout after its last flow (when
        ``now`` is given), else by rendezvous hashing."""
        entry = self.match(service_id)
        if entry is None:
            return None
        top = max(t.priority for t in entry.targets)
        candidates = [t for t in entry.targets if t.priority == top]
        policy = self.affinity(service_id) if key is not None and self._affinity else None
        if policy is not None:        # even alone: it sticks when a replica joins
            chosen = self._for_client(policy, key, candidates, now)
        elif len(candidates) == 1:
            chosen = candidates[0]
        else:
            pick = self._rng.uniform(0, sum(t.weight for t in candidates))
            for chosen in candidates:
                pick -= chosen.weight
                if pick < 0:
                    break
        chosen.hits += 1
        return chosen

    def _for_client(self, policy: tuple, key: bytes, candidates: list, now: float | None) -> Target:
        prefix, affinity = policy
        if now is None:
            return rendezvous(key, candidates)
        chosen = self.sticky.get(prefix, key, candidates, now) or rendezvous(key, candidates)
        self.sticky.put(prefix, key, chosen, now + affinity.timeout, now)
        return chosen

    def entries(self):
        for bits in sorted(self._by_bits, reverse=True):
            yield from self._by_bits[bits].values()
