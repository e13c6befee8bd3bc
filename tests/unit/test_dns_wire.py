"""DNS messages at the byte level: query checks, truncation, templates."""
import random
import struct

import pytest
from dnslib import EDNS0, QTYPE, RR, TXT, A, DNSRecord

from dns_resolver import wire


def query_bytes(name="web.svc.example", qtype="A", ident=0x1234, edns=None, do=False):
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return q.pack()


def header(ident=0x4242, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def test_parse_plain_query_keeps_case_and_lowercases_key():
    q = wire.parse_query(query_bytes("WeB.Svc.EXAMPLE"))
    assert q.ident == 0x1234
    assert q.labels == (b"WeB", b"Svc", b"EXAMPLE")
    assert q.key == (b"web", b"svc", b"example")
    assert q.name == "web.svc.example"
    assert q.qtype == 1 and q.qclass == 1
    assert q.question == b"\x03WeB\x03Svc\x07EXAMPLE\x00\x00\x01\x00\x01"
    assert not q.edns and q.limit(False, 1232) == 512 and q.limit(True, 1232) == 65535


def test_parse_edns_buffer_size_and_do_bit():
    q = wire.parse_query(query_bytes(edns=4096, do=True))
    assert q.edns and q.udp_size == 4096 and q.do
    assert q.limit(False, 1232) == 1232          # never above the server's maximum
    q = wire.parse_query(query_bytes(edns=700))
    assert q.limit(False, 1232) == 700
    q = wire.parse_query(query_bytes(edns=100))
    assert q.limit(False, 1232) == 512           # below 512 counts as 512


@pytest.mark.parametrize("data", [b"", b"\x12", b"\x12\x34\x01\x00\x00"])
def test_runts_are_dropped(data):
    with pytest.raises(wire.Drop):
        wire.parse_query(data)


def test_responses_are_dropped():
    data = bytearray(query_bytes())
    data[2] |= 0x80
    with pytest.raises(wire.Drop):
        wire.parse_query(bytes(data))


def formerr(data):
    with pytest.raises(wire.QueryError) as info:
        wire.parse_query(data)
    return info.value


def test_header_claiming_a_question_that_is_missing():
    err = formerr(header())
    assert err.rcode == wire.FORMERR and err.ident == 0x4242


def test_label_longer_than_63_bytes():
    name = b"\x45" + b"a" * 0x45 + b"\x00"          # 0x45 = 69: not a valid label length
    err = formerr(header() + name + b"\x00\x01\x00\x01")
    assert err.rcode == wire.FORMERR


def test_name_longer_than_255_bytes():
    name = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00"
    assert formerr(header() + name + b"\x00\x01\x00\x01").rcode == wire.FORMERR


@pytest.mark.parametrize("name", [
    b"\xc0\x0c",                  # points at itself
    b"\x01a\xc0\x0c",             # points back to its own start: a loop
    b"\xc0\x20",                  # points forward
    b"\xc0\xff",                  # points past the end
])
def test_compression_loops_and_bad_pointers(name):
    assert formerr(header() + name + b"\x00\x01\x00\x01").rcode == wire.FORMERR


def test_two_questions_and_zero_questions():
    q = query_bytes()[12:]
    assert formerr(header(qd=2) + q + q).rcode == wire.FORMERR
    assert formerr(header(qd=0)).rcode == wire.FORMERR


def test_other_opcode_is_notimp():
    data = bytearray(query_bytes())
    data[2] |= 0x10                      # opcode 2 (STATUS)
    err = formerr(bytes(data))
    assert err.rcode == wire.NOTIMP and err.ident == 0x1234
    reply = wire.error_reply(err.ident, err.flags, err.rcode, err.query, 1232)
    assert struct.unpack("!HH", reply[:4]) == (0x1234, 0x8000 | 0x1000 | 0x0100 | 0x0080 | wire.NOTIMP)


def test_records_in_answer_section_or_many_additional_are_formerr():
    q = query_bytes()[12:]
    assert formerr(header(an=1) + q).rcode == wire.FORMERR
    assert formerr(header(ar=30000) + q).rcode == wire.FORMERR


def test_a_long_chain_of_compressed_names_is_refused_fast():
    """dnslib follows pointers recursively: 64 KB of chained names would take it
    seconds. Such a message is no query: FORMERR before the codec sees it."""
    import time
    data = bytearray(header(ar=4)) + b"\x01a\x00\x00\x01\x00\x01"
    prev = 12
    while len(data) < 65000:
        pos = len(data)
        data += b"\x01b" + struct.pack("!H", 0xC000 | prev) + struct.pack("!HHIH", 1, 1, 0, 4) + bytes(4)
        prev = pos
    start = time.perf_counter()
    assert formerr(bytes(data)).rcode == wire.FORMERR
    assert time.perf_counter() - start < 0.05


def test_edns_version_1_is_badvers():
    q = DNSRecord.question("web.svc.example")
    q.add_ar(EDNS0(udp_len=1232, version=1))
    err = formerr(q.pack())
    assert err.rcode == wire.BADVERS
    reply = DNSRecord.parse(wire.error_reply(err.ident, err.flags, err.rcode, err.query, 1232))
    assert reply.header.rcode == 0
    assert [rr for rr in reply.ar if rr.rtype == 41][0].edns_rcode == 1     # 16 >> 4


def test_two_opt_records_are_formerr():
    q = DNSRecord.question("web.svc.example")
    q.add_ar(EDNS0(udp_len=1232), EDNS0(udp_len=1232))
    assert formerr(q.pack()).rcode == wire.FORMERR


def test_error_reply_echoes_id_flags_and_question():
    q = wire.parse_query(query_bytes("Foo.Example", edns=1232))
    data = wire.error_reply(q.ident, q.flags, wire.REFUSED, q, 1232)
    reply = DNSRecord.parse(data)
    assert reply.header.id == 0x1234 and reply.header.qr and reply.header.rd and reply.header.rcode == wire.REFUSED
    assert reply.q.qname.label == (b"Foo", b"Example")
    assert reply.ar[0].rtype == 41 and reply.ar[0].rclass == 1232
    # without a readable question: the header alone
    assert wire.error_reply(7, 0x0100, wire.FORMERR, None, 1232) == struct.pack("!HHHHHH", 7, 0x8181, 0, 0, 0, 0)


def big_reply(query_data, n=10):
    q = DNSRecord.parse(query_data)
    r = q.reply()
    for i in range(n):
        r.add_answer(RR(q.q.qname, QTYPE.TXT, rdata=TXT("x" * 200), ttl=60))
    return r.pack()


def test_fit_truncates_to_question_and_opt_with_tc():
    data = query_bytes("big.example", "TXT", edns=1232)
    q = wire.parse_query(data)
    reply = big_reply(data)
    assert len(reply) > 2000
    assert wire.fit(reply, 65535, q, 1232) is reply
    out = DNSRecord.parse(wire.fit(reply, 512, q, 1232))
    assert out.header.tc and out.header.id == 0x1234
    assert not out.rr and [r.rtype for r in out.ar] == [41]
    assert str(out.q.qname) == "big.example."


def test_scan_finds_records_and_their_ttls():
    data = big_reply(query_bytes("big.example", "TXT"), n=3)
    s = wire.scan(data)
    assert s.qdcount == 1 and len(s.records) == 3
    assert all(r.ttl == 60 and r.rtype == 16 and r.section == 1 for r in s.records)
    assert struct.unpack_from("!I", data, s.records[1].ttl_at)[0] == 60


@pytest.mark.parametrize("cut", [13, 20, 30, 45])
def test_scan_rejects_truncated_messages(cut):
    data = big_reply(query_bytes("big.example", "TXT"), n=1)
    with pytest.raises(wire.WireError):
        wire.scan(data[:cut])


def test_template_renders_for_another_client_with_aged_ttls():
    first = query_bytes("web.example", ident=1)
    q1 = DNSRecord.parse(first)
    r = q1.reply()
    r.add_answer(RR(q1.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=300))
    r.add_ar(EDNS0(udp_len=4096))                     # the upstream's OPT is not kept
    data = r.pack()
    t = wire.template_from(data, wire.scan(data), stored=100.0)
    assert t.counts == (1, 0, 0)
    other = wire.parse_query(query_bytes("WEB.example", ident=77))     # no EDNS
    out = DNSRecord.parse(t.render(other, 130.5, 1232))
    assert out.header.id == 77 and out.header.ra and out.header.aa
    assert out.q.qname.label == (b"WEB", b"example")                 # this client's case
    assert out.rr[0].ttl == 270 and str(out.rr[0].rdata) == "192.0.2.1"
    assert not out.ar                                                   # no EDNS asked: no OPT
    with_edns = wire.parse_query(query_bytes("web.example", ident=78, edns=1400, do=True))
    out = DNSRecord.parse(t.render(with_edns, 100.0, 1232))
    assert out.rr[0].ttl == 300 and out.ar[0].rclass == 1232 and out.ar[0].edns_do


def test_template_refuses_an_opt_in_the_middle():
    q = DNSRecord.parse(query_bytes("web.example"))
    r = q.reply()
    r.add_ar(EDNS0(udp_len=4096))
    r.add_ar(RR("x.example", QTYPE.A, rdata=A("192.0.2.1"), ttl=5))
    data = r.pack()
    with pytest.raises(wire.WireError):
        wire.template_from(data, wire.scan(data))


def test_truncated_reply_echoes_the_question_and_opt():
    query = DNSRecord.question("WeB.svc.example", "AAAA")
    query.header.id = 0x4242
    plain = wire.truncated_reply(query.pack(), 1232)
    r = DNSRecord.parse(plain)
    assert r.header.id == 0x4242 and r.header.qr and r.header.tc and r.header.rd and r.header.rcode == 0
    assert str(r.q.qname) == "WeB.svc.example." and r.q.qtype == 28 and not r.rr and not r.ar
    query.add_ar(EDNS0(udp_len=4096, flags="do"))
    r = DNSRecord.parse(wire.truncated_reply(query.pack(), 1232))
    [opt] = r.ar
    assert r.header.tc and opt.rtype == 41 and opt.rclass == 1232 and opt.ttl & 0x8000     # our size, DO echoed


def test_truncated_reply_refuses_what_is_no_plain_query():
    good = DNSRecord.question("web.svc.example").pack()
    response = DNSRecord.question("web.svc.example").reply().pack()
    pointer = good[:12] + b"\xc0\x0c" + good[-4:]
    for bad in (b"", good[:11], good[:-1], response, pointer, good[:12] + b"\x40" + b"a" * 70,
                good[:4] + b"\x00\x02" + good[6:]):
        assert wire.truncated_reply(bad, 1232) is None, bad
    rng = random.Random(7)
    for _ in range(2000):                    # never raises on noise
        junk = good[:12] + bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        wire.truncated_reply(junk, 1232)
