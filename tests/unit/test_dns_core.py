"""The resolver core: bytes in, replies and upstream work out (no I/O)."""
import struct

import pytest
from dnslib import EDNS0, QTYPE, RR, TXT, A, DNSRecord

from dns_resolver import wire
from dns_resolver.allocator import Allocator
from dns_resolver.cache import Cache
from dns_resolver.core import Forward, Reply, Resolver
from dns_resolver.names import Service, StaticNames
from dns_resolver.policy import Acl, RateLimiter
from dns_resolver.store import MemoryStore
from dns_resolver.zone import ServiceZone

LAN = "198.19.1.2"


def make(rate=0, burst=10, allow=("198.19.1.0/24",), forwarding=True, slip=1):
    names = StaticNames([Service("web.svc.example", (80,))])
    zone = ServiceZone("svc.example", names, Allocator("198.18.0.0/16", store=MemoryStore()), ttl=30)
    return Resolver([zone], Cache(), Acl(allow), RateLimiter(rate, burst), forwarding=forwarding, slip=slip)


def q(name, qtype="A", ident=1, edns=None):
    rec = DNSRecord.question(name, qtype)
    rec.header.id = ident
    if edns:
        rec.add_ar(EDNS0(udp_len=edns))
    return rec.pack()


def one_reply(actions):
    assert len(actions) == 1 and isinstance(actions[0], Reply), actions
    return DNSRecord.parse(actions[0].data)


def upstream_answer(forward: Forward, rcode=0, answers=(("192.0.2.7", 300),), txt=0, ident=999):
    rec = DNSRecord.parse(forward.data)
    rec.header.id = ident
    r = rec.reply()
    r.header.rcode = rcode
    for address, ttl in answers:
        r.add_answer(RR(rec.q.qname, QTYPE.A, rdata=A(address), ttl=ttl))
    for _ in range(txt):
        r.add_answer(RR(rec.q.qname, QTYPE.TXT, rdata=TXT("y" * 250), ttl=300))
    return r.pack()


def test_zone_names_answered_locally():
    core = make()
    r = one_reply(core.handle(q("web.svc.example", ident=42), LAN, False, 0.0, 1e9, "c1"))
    assert r.header.id == 42 and r.header.aa and r.rr[0].rtype == 1
    assert core.stats["zone_answers"] == 1


def test_other_names_forwarded_once_then_from_cache():
    core = make()
    out = core.handle(q("www.Example.org", ident=5), LAN, False, 10.0, 1e9, "c1")
    [fwd] = out
    assert isinstance(fwd, Forward)
    up = DNSRecord.parse(fwd.data)
    assert str(up.q.qname) == "www.example.org." and up.header.rd and up.ar[0].rtype == 41
    # a second client asks the same while the first is in flight: no second upstream query
    assert core.handle(q("WWW.example.org", ident=6), "198.19.1.3", False, 10.1, 1e9, "c2") == []
    replies = core.upstream_done(fwd.key, upstream_answer(fwd), 10.2)
    assert [r.to for r in replies] == ["c1", "c2"]
    first, second = (DNSRecord.parse(r.data) for r in replies)
    assert first.header.id == 5 and second.header.id == 6
    assert first.q.qname.label == (b"www", b"Example", b"org")
    assert second.q.qname.label == (b"WWW", b"example", b"org")
    assert str(first.rr[0].rdata) == "192.0.2.7" and first.header.ra
    assert not first.header.aa                    # upstream said AA; we are not authoritative
    # then from the cache, TTL aged
    r = one_reply(core.handle(q("www.example.org", ident=7), LAN, False, 110.2, 1e9, "c3"))
    assert r.header.id == 7 and r.rr[0].ttl == 200
    assert core.stats["cache_answers"] == 1 and core.stats["coalesced"] == 1


def test_all_upstreams_failed_is_servfail_and_not_cached():
    core = make()
    [fwd] = core.handle(q("down.example"), LAN, False, 0.0, 1e9, "c1")
    r = DNSRecord.parse(core.upstream_done(fwd.key, None, 0.5)[0].data)
    assert r.header.rcode == wire.SERVFAIL and r.header.id == 1
    assert isinstance(core.handle(q("down.example"), LAN, False, 1.0, 1e9, "c1")[0], Forward)


def test_upstream_answer_for_another_question_is_servfail():
    core = make()
    [fwd] = core.handle(q("a.example"), LAN, False, 0.0, 1e9, "c1")
    other = upstream_answer(Forward(fwd.key, q("bb.example")))
    assert DNSRecord.parse(core.upstream_done(fwd.key, other, 0.1)[0].data).header.rcode == wire.SERVFAIL


def test_no_forwarding_configured_is_servfail():
    core = make(forwarding=False)
    assert one_reply(core.handle(q("www.example.org"), LAN, False, 0.0, 1e9, "c")).header.rcode == wire.SERVFAIL


def test_clients_outside_the_allowed_networks_are_refused():
    core = make()
    r = one_reply(core.handle(q("www.example.org", ident=3), "203.0.113.9", False, 0.0, 1e9, "c"))
    assert r.header.rcode == wire.REFUSED and r.header.id == 3 and not r.rr
    assert not r.header.ra and r.header.rd                  # no recursion offered to them
    r = one_reply(core.handle(q("web.svc.example"), "203.0.113.9", False, 0.0, 1e9, "c"))
    assert r.header.rcode == wire.REFUSED
    assert core.stats["refused"] == 2 and core.stats["forwarded"] == 0


def answered(actions) -> bool:
    """A reply with an answer in it (not a TC "ask again over TCP")."""
    return bool(actions) and bool(DNSRecord.parse(actions[0].data).rr)


def test_rate_limit_per_client_with_refill():
    core = make(rate=10, burst=5)
    full = sum(answered(core.handle(q("web.svc.example"), LAN, False, 0.0, 1e9, "c")) for _ in range(20))
    assert full == 5
    other = sum(answered(core.handle(q("web.svc.example"), "198.19.1.3", False, 0.0, 1e9, "c")) for _ in range(3))
    assert other == 3                                # another client is not affected
    assert answered(core.handle(q("web.svc.example"), LAN, False, 0.5, 1e9, "c"))   # 0.5 s: 5 tokens back
    assert core.stats["rate_limited"] == 15


def test_over_the_limit_a_udp_query_is_told_to_ask_over_tcp():
    core = make(rate=10, burst=1)
    assert answered(core.handle(q("web.svc.example", ident=1), LAN, False, 0.0, 1e9, "c"))
    r = one_reply(core.handle(q("web.svc.example", ident=2, edns=1232), LAN, False, 0.0, 1e9, "c"))
    assert r.header.tc and r.header.id == 2 and r.header.rcode == wire.NOERROR and not r.rr
    assert str(r.q.qname) == "web.svc.example." and r.ar[0].rclass == 1232     # question and OPT kept
    # the client's retry over TCP is answered in full: no bucket over TCP
    for i in range(5):
        assert answered(core.handle(q("web.svc.example", ident=3 + i), LAN, True, 0.0, 1e9, "t"))
    assert core.stats["rate_limited"] == 1 and core.stats["rate_limited_truncated"] == 1
    assert core.stats["rate_limited_dropped"] == 0 and core.stats["zone_answers"] == 6


def test_slip_answers_every_nth_limited_query_and_drops_the_rest():
    core = make(rate=10, burst=3, slip=3)
    for _ in range(3):                                                        # the bucket's tokens
        core.handle(q("www.example.org"), LAN, False, 0.0, 1e9, "c")
    replies = [core.handle(q("www.example.org", ident=i), LAN, False, 0.0, 1e9, "c") for i in range(9)]
    assert [bool(r) for r in replies] == [False, False, True] * 3
    assert all(DNSRecord.parse(r[0].data).header.tc for r in replies if r)
    assert core.stats["rate_limited_truncated"] == 3 and core.stats["rate_limited_dropped"] == 6
    assert core.stats["forwarded"] == 1                      # a limited query never goes upstream


def test_a_client_that_ignores_tc_replies_is_dropped_until_it_asks_over_tcp():
    core = make(rate=10, burst=4)
    for _ in range(4):
        core.handle(q("web.svc.example"), LAN, False, 0.0, 1e9, "c")
    replies = [core.handle(q("web.svc.example"), LAN, False, 0.0, 1e9, "c") for _ in range(10)]
    assert [bool(r) for r in replies] == [True] * 4 + [False] * 6     # burst TC replies not followed: a flood
    assert core.stats["rate_limited_truncated"] == 4 and core.stats["rate_limited_flood"] == 6
    assert answered(core.handle(q("web.svc.example"), LAN, True, 0.0, 1e9, "t"))   # it asks over TCP ...
    again = core.handle(q("web.svc.example"), LAN, False, 0.0, 1e9, "c")
    assert DNSRecord.parse(again[0].data).header.tc                                  # ... and is told TC again
    # a glibc-like client follows every TC over TCP: never dropped, however fast it asks
    for i in range(100):
        r = one_reply(core.handle(q("web.svc.example", ident=i), "198.19.1.9", False, 0.0, 1e9, "c"))
        if r.header.tc:
            assert answered(core.handle(q("web.svc.example", ident=i), "198.19.1.9", True, 0.0, 1e9, "t"))
    assert core.stats["rate_limited_flood"] == 6


def test_slip_zero_drops_and_unparsable_limited_queries_are_dropped():
    core = make(rate=10, burst=1, slip=0)
    core.handle(q("web.svc.example"), LAN, False, 0.0, 1e9, "c")
    assert core.handle(q("web.svc.example"), LAN, False, 0.0, 1e9, "c") == []
    core = make(rate=10, burst=1)
    core.handle(q("web.svc.example"), LAN, False, 0.0, 1e9, "c")
    assert core.handle(b"\x01\x02\x03", LAN, False, 0.0, 1e9, "c") == []
    assert core.stats["rate_limited_dropped"] == 1 and core.stats["rate_limited_truncated"] == 0


def test_malformed_is_formerr_and_runts_dropped():
    core = make()
    bad = struct.pack("!HHHHHH", 0x7777, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    r = core.handle(bad, LAN, False, 0.0, 1e9, "c")
    assert struct.unpack("!HH", r[0].data[:4]) == (0x7777, 0x8181 | 0x0080)   # QR RD RA FORMERR
    assert core.handle(b"\x01\x02\x03", LAN, False, 0.0, 1e9, "c") == []
    assert core.stats["formerr"] == 1 and core.stats["dropped"] == 1


@pytest.mark.parametrize("edns,truncated", [(None, True), (512, True), (1232, False), (4096, False)])
def test_large_forwarded_answer_truncated_per_client_buffer(edns, truncated):
    core = make()
    [fwd] = core.handle(q("big.example", "A", edns=edns), LAN, False, 0.0, 1e9, "c")
    [reply] = core.upstream_done(fwd.key, upstream_answer(fwd, answers=(), txt=3), 0.1)
    r = DNSRecord.parse(reply.data)
    assert bool(r.header.tc) == truncated
    assert len(reply.data) <= (512 if edns in (None, 512) else 1232)
    assert (len(r.rr) == 0) == truncated
    assert (r.ar[0].rclass == 1232) if edns else not r.ar
    # over TCP the same answer (now from the cache) comes whole
    tcp = core.handle(q("big.example", "A", edns=edns), LAN, True, 0.2, 1e9, "t")
    assert len(DNSRecord.parse(tcp[0].data).rr) == 3


def test_pending_limits():
    core = make()
    core.max_pending = 2
    for i in range(2):
        assert isinstance(core.handle(q(f"n{i}.example"), LAN, False, 0.0, 1e9, "c")[0], Forward)
    r = one_reply(core.handle(q("n9.example"), LAN, False, 0.0, 1e9, "c"))
    assert r.header.rcode == wire.SERVFAIL
