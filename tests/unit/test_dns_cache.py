"""The forwarding cache: TTLs, negative TTLs (RFC 2308), limits (time passed in)."""
from dnslib import EDNS0, QTYPE, RR, SOA, A, DNSRecord

from dns_resolver import wire
from dns_resolver.cache import Cache


def response(name="www.example", rcode=0, answers=(), soa=None, tc=False):
    q = DNSRecord.question(name)
    r = q.reply()
    r.header.rcode = rcode
    r.header.tc = 1 if tc else 0
    for address, ttl in answers:
        r.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=ttl))
    if soa is not None:
        ttl, minimum = soa
        r.add_auth(RR("example", QTYPE.SOA, rdata=SOA("ns.example", "h.example", (1, 2, 3, 4, minimum)), ttl=ttl))
    r.add_ar(EDNS0(udp_len=4096))
    data = r.pack()
    return data, wire.scan(data)


def query(name="www.example", ident=1):
    q = DNSRecord.question(name)
    q.header.id = ident
    return wire.parse_query(q.pack())


KEY = ((b"www", b"example"), 1, 1, False)


def test_positive_answer_kept_for_its_smallest_ttl_and_aged():
    c = Cache()
    data, parsed = response(answers=[("192.0.2.1", 300), ("192.0.2.2", 60)])
    c.put(KEY, data, parsed, now=1000.0)
    t = c.get(KEY, 1059.9)
    assert t is not None
    out = DNSRecord.parse(t.render(query(ident=9), 1030.0, 1232))
    assert [rr.ttl for rr in out.rr] == [270, 30] and out.header.id == 9
    assert c.get(KEY, 1060.0) is None                 # the smallest TTL has run out
    assert c.hits == 1 and c.misses == 1


def test_negative_answer_kept_for_soa_minimum():
    c = Cache()
    data, parsed = response(rcode=3, soa=(3600, 120))
    assert c.ttl_for(data, parsed) == 120
    c.put(KEY, data, parsed, 0.0)
    assert c.get(KEY, 119.0) is not None and c.get(KEY, 120.0) is None
    out = DNSRecord.parse(c.put(KEY, data, parsed, 0.0).render(query(), 20.0, 1232))
    assert out.header.rcode == 3 and out.auth[0].ttl == 100     # the SOA's TTL is the negative TTL, aged


def test_nodata_uses_the_soa_too():
    c = Cache()
    data, parsed = response(rcode=0, soa=(30, 600))
    assert c.ttl_for(data, parsed) == 30


def test_not_kept_without_soa_with_zero_ttl_truncated_or_servfail():
    c = Cache()
    for kwargs in ({"rcode": 3}, {"answers": [("192.0.2.1", 0)]}, {"answers": [("192.0.2.1", 60)], "tc": True},
                   {"rcode": 2}):
        data, parsed = response(**kwargs)
        assert c.ttl_for(data, parsed) == 0, kwargs
        c.put(KEY, data, parsed, 0.0)
        assert c.get(KEY, 0.0) is None


def test_limits_apply():
    c = Cache(min_ttl=10, max_ttl=100, max_negative_ttl=50)
    data, parsed = response(answers=[("192.0.2.1", 5000)])
    assert c.ttl_for(data, parsed) == 100
    data, parsed = response(answers=[("192.0.2.1", 3)])
    assert c.ttl_for(data, parsed) == 10
    data, parsed = response(rcode=3, soa=(900, 900))
    assert c.ttl_for(data, parsed) == 50
    data, parsed = response(answers=[("192.0.2.1", 5000)])
    t = c.put(KEY, data, parsed, 0.0)
    assert DNSRecord.parse(t.render(query(), 0.0, 1232)).rr[0].ttl == 100    # served TTL capped too


def test_least_recently_used_goes_first():
    c = Cache(size=2)
    data, parsed = response(answers=[("192.0.2.1", 300)])
    for i in range(3):
        c.put(("k", i), data, parsed, 0.0)
        if i == 1:
            c.get(("k", 0), 0.0)                # 0 used: 1 is now the oldest
    assert c.get(("k", 1), 0.0) is None and c.get(("k", 0), 0.0) and c.get(("k", 2), 0.0)
    assert c.evictions == 1
