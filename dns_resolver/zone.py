"""A service zone: query in, answer out. No I/O.

For a name under the zone's origin (``svc.example``):

=========================  =================================================================
known service, A           a virtual IPv4 address from the allocator, TTL ``ttl`` (short)
known service, TXT         the serviceIDs, for Serval-aware clients (see below)
known service, ANY         the A and TXT records
known service, other type  NOERROR, no answer, the SOA in the authority section (NODATA)
empty non-terminal         NODATA (e.g. ``svc.example`` itself when only ``a.b.svc.example``
                           exists)
zone apex, SOA             the zone's SOA
unknown name               NXDOMAIN with the SOA (negative caching: ``negative_ttl``)
known, no live instance    NODATA for every type, SOA TTL and MINIMUM ``down_ttl`` (short):
                           only when the zone has a ``liveness`` that knows (see
                           ``liveness.py``); the name exists, it has no address now, and a
                           client asks again soon
class other than IN/ANY    REFUSED
=========================  =================================================================

Every answer is authoritative (AA). When the range is full and a new name cannot get an
address, the A answer is SERVFAIL (the daemon then reclaims idle addresses urgently).

TXT records, one string each::

    "v=serval1 id=<64 hex digits> bits=224"      the name's prefix: every port of the name
    "v=serval1 port=80 id=<64 hex digits>"       one per port listed in the config

Answers are built with dnslib once and kept as :class:`~dns_resolver.wire.Template`
(invalidated when an address is reclaimed or the name source changes), so repeated
queries cost a dictionary lookup and a few bytes joined.
"""
from __future__ import annotations

import logging
import time

from dnslib import QTYPE, RR, SOA, TXT, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from sal.serviceid import service_id_for

from . import wire
from .names import NameSource, normalize

log = logging.getLogger("serval.dns.zone")

MEMO_SIZE = 20000


class ServiceZone:
    def __init__(self, origin: str, source: NameSource, allocator, ttl: int = 30,
                 negative_ttl: int = 60, serial: int | None = None, liveness=None, down_ttl: int = 5,
                 stats: dict | None = None):
        self.origin = normalize(origin)
        self.key = tuple(label.encode("ascii") for label in self.origin.split(".")) if self.origin else ()
        self.source = source
        self.allocator = allocator
        self.ttl, self.negative_ttl = ttl, negative_ttl
        self.serial = serial if serial is not None else int(time.time())
        self.liveness = liveness               # None: every known name is answered
        self.down_ttl = min(down_ttl, negative_ttl)
        self.memo: dict = {}
        self.answers = 0
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("no_instance", 0)

    def contains(self, key: tuple) -> bool:
        n = len(self.key)
        return len(key) >= n and key[len(key) - n:] == self.key

    # --- answering -----------------------------------------------------------------
    def answer(self, query: wire.Query, now: float) -> wire.Template | None:
        """The answer to ``query`` (whose name is in this zone), or None for SERVFAIL.
        ``now`` is wall-clock time (allocation times are persisted)."""
        self.answers += 1
        memo_key = (query.key, query.qtype, query.qclass)
        generation = (self.allocator.generation, self.source.generation,
                      self.liveness.generation if self.liveness is not None else 0)
        hit = self.memo.get(memo_key)
        if hit is not None and hit[0] == generation:
            template, alloc, down = hit[1:]
            if alloc is not None:
                self.allocator.answered(alloc, now)
        else:
            template, alloc, down = self._build(query, now)
            if template is not None:
                if len(self.memo) >= MEMO_SIZE:
                    self.memo.clear()
                self.memo[memo_key] = (generation, template, alloc, down)
        if down:
            self.stats["no_instance"] += 1
        return template

    def _build(self, query: wire.Query, now: float):
        reply = DNSRecord(DNSHeader(id=query.ident, qr=1, aa=1), q=None)
        reply.add_question(_question(query))
        if query.qclass not in (wire.C_IN, wire.T_ANY):
            return self._template(reply, wire.REFUSED, aa=False), None, False
        name = query.name
        owner = DNSLabel(query.labels)
        alloc = None
        if query.key == self.key:
            if query.qtype in (wire.T_SOA, wire.T_ANY):
                reply.add_answer(self._soa())
            else:
                reply.add_auth(self._soa())
            return self._template(reply, wire.NOERROR), None, False
        svc = self.source.lookup(name)
        if svc is None:
            if self._has_descendant(name):
                reply.add_auth(self._soa())
                return self._template(reply, wire.NOERROR), None, False
            reply.add_auth(self._soa())
            return self._template(reply, wire.NXDOMAIN), None, False
        if self.liveness is not None and self.liveness.down(name):
            # NODATA, not NXDOMAIN: the name exists (RFC 8020 would let a cache deny
            # everything below an NXDOMAIN), it has no address now; short negative TTL
            reply.add_auth(self._soa(self.down_ttl))
            return self._template(reply, wire.NOERROR), None, True
        if query.qtype in (wire.T_A, wire.T_ANY):
            alloc = self.allocator.allocate(name, now)
            if alloc is None:
                return None, None, False
            self.allocator.answered(alloc, now)
            reply.add_answer(RR(owner, QTYPE.A, rdata=A(alloc.address), ttl=self.ttl))
        if query.qtype in (wire.T_TXT, wire.T_ANY):
            reply.add_answer(*[RR(owner, QTYPE.TXT, rdata=TXT(text), ttl=self.ttl)
                               for text in service_txt(svc.name, svc.ports)])
        if not reply.rr:
            reply.add_auth(self._soa())
        return self._template(reply, wire.NOERROR), alloc, False

    def _template(self, reply: DNSRecord, rcode: int, aa: bool = True) -> wire.Template:
        reply.header.rcode = rcode
        reply.header.aa = 1 if aa else 0
        data = reply.pack()
        return wire.template_from(data, wire.scan(data), decrement=False)

    def _soa(self, negative_ttl: int | None = None) -> RR:
        """The zone's SOA; its TTL and MINIMUM bound how long a negative answer is
        cached (RFC 2308: the smaller of the two)."""
        negative_ttl = self.negative_ttl if negative_ttl is None else negative_ttl
        origin = self.origin or "."
        mname = f"ns.{self.origin}" if self.origin else "ns"
        rname = f"hostmaster.{self.origin}" if self.origin else "hostmaster"
        times = (self.serial & 0xFFFFFFFF, 3600, 600, 86400, negative_ttl)
        return RR(origin, QTYPE.SOA, rdata=SOA(mname, rname, times), ttl=negative_ttl)

    def _has_descendant(self, name: str) -> bool:
        suffix = "." + name
        return any(n.endswith(suffix) for n in self.source.names())


def _question(query: wire.Query) -> DNSQuestion:
    return DNSQuestion(DNSLabel(query.labels), query.qtype, query.qclass)


def service_txt(name: str, ports=()) -> list[str]:
    texts = [f"v=serval1 id={service_id_for(name, 0).hex()} bits=224"]
    texts += [f"v=serval1 port={port} id={service_id_for(name, port).hex()}" for port in ports]
    return texts
