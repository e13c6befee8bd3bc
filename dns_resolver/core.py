"""The resolver's core: a query's bytes in, replies and upstream work out. No I/O.

:meth:`Resolver.handle` takes one DNS message as received (and who sent it, over which
transport, at what time) and returns a list of actions:

* ``Reply(to, data)``: send ``data`` to the client ``to`` (an opaque token of the
  adapter's: an address, a TCP connection);
* ``Forward(key, data)``: ask the upstream resolvers ``data`` (a query whose ID the
  adapter sets), then call :meth:`Resolver.upstream_done` with ``key`` and the response
  (or None when every upstream failed), which returns the replies for every client
  waiting on that question (identical questions in flight share one upstream query).

Order of checks for each message: the client's token bucket (UDP only; over the limit a
truncated reply, TC set, so the client asks again over TCP at once: see :meth:`_limited`),
the message itself (runts and responses are dropped, malformed
queries answered FORMERR, other opcodes NOTIMP, EDNS versions above 0 BADVERS), the
access list (REFUSED), then the service zones, then the cache, then the upstreams.
"""
from __future__ import annotations

import logging
import secrets
import struct
from dataclasses import dataclass

from . import wire

log = logging.getLogger("serval.dns")


@dataclass(slots=True)
class Reply:
    to: object
    data: bytes


@dataclass(slots=True)
class Forward:
    key: tuple
    data: bytes


@dataclass(slots=True)
class _Waiter:
    to: object
    query: wire.Query
    limit: int


class Resolver:
    def __init__(self, zones, cache, acl, limiter, forwarding: bool = True,
                 max_udp: int = 1232, upstream_udp: int = 1232, max_pending: int = 2000,
                 max_waiters: int = 64, slip: int = 1, stats: dict | None = None):
        self.zones = list(zones)
        self.cache = cache
        self.acl = acl
        self.limiter = limiter
        self.forwarding = forwarding
        self.max_udp = max_udp
        self.upstream_udp = upstream_udp
        self.max_pending, self.max_waiters = max_pending, max_waiters
        self.slip = slip               # every slip-th limited query is answered TC (0: none)
        self.limited_seen = 0
        self.pending: dict[tuple, list[_Waiter]] = {}
        self.stats = stats if stats is not None else {}       # shared with the zones' counters
        self.stats.update(dict.fromkeys(
            ("queries", "rate_limited", "dropped", "formerr", "notimp", "badvers", "refused",
             "zone_answers", "cache_answers", "forwarded", "upstream_answers", "servfail",
             "truncated", "coalesced", "rate_limited_truncated", "rate_limited_dropped", "rate_limited_flood", "tcp_queries"), 0))

    # --- queries -------------------------------------------------------------------
    def handle(self, data: bytes, client: str, tcp: bool, now: float, wall: float, to) -> list:
        """``now``: monotonic seconds (cache); ``wall``: Unix time (allocations)."""
        stats = self.stats
        stats["queries"] += 1
        if tcp:
            stats["tcp_queries"] += 1
            self.limiter.followed(client)
        elif not self.limiter.allow(client, now):
            return self._limited(data, client, to)
        try:
            query = wire.parse_query(data)
        except wire.Drop:
            stats["dropped"] += 1
            return []
        except wire.QueryError as exc:
            stats[{wire.FORMERR: "formerr", wire.NOTIMP: "notimp"}.get(exc.rcode, "badvers")] += 1
            log.debug("%s from %s: %s", wire.RCODE_NAMES[exc.rcode], client, exc)
            reply = wire.error_reply(exc.ident, exc.flags, exc.rcode, exc.query, self.max_udp)
            return [Reply(to, reply)]
        limit = query.limit(tcp, self.max_udp)
        if not self.acl.allows(client):
            stats["refused"] += 1
            reply = wire.error_reply(query.ident, query.flags, wire.REFUSED, query, self.max_udp)
            return [Reply(to, reply[:3] + bytes((reply[3] & ~wire.RA & 0xFF,)) + reply[4:])]   # no RA for them
        for zone in self.zones:
            if zone.contains(query.key):
                stats["zone_answers"] += 1
                template = zone.answer(query, wall)
                if template is None:
                    stats["servfail"] += 1
                    return [Reply(to, self._servfail(query))]
                return [Reply(to, self._fit(template.render(query, now, self.max_udp), limit, query))]
        key = (query.key, query.qtype, query.qclass, query.do)
        template = self.cache.get(key, now)
        if template is not None:
            stats["cache_answers"] += 1
            return [Reply(to, self._fit(template.render(query, now, self.max_udp), limit, query))]
        if not self.forwarding:
            stats["servfail"] += 1
            return [Reply(to, self._servfail(query))]
        waiters = self.pending.get(key)
        if waiters is not None:
            if len(waiters) >= self.max_waiters:
                stats["dropped"] += 1
                return []
            waiters.append(_Waiter(to, query, limit))
            stats["coalesced"] += 1
            return []
        if len(self.pending) >= self.max_pending:
            stats["servfail"] += 1
            return [Reply(to, self._servfail(query))]
        self.pending[key] = [_Waiter(to, query, limit)]
        stats["forwarded"] += 1
        return [Forward(key, self.upstream_query(query))]

    def upstream_query(self, query: wire.Query) -> bytes:
        """The question as we ask it upstream (lowercased, RD, CD and DO as asked, our
        EDNS payload size); the ID is set per attempt by the adapter."""
        flags = wire.RD | (query.flags & wire.CD)
        question = wire.encode_name(query.key) + struct.pack("!HH", query.qtype, query.qclass)
        return (wire.HEADER.pack(0, flags, 1, 0, 0, 1) + question
                + wire.opt_record(self.upstream_udp, query.do))

    def _limited(self, data: bytes, client: str, to) -> list:
        """A UDP query over its client's rate: answered with the question alone and TC
        set (as BIND's RRL "slip" does), which a stub resolver takes as "ask me again
        over TCP" and does at once (glibc: same server, no timeout). Over TCP, where the
        source address is proven and connections are bounded, no limit applies. With
        ``slip`` N only every N-th limited query gets that reply. Dropped, each counted
        by reason: the queries ``slip`` skips and those not worth a reply (runts,
        responses, malformed) as ``rate_limited_dropped``; those of a client that does
        not act on TC replies (a flood, a forged source) as ``rate_limited_flood``."""
        stats = self.stats
        stats["rate_limited"] += 1
        self.limited_seen += 1
        if self.slip and self.limited_seen % self.slip == 0:
            reply = wire.truncated_reply(data, self.max_udp)
            if reply is not None:
                if not self.limiter.may_truncate(client):
                    stats["rate_limited_flood"] += 1
                    return []
                stats["rate_limited_truncated"] += 1
                return [Reply(to, reply)]
        stats["rate_limited_dropped"] += 1
        return []

    # --- upstream results ----------------------------------------------------------
    def upstream_done(self, key: tuple, response: bytes | None, now: float) -> list:
        waiters = self.pending.pop(key, [])
        if not waiters:
            return []
        template = None
        if response is not None:
            try:
                parsed = wire.scan(response)
                expected_end = 12 + len(waiters[0].query.question)
                if parsed.qdcount != 1 or parsed.question_end != expected_end:
                    raise wire.WireError("question section differs from ours")
                template = self.cache.put(key, response, parsed, now)
            except wire.WireError as exc:
                log.debug("unusable upstream response for %s: %s", waiters[0].query.name, exc)
        out = []
        if template is None:
            self.stats["servfail"] += len(waiters)
            for w in waiters:
                out.append(Reply(w.to, self._servfail(w.query)))
            return out
        self.stats["upstream_answers"] += len(waiters)
        for w in waiters:
            out.append(Reply(w.to, self._fit(template.render(w.query, now, self.max_udp), w.limit, w.query)))
        return out

    def abandon(self, key: tuple) -> None:
        """Forget the waiters of ``key`` (the adapter shuts down)."""
        self.pending.pop(key, None)

    # --- helpers -------------------------------------------------------------------
    def _servfail(self, query: wire.Query) -> bytes:
        return wire.error_reply(query.ident, query.flags, wire.SERVFAIL, query, self.max_udp)

    def _fit(self, data: bytes, limit: int, query: wire.Query) -> bytes:
        if len(data) > limit:
            self.stats["truncated"] += 1
            return wire.fit(data, limit, query, self.max_udp)
        return data


def new_id() -> int:
    return secrets.randbits(16)
