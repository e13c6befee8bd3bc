"""The answer cache for forwarded names: TTLs and negative TTLs honoured, time passed in.

Keys are ``(lowercased labels, qtype, qclass, DO bit)``. An upstream response is kept as a
:class:`~dns_resolver.wire.Template` for

* a positive answer: the smallest TTL of its records;
* a negative answer (NXDOMAIN, or NOERROR with no answer): ``min(SOA TTL, SOA MINIMUM)``
  of the SOA in its authority section (RFC 2308); without an SOA it is not kept;

each bounded by ``min_ttl``/``max_ttl`` (``max_negative_ttl`` for negative answers).
A zero TTL, a truncated answer and any other rcode are never kept. Served answers carry
their TTLs (capped at ``max_ttl``) decreased by the seconds spent here. The least recently used entry goes
when ``size`` is reached.
"""
from __future__ import annotations

from collections import OrderedDict

from . import wire


class Cache:
    def __init__(self, size: int = 10000, min_ttl: int = 0, max_ttl: int = 86400,
                 max_negative_ttl: int = 3600):
        self.size = size
        self.min_ttl, self.max_ttl, self.max_negative_ttl = min_ttl, max_ttl, max_negative_ttl
        self.entries: OrderedDict = OrderedDict()    # key -> (expires, template)
        self.hits = self.misses = self.stores = self.evictions = 0

    def __len__(self):
        return len(self.entries)

    def get(self, key, now: float) -> wire.Template | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires, template = entry
        if now >= expires:
            del self.entries[key]
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return template

    def ttl_for(self, data: bytes, parsed: wire.Scan) -> int:
        """How long a response may be kept (0: not at all)."""
        if parsed.flags & wire.TC:
            return 0
        rcode = parsed.rcode
        answers = [r for r in parsed.records if r.section == 1]
        records = [r for r in parsed.records if r.rtype != wire.T_OPT]
        if rcode == wire.NOERROR and answers:
            ttl = min(r.ttl for r in records)
            return min(max(ttl, self.min_ttl), self.max_ttl) if ttl > 0 else 0
        if rcode in (wire.NOERROR, wire.NXDOMAIN):
            soas = [r for r in parsed.records if r.section == 2 and r.rtype == wire.T_SOA]
            if not soas:
                return 0
            ttl = min(soas[0].ttl, wire.soa_minimum(data, soas[0]))
            return min(max(ttl, self.min_ttl), self.max_negative_ttl) if ttl > 0 else 0
        return 0

    def put(self, key, data: bytes, parsed: wire.Scan, now: float) -> wire.Template | None:
        """Keep the response if its TTLs allow; returns the template made from it
        (also when it is not kept), or None when it cannot be templated."""
        ttl = self.ttl_for(data, parsed)
        # records keep their own TTLs up to max_ttl; a negative answer's SOA says the
        # negative TTL (RFC 2308)
        negative = not any(r.section == 1 for r in parsed.records)
        cap = (ttl or None) if negative else self.max_ttl
        try:
            # a forwarded answer is never authoritative here (AA cleared)
            template = wire.template_from(data, parsed, ttl_cap=cap, stored=now, keep_flags=wire.AD | wire.TC)
        except wire.WireError:
            return None
        if ttl > 0 and self.size > 0:
            self.entries[key] = (now + ttl, template)
            self.entries.move_to_end(key)
            self.stores += 1
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
                self.evictions += 1
        return template
