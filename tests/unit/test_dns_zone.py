"""Service zones: query in, answer out (no I/O)."""
import pytest
from dnslib import EDNS0, DNSRecord

from dns_resolver import wire
from dns_resolver.allocator import Allocator
from dns_resolver.names import Service, StaticNames
from dns_resolver.store import MemoryStore
from dns_resolver.zone import ServiceZone, service_txt
from sal.serviceid import service_id_for

NOW = 1_700_000_000.0


@pytest.fixture
def zone():
    names = StaticNames([Service("web.svc.example", (80, 443)), Service("db.internal.svc.example")])
    alloc = Allocator("198.18.0.0/16", ["198.18.0.0/24"], MemoryStore())
    return ServiceZone("svc.example.", names, alloc, ttl=30, negative_ttl=45, serial=7)


def ask(zone, name, qtype="A", ident=99, now=NOW, qclass="IN"):
    q = DNSRecord.question(name, qtype, qclass)
    q.header.id = ident
    q.add_ar(EDNS0(udp_len=1232))
    query = wire.parse_query(q.pack())
    template = zone.answer(query, now)
    if template is None:
        return None
    return DNSRecord.parse(template.render(query, 0.0, 1232))


def test_contains_is_by_whole_labels():
    z = ServiceZone("svc.example", StaticNames(), Allocator())
    assert z.contains((b"web", b"svc", b"example")) and z.contains((b"svc", b"example"))
    assert not z.contains((b"xsvc", b"example")) and not z.contains((b"example",))


def test_a_for_a_known_service(zone):
    r = ask(zone, "web.svc.example")
    assert r.header.rcode == 0 and r.header.aa and r.header.qr and r.header.id == 99
    [rr] = r.rr
    assert rr.rtype == 1 and rr.ttl == 30
    address = str(rr.rdata)
    assert address.startswith("198.18.") and not address.startswith("198.18.0.")     # excluded /24
    assert zone.allocator.lookup("web.svc.example").address == address


def test_names_are_case_insensitive_and_the_question_is_echoed(zone):
    a = ask(zone, "web.svc.example")
    b = ask(zone, "WEB.Svc.EXAMPLE", ident=5)
    assert str(a.rr[0].rdata) == str(b.rr[0].rdata)
    assert b.q.qname.label == (b"WEB", b"Svc", b"EXAMPLE") and b.header.id == 5


def test_same_address_every_time_and_answer_time_recorded(zone):
    first = str(ask(zone, "web.svc.example", now=NOW).rr[0].rdata)
    again = str(ask(zone, "web.svc.example", now=NOW + 100).rr[0].rdata)
    assert first == again
    assert zone.allocator.lookup("web.svc.example").last_answered == NOW + 100


def test_aaaa_is_nodata_with_soa(zone):
    r = ask(zone, "web.svc.example", "AAAA")
    assert r.header.rcode == 0 and r.header.aa and not r.rr
    [soa] = r.auth
    assert soa.rtype == 6 and str(soa.rname) == "svc.example." and soa.ttl == 45
    assert soa.rdata.times[-1] == 45
    assert zone.allocator.lookup("web.svc.example") is None       # no address handed out


def test_txt_carries_the_service_ids(zone):
    r = ask(zone, "web.svc.example", "TXT")
    texts = [b"".join(rr.rdata.data).decode() for rr in r.rr]
    assert texts == service_txt("web.svc.example", (80, 443))
    assert texts[0] == f"v=serval1 id={service_id_for('web.svc.example', 0).hex()} bits=224"
    assert texts[1] == f"v=serval1 port=80 id={service_id_for('web.svc.example', 80).hex()}"


def test_any_gives_a_and_txt(zone):
    r = ask(zone, "web.svc.example", "ANY")
    assert sorted(rr.rtype for rr in r.rr) == [1, 16, 16, 16]


def test_unknown_name_is_nxdomain_with_soa(zone):
    r = ask(zone, "nope.svc.example")
    assert r.header.rcode == 3 and r.header.aa and not r.rr
    assert r.auth[0].rtype == 6 and r.auth[0].ttl == 45


def test_empty_non_terminal_is_nodata(zone):
    r = ask(zone, "internal.svc.example")
    assert r.header.rcode == 0 and not r.rr and r.auth[0].rtype == 6


def test_apex_soa(zone):
    r = ask(zone, "svc.example", "SOA")
    assert r.header.rcode == 0 and r.rr[0].rtype == 6 and r.rr[0].rdata.times[0] == 7


def test_chaos_class_is_refused(zone):
    r = ask(zone, "web.svc.example", "TXT", qclass="CH")
    assert r.header.rcode == wire.REFUSED


def test_full_range_gives_servfail_and_reclaim_frees(zone):
    names = StaticNames([Service(f"s{i}.svc.example") for i in range(3)])
    alloc = Allocator("198.18.5.0/30", store=MemoryStore())          # two usable addresses
    z = ServiceZone("svc.example", names, alloc, ttl=30)
    assert ask(z, "s0.svc.example").rr and ask(z, "s1.svc.example").rr
    assert ask(z, "s2.svc.example") is None and alloc.exhausted
    s0 = alloc.lookup("s0.svc.example")
    freed = alloc.reclaim(alloc.idle(NOW + 60, 30), set(), NOW + 60, 30)
    assert s0 in freed
    r = ask(z, "s2.svc.example", now=NOW + 61)
    assert r is not None and str(r.rr[0].rdata) in ("198.18.5.1", "198.18.5.2")


def test_memoised_answers_follow_a_reclaim(zone):
    first = str(ask(zone, "web.svc.example").rr[0].rdata)
    alloc = zone.allocator
    alloc.reclaim(alloc.idle(NOW + 1000, 30), set(), NOW + 1000, 30)
    assert alloc.lookup("web.svc.example") is None
    again = ask(zone, "web.svc.example", now=NOW + 1001)      # not the memo: a fresh allocation
    assert alloc.lookup("web.svc.example") is not None
    assert str(again.rr[0].rdata) == first                    # the hash puts it back where it was
