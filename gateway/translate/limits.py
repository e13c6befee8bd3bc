"""Caps on what one gateway holds, so that no flood exhausts it.

Each cap is counted when hit (``limit_*`` stats). Half-open handshakes are the target of
a SYN flood, so a full half-open table evicts its oldest entry rather than refusing the
newcomer: a legitimate handshake completes in a round trip, while spoofed ones wait for
nothing, so under a flood of R SYNs/s a handshake keeps its place for cap/R seconds.
"""
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Limits:
    max_flows: int = 262_144            # flows in the table, all states
    max_flows_per_source: int = 4_096   # per legacy source (a server gateway's config: 65,536 per SAL peer)
    max_half_open: int = 4_096          # handshakes not yet complete; the oldest is evicted
    max_held_packets: int = 65_536      # packets held during moves, all flows together


class LimitsMixin:
    def _init_limits(self, limits: Limits | None) -> None:
        self.limits = limits or Limits()
        self._half_open: OrderedDict[int, None] = OrderedDict()
        self._per_source: dict[bytes, int] = {}
        self._held_total = 0

    def _admit(self, source: bytes) -> bool:
        """May a new flow from ``source`` open? Evicts the oldest handshake when the
        half-open table (or the whole table) is full."""
        lim = self.limits
        if self._per_source.get(source, 0) >= lim.max_flows_per_source and not self._evict_from(source):
            self.stats["limit_flows_per_source"] += 1
            return False
        while len(self._half_open) >= lim.max_half_open or len(self.flows) >= lim.max_flows:
            if not self._half_open:
                self.stats["limit_flows"] += 1
                return False
            fid, _ = self._half_open.popitem(last=False)
            flow = self.flows.get(fid)
            if flow is not None:
                self.stats["limit_half_open_evicted"] += 1
                self._evicted(flow)
                self._forget(flow)
        return True

    def _evict_from(self, source: bytes) -> bool:
        """Make room under ``source``'s cap by evicting its oldest handshake (a server
        gateway sees a whole client gateway as one source: a flood through it must not
        lock out its legitimate clients). False when all its flows are established."""
        for fid in self._half_open:
            flow = self.flows.get(fid)
            if flow is not None and flow.source_key == source:
                self.stats["limit_half_open_evicted"] += 1
                self._evicted(flow)
                self._forget(flow)
                return True
        return False

    def _evicted(self, flow) -> None:
        """A handshake pushed out of a full table (a side may tell its legacy host)."""

    def _opened(self, flow, source: bytes) -> None:
        flow.source_key = source
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self._half_open[flow.sal.local_flow] = None

    def _handshake_done(self, flow) -> None:
        self._half_open.pop(flow.sal.local_flow, None)

    def _closed_out(self, flow) -> None:
        """Forget the flow's place in every cap (from ``_forget``)."""
        self._half_open.pop(flow.sal.local_flow, None)
        self._source_done(flow)

    def _source_done(self, flow) -> None:
        """The flow no longer counts against its source: it closed (lingering closed
        flows must not lock a busy client out) or it is gone."""
        key = flow.source_key
        if key is not None:
            left = self._per_source.get(key, 0) - 1
            if left > 0:
                self._per_source[key] = left
            else:
                self._per_source.pop(key, None)
            flow.source_key = None


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; time is passed in."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, None

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
