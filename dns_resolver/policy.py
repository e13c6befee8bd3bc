"""Who may ask, and how fast: the access list and the per-client token buckets.

No I/O; ``now`` is an argument (monotonic seconds).
"""
from __future__ import annotations

import ipaddress


class Acl:
    """Networks allowed to query (everything else is answered REFUSED)."""

    def __init__(self, networks):
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._memo: dict[str, bool] = {}

    def allows(self, address: str) -> bool:
        verdict = self._memo.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
                if ip.version == 6 and ip.ipv4_mapped:
                    ip = ip.ipv4_mapped
                verdict = any(ip in net for net in self.networks)
            except ValueError:
                verdict = False
            if len(self._memo) > 65536:
                self._memo.clear()
            self._memo[address] = verdict
        return verdict


class RateLimiter:
    """A token bucket per client address: ``rate`` queries per second on average,
    bursts of up to ``burst``. ``rate`` 0 turns limiting off. At most ``clients``
    buckets are kept; when full, buckets that have refilled (idle clients) go first,
    then the oldest.

    Over its rate a client is told to ask again over TCP (a TC reply). A stub resolver
    does so at once; a flood, or the victim of a forged source address, does not. So
    each bucket also counts the TC replies its client has not followed over TCP yet
    (:meth:`followed` clears it): past ``burst`` of them, :meth:`may_truncate` says no
    and the client's excess is dropped, at the cost of a dropped query, not a reply."""

    def __init__(self, rate: float, burst: float, clients: int = 10000):
        self.rate, self.burst, self.clients = float(rate), float(max(burst, 1)), clients
        self.buckets: dict[str, list] = {}     # address -> [tokens, last time, TC replies not followed]
        self.limited = 0

    def allow(self, address: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self.buckets.get(address)
        if bucket is None:
            if len(self.buckets) >= self.clients:
                self._prune(now)
            self.buckets[address] = [self.burst - 1, now, 0]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens >= self.burst:             # quiet long enough to refill: a fresh start
            tokens, bucket[2] = self.burst, 0
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return True
        bucket[0] = tokens
        self.limited += 1
        return False

    def may_truncate(self, address: str) -> bool:
        """Whether a TC reply may go to this (limited) client; counts it if so."""
        bucket = self.buckets.get(address)
        if bucket is None or bucket[2] >= self.burst:
            return False
        bucket[2] += 1
        return True

    def followed(self, address: str) -> None:
        """The client asked over TCP: it acts on TC replies."""
        bucket = self.buckets.get(address)
        if bucket is not None:
            bucket[2] = 0

    def _prune(self, now: float) -> None:
        full = [a for a, (tokens, last) in self.buckets.items()
                if tokens + (now - last) * self.rate >= self.burst]
        for address in full:
            del self.buckets[address]
        while len(self.buckets) >= self.clients:       # all busy: drop the oldest
            del self.buckets[next(iter(self.buckets))]
