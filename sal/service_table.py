"""The service table: longest-prefix match on serviceIDs, then priority, then weight.

As in the reference: an entry (one prefix) holds targets; the targets of the highest
priority present are candidates, and one is chosen at random in proportion to weight.
"""
import random
from dataclasses import dataclass, field
from enum import Enum

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

    def resolve(self, service_id: bytes) -> Target | None:
        """Pick the target for a new flow: top priority, weighted random."""
        entry = self.match(service_id)
        if entry is None:
            return None
        top = max(t.priority for t in entry.targets)
        candidates = [t for t in entry.targets if t.priority == top]
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            pick = self._rng.uniform(0, sum(t.weight for t in candidates))
            for chosen in candidates:
                pick -= chosen.weight
                if pick < 0:
                    break
        chosen.hits += 1
        return chosen

    def entries(self):
        for bits in sorted(self._by_bits, reverse=True):
            yield from self._by_bits[bits].values()
