"""The resolver's request path: ``Resolver.handle`` (a raw query in, replies or an
upstream question out) and ``Resolver.upstream_done`` (the upstream's answer in).

Queries are random bytes, mutated real queries, or built with dnslib (names in the
service zone and outside it, odd labels and letter case, every qtype and class, EDNS
with odd sizes and versions, several OPTs, flags and opcodes), over UDP and TCP, from
allowed and refused clients. A forwarded question is completed with a random,
mutated or well-formed upstream response.

Properties: nothing escapes; every action is a Reply to the asking client's token or a
Forward; a reply carries the ID of the query it answers and has QR set; it is a DNS
message dnslib parses; over UDP it fits the client's limit (512 bytes without EDNS);
a query shorter than a header, or a response, gets no reply.
"""
import random
import struct

from dnslib import EDNS0, QTYPE, RR, A, DNSRecord, SOA, TXT, CNAME

from dns_resolver import wire
from dns_resolver.allocator import Allocator
from dns_resolver.cache import Cache
from dns_resolver.core import Forward, Reply, Resolver
from dns_resolver.names import Service, StaticNames
from dns_resolver.policy import Acl, RateLimiter
from dns_resolver.store import MemoryStore
from dns_resolver.zone import ServiceZone

from .base import Target
from .common import Finding, mutate, random_bytes, require

LAN, OUTSIDE = "198.19.1.2", "203.0.113.9"
NAMES = ("web.svc.example", "WeB.SVC.example", "api.svc.example", "svc.example", "nothing.svc.example",
         "a.b.web.svc.example", "www.example.org", "example.org", "xn--bcher-kva.example", ".", "a" * 63 + ".org",
         "x.svc.example")


def make_resolver() -> Resolver:
    names = StaticNames([Service("web.svc.example", (80, 443)), Service("api.svc.example", (8443,))])
    zone = ServiceZone("svc.example", names, Allocator("198.18.0.0/24", store=MemoryStore()), ttl=30, serial=1)
    return Resolver([zone], Cache(size=64), Acl(["198.19.1.0/24"]), RateLimiter(0, 10),
                    max_pending=8, max_waiters=4)


def build_query(r) -> bytes:
    name = r.choice(NAMES) if r.random() < 0.85 else ".".join(
        r.choice(("a", "B", "xyz", "-", "_s", "a" * r.randrange(1, 64), "\\.", "é".encode().decode("latin-1")))
        for _ in range(r.randrange(1, 6)))
    qtype = r.choice(("A", "AAAA", "TXT", "ANY", "SOA", "NS", "PTR", "MX", "OPT", "AXFR", "CNAME")) \
        if r.random() < 0.9 else r.getrandbits(16)
    try:
        rec = DNSRecord.question(name, qtype if isinstance(qtype, str) else "A")
    except Exception:        # a name dnslib refuses to build
        rec = DNSRecord.question("web.svc.example", "A")
    if not isinstance(qtype, str):
        rec.q.qtype = qtype
    if r.random() < 0.1:
        rec.q.qclass = r.choice((3, 254, 255, r.getrandbits(16)))
    rec.header.id = r.getrandbits(16)
    rec.header.rd = r.random() < 0.8
    if r.random() < 0.05:
        rec.header.opcode = r.randrange(16)
    if r.random() < 0.05:
        rec.header.cd = 1
    k = r.random()
    if k < 0.4:
        rec.add_ar(EDNS0(udp_len=r.choice((0, 511, 512, 1232, 4096, 65535)), flags="do" if r.random() < 0.3 else "",
                         version=0 if r.random() < 0.9 else r.randrange(1, 256)))
        if r.random() < 0.05:
            rec.add_ar(EDNS0(udp_len=1232))
    data = bytes(rec.pack())
    if r.random() < 0.05:         # a compression pointer in the question
        data = data[:12] + b"\xc0\x0c" + data[-4:] if len(data) > 16 else data
    return data


def build_response(r, question: bytes) -> bytes:
    try:
        q = DNSRecord.parse(question)
    except Exception:
        return random_bytes(r, 60)
    q.header.id = r.getrandbits(16)
    reply = q.reply()
    reply.header.rcode = r.choice((0, 0, 0, 2, 3, 5, r.randrange(16)))
    reply.header.tc = r.random() < 0.05
    for _ in range(r.randrange(4) if r.random() < 0.95 else 40):
        kind = r.randrange(4)
        ttl = r.choice((0, 1, 300, 86400 * 7, 0xFFFFFFFF))
        if kind == 0:
            reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.%d" % r.randrange(256)), ttl=ttl))
        elif kind == 1:
            reply.add_answer(RR(q.q.qname, QTYPE.TXT, rdata=TXT("y" * r.randrange(250)), ttl=ttl))
        elif kind == 2:
            reply.add_auth(RR(q.q.qname, QTYPE.SOA, rdata=SOA("ns.example", "h.example", (1, 2, 3, 4, r.getrandbits(32))), ttl=ttl))
        else:
            reply.add_answer(RR(q.q.qname, QTYPE.CNAME, rdata=CNAME("other.example"), ttl=ttl))
    if r.random() < 0.3:
        reply.add_ar(EDNS0(udp_len=4096))
    return bytes(reply.pack())


class Dns(Target):
    name = "dns"
    description = "dns_resolver.core.Resolver.handle and upstream_done"

    def __init__(self):
        r = random.Random(13)
        self.seeds = [build_query(r) for _ in range(64)]

    def generate(self, r):
        steps, t = [], 0.0
        for _ in range(1 + r.randrange(4)):
            t += r.choice((0.0, 0.5, 31.0, 400.0))
            k = r.random()
            if k < 0.1:
                data = random_bytes(r, 64)
            elif k < 0.45:
                data = mutate(r.choice(self.seeds), r, self.seeds)
            else:
                data = build_query(r)
            client = LAN if r.random() < 0.9 else r.choice((OUTSIDE, "::ffff:198.19.1.7", "fe80::1%eth0", "junk"))
            steps.append(("query", data, r.random() < 0.2, client, t))
            if r.random() < 0.5:
                what = r.random()
                resp = None if what < 0.1 else random_bytes(r, 80) if what < 0.2 else build_response(r, data)
                clean = what >= 0.2
                if clean and r.random() < 0.2:
                    resp, clean = mutate(resp, r), False
                # (the third field says the response is well-formed: its records are relayed)
                steps.append(("upstream", resp, clean, "", t + 0.01))
        return steps

    def run(self, steps) -> None:
        core = make_resolver()
        asked = {}              # token -> (query ID, limit or None)
        forwards = []
        self.clean = True       # every upstream response so far parsed (we relay its records)
        for i, (kind, data, tcp, client, now) in enumerate(steps):
            if kind == "query":
                token = ("client", i)
                actions = core.handle(data, client, tcp, now, 1e9 + now, token)
                asked[token] = (data[:2], _limit(data, tcp, core))
                require(isinstance(actions, list), "handle gave no list")
                if len(data) < 12 or data[2] & 0x80:
                    require(actions == [], "answered a runt or a response")
                for a in actions:
                    if isinstance(a, Forward):
                        require(a.key in core.pending, "a forward without a pending question")
                        forwards.append(a)
                    else:
                        _check_reply(a, asked, self.clean)
            elif forwards:
                fwd = forwards.pop(0)
                if data is not None and not _same_question(data, fwd.data):
                    data = None          # the adapter takes only a reply to its question
                self.clean = self.clean and (data is None or tcp)
                for a in core.upstream_done(fwd.key, data, now):
                    _check_reply(a, asked, self.clean)
        for fwd in forwards:        # every upstream failed
            for a in core.upstream_done(fwd.key, None, 1e6):
                _check_reply(a, asked, self.clean)
        require(not core.pending, "questions left pending")


def _same_question(response: bytes, asked: bytes) -> bool:
    """What the adapter (dns_resolver/upstream.py) checks besides the ID."""
    from dns_resolver.upstream import _question
    try:
        return _question(response).lower() == _question(asked).lower()
    except Exception:
        return False


def _limit(data: bytes, tcp: bool, core) -> int | None:
    try:
        return wire.parse_query(data).limit(tcp, core.max_udp)
    except (wire.Drop, wire.QueryError):
        return None if tcp else 512 if len(data) >= 12 else None


def _check_reply(a, asked, parse: bool) -> None:
    require(isinstance(a, Reply), f"an action of type {type(a).__name__}")
    require(a.to in asked, "a reply to nobody who asked")
    ident, limit = asked[a.to]
    require(type(a.data) is bytes and len(a.data) >= 12, "reply shorter than a header")
    require(a.data[:2] == ident, "reply does not carry the query's ID")
    require(a.data[2] & 0x80, "reply without QR")
    if limit is not None:
        require(len(a.data) <= limit, f"reply of {len(a.data)} bytes over the client's limit {limit}")
    if parse:
        try:
            DNSRecord.parse(a.data)
        except Exception as exc:
            raise Finding(f"reply does not parse: {str(exc)[:40]}") from None


TARGETS = [Dns]
