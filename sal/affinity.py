"""Client affinity: every connection of one client to the same target while it lives.

Two layers, as load balancers do it:

* **Rendezvous (HRW) hashing**: each candidate scores ``weight / -ln(h)`` with ``h`` a
  hash of (client key, target identity) mapped into (0, 1); the highest wins. The answer
  depends only on the key and the set of candidates, never on order, process or time: a
  restarted router answers as before while the set is the same, and a joining or leaving
  target moves only the clients it wins or held (about 1/n of them), in proportion to
  weight.
* **A sticky table in front of it**, for the service's ``timeout`` after the client's
  last connection: a client keeps its target when a new replica joins (which would win
  some keys). It yields to draining and failover: an entry counts only while its target
  is still among the candidates of the top priority.
"""
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

from .serviceid import ServicePrefix

DEFAULT_TIMEOUT = 300.0           # seconds after the client's last connection (ipvsadm -p's default)
MAX_STICKY = 65536                # entries; the oldest go first (the hash still answers for them)
_SCALE = 1.0 / (1 << 64)


@dataclass(frozen=True, slots=True)
class Affinity:
    """A service's policy: "client" affinity lasting ``timeout`` seconds after the last SYN."""
    timeout: float = DEFAULT_TIMEOUT


def from_config(table: dict, fail) -> Affinity | None:
    """The policy a config table asks for: ``affinity = "none" | "client"`` and
    ``affinity_timeout`` (seconds, default 300); ``fail(message)`` raises."""
    kind = table.get("affinity", "none")
    if kind not in ("none", "client"):
        fail(f"affinity must be \"none\" or \"client\", not {kind!r}")
    timeout = table.get("affinity_timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        fail("affinity_timeout must be a number of seconds >= 0")
    if kind == "none" and "affinity_timeout" in table:
        fail("affinity_timeout without affinity = \"client\"")
    return Affinity(float(timeout)) if kind == "client" else None


def identity(target) -> bytes:
    """What a target is hashed by: its address (a registered instance, a next hop), so the
    choice survives restarts and re-registrations under the same address."""
    thing = target.target
    address = getattr(thing, "address", None)
    return address if isinstance(address, bytes) else str(thing).encode()


def rendezvous(key: bytes, candidates: list):
    """The weighted highest-random-weight choice among ``candidates`` (service-table
    targets with ``weight``) for ``key``."""
    best, best_score = None, -1.0
    for t in candidates:
        digest = hashlib.blake2b(identity(t), digest_size=8, key=key[:64]).digest()
        h = (int.from_bytes(digest, "big") + 0.5) * _SCALE          # in (0, 1)
        score = t.weight / -math.log(h)
        if score > best_score:
            best, best_score = t, score
    return best


class Sticky:
    """(policy prefix, client key) -> (target identity, expiry), least recently used first.
    By identity, not object: a target re-added (a re-registration) is still the same."""

    def __init__(self, limit: int = MAX_STICKY):
        self.limit = limit
        self.entries: OrderedDict = OrderedDict()

    def get(self, prefix: ServicePrefix, key: bytes, candidates: list, now: float):
        found = self.entries.get((prefix, key))
        if found is None:
            return None
        ident, expires = found
        if expires > now:
            for t in candidates:
                if identity(t) == ident:
                    return t
        del self.entries[(prefix, key)]          # expired, drained or failed: choose again
        return None

    def put(self, prefix: ServicePrefix, key: bytes, target, expires: float, now: float) -> None:
        entries = self.entries
        entries[(prefix, key)] = (identity(target), expires)
        entries.move_to_end((prefix, key))
        while entries:          # the front is the least recently refreshed: drop what expired
            first = next(iter(entries.values()))
            if first[1] > now and len(entries) <= self.limit:
                break
            entries.popitem(last=False)
