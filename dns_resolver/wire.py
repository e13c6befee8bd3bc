"""DNS messages at the byte level: query checks, response assembly, truncation.

No I/O. dnslib (the codec) parses every query and builds every zone answer; this
module adds what a server needs around it:

* :func:`parse_query` turns a datagram into a :class:`Query`, or raises
  :class:`Drop` (not worth an answer: shorter than a header, or a response) or
  :class:`QueryError` (answer it with that rcode: FORMERR, NOTIMP, BADVERS).
  Names are checked strictly (labels of 1..63 bytes, names of at most 255).
* :class:`Template` is an answer without its header and question: the records
  after the question, the counts, and where the TTLs sit. The cache and the
  service zones keep templates, and :meth:`Template.render` writes the reply for one
  query: that query's ID, flags and question bytes (so a client's own letter case is
  echoed), TTLs decreased by the time spent in the cache, an OPT record when the
  query had one.
* :func:`scan` walks any message (an upstream's response) and finds its records, so
  a template can be made from it without re-encoding.
* :func:`fit` truncates a reply that is larger than the client can take: the
  question and OPT stay, every record goes, and TC is set (the client retries over
  TCP, RFC 7766).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from dnslib import DNSRecord

HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")
TTL = struct.Struct("!I")

# header flag bits
QR, AA, TC, RD, RA, AD, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0020, 0x0010
OPCODE = 0x7800
# rcodes (BADVERS is extended: 16 = OPT ext-rcode 1, header rcode 0)
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED", 16: "BADVERS"}
# record types we look at
T_A, T_NS, T_SOA, T_PTR, T_TXT, T_AAAA, T_OPT, T_ANY = 1, 2, 6, 12, 16, 28, 41, 255
C_IN = 1

MIN_UDP = 512            # without EDNS (RFC 1035)
MAX_NAME = 255
MAX_LABEL = 63
MAX_QUERY = 4096         # bytes; no query of ours is larger (UDP: dropped unread)
MAX_ADDITIONAL = 4       # OPT, TSIG, ... in a query


class Drop(Exception):
    """Not worth an answer (a response, a runt); the reason is for counters."""


class QueryError(Exception):
    """Answer with ``rcode``; ``query`` is set when the question could be read."""

    def __init__(self, rcode: int, ident: int, flags: int, reason: str, query: Query | None = None):
        super().__init__(reason)
        self.rcode, self.ident, self.flags, self.query = rcode, ident, flags, query


class WireError(ValueError):
    """A message that does not hold together (upstream responses)."""


@dataclass(slots=True)
class Query:
    ident: int
    flags: int
    labels: tuple[bytes, ...]     # as sent (letter case kept)
    key: tuple[bytes, ...]        # lowercased labels: names compare case-insensitively
    qtype: int
    qclass: int
    question: bytes               # the question section, re-encoded from labels, as sent
    edns: bool = False
    udp_size: int = MIN_UDP       # the client's advertised payload size
    do: bool = False
    edns_version: int = 0

    @property
    def name(self) -> str:
        """Lowercase dotted name without the trailing dot ('' for the root)."""
        return ".".join(label.decode("ascii", "backslashreplace") for label in self.key)

    def limit(self, tcp: bool, server_max: int) -> int:
        """The largest reply this client may get on this transport."""
        if tcp:
            return 65535
        return max(MIN_UDP, min(self.udp_size, server_max)) if self.edns else MIN_UDP


def encode_name(labels) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


def parse_query(data: bytes) -> Query:
    if len(data) < 12:
        raise Drop("runt")
    ident, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & QR:
        raise Drop("response")
    if flags & OPCODE:
        raise QueryError(NOTIMP, ident, flags, "opcode not QUERY")
    # Cheap checks before the codec sees it: a query has one question, nothing in the
    # answer and authority sections, a few additional records (OPT, TSIG) and fits in
    # MAX_QUERY bytes. (dnslib follows pointer chains recursively: a 64 KB message of
    # chained names costs it seconds.)
    if qd != 1:
        raise QueryError(FORMERR, ident, flags, f"{qd} questions")
    if an or ns or ar > MAX_ADDITIONAL:
        raise QueryError(FORMERR, ident, flags, f"records in a query: {an}/{ns}/{ar}")
    if len(data) > MAX_QUERY:
        raise QueryError(FORMERR, ident, flags, f"{len(data)}-byte query")
    try:
        record = DNSRecord.parse(data)
    except Exception as exc:       # dnslib raises DNSError, but a hostile message may
        raise QueryError(FORMERR, ident, flags, f"unparsable: {exc}") from None  # find others
    question = record.questions[0]
    labels = tuple(question.qname.label)
    if any(not 0 < len(label) <= MAX_LABEL for label in labels):
        raise QueryError(FORMERR, ident, flags, "bad label length")
    qwire = encode_name(labels)
    if len(qwire) > MAX_NAME:
        raise QueryError(FORMERR, ident, flags, "name longer than 255 bytes")
    query = Query(ident, flags, labels, tuple(label.lower() for label in labels),
                  question.qtype, question.qclass, qwire + struct.pack("!HH", question.qtype, question.qclass))
    opts = [rr for rr in record.ar if rr.rtype == T_OPT]
    if len(opts) > 1 or (opts and opts[0].rname.label):
        raise QueryError(FORMERR, ident, flags, "bad OPT record", query)
    if opts:
        opt = opts[0]
        query.edns = True
        query.udp_size = opt.rclass
        query.do = bool(opt.ttl & 0x8000)
        query.edns_version = (opt.ttl >> 16) & 0xFF
    if query.edns_version > 0:
        raise QueryError(BADVERS, ident, flags, f"EDNS version {query.edns_version}", query)
    return query


def opt_record(udp_size: int, do: bool = False, ext_rcode: int = 0) -> bytes:
    return b"\0" + RR_FIXED.pack(T_OPT, udp_size, (ext_rcode << 24) | (0x8000 if do else 0), 0)


def response_flags(query_flags: int, extra: int) -> int:
    """QR, the query's opcode, RD and CD, RA (we recurse for allowed clients), ``extra``."""
    return QR | RA | (query_flags & (OPCODE | RD | CD)) | extra


def error_reply(ident: int, query_flags: int, rcode: int, query: Query | None, server_udp: int) -> bytes:
    """A reply with no records: the question (when known), an OPT when the query had one."""
    ext, rcode4 = rcode >> 4, rcode & 0xF
    if query is None:
        return HEADER.pack(ident, response_flags(query_flags, rcode4), 0, 0, 0, 0)
    opt = opt_record(server_udp, query.do, ext) if query.edns else b""
    return (HEADER.pack(ident, response_flags(query_flags, rcode4), 1, 0, 0, 1 if opt else 0)
            + query.question + opt)


def truncated_reply(data: bytes, server_udp: int) -> bytes | None:
    """The rate limit's answer to the query ``data``: its question alone with TC set
    ("ask again over TCP"), and an OPT when the query's first additional record is one;
    None when ``data`` is no plain query worth that (then it is dropped).

    Read by hand, not by dnslib: this is what a flooding client gets, so it must cost
    far less than an answer (a few microseconds; the question is echoed as sent)."""
    n = len(data)
    if n < 17 or n > MAX_QUERY:
        return None
    ident, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & (QR | OPCODE) or qd != 1 or an or ns:
        return None
    off = 12
    while True:                      # the question's name: plain labels, no pointers
        length = data[off] if off < n else 0xFF
        if length == 0:
            break
        if length > MAX_LABEL:
            return None
        off += 1 + length
        if off - 12 > MAX_NAME:
            return None
    end = off + 5                    # the root label, QTYPE, QCLASS
    if end > n:
        return None
    opt = b""
    if ar and end + 11 <= n and data[end] == 0 and data[end + 1:end + 3] == b"\0\x29":
        do = bool(data[end + 7] & 0x80)          # the DO bit of the OPT's TTL field
        opt = opt_record(server_udp, do)
    return (HEADER.pack(ident, response_flags(flags, TC), 1, 0, 0, 1 if opt else 0)
            + data[12:end] + opt)


def fit(message: bytes, limit: int, query: Query, server_udp: int) -> bytes:
    """``message`` if it fits in ``limit`` bytes, else its truncated form (TC set)."""
    if len(message) <= limit:
        return message
    flags = HEADER.unpack_from(message)[1] | TC
    opt = opt_record(server_udp, query.do) if query.edns else b""
    return HEADER.pack(query.ident, flags, 1, 0, 0, 1 if opt else 0) + query.question + opt


# --- scanning whole messages (upstream responses) ------------------------------------

def skip_name(data: bytes, off: int) -> int:
    """The offset after the name at ``off`` (a pointer ends it); bounds-checked."""
    n, length = len(data), 0
    while True:
        if off >= n:
            raise WireError("name runs past the end")
        b = data[off]
        if b == 0:
            return off + 1
        if b & 0xC0 == 0xC0:
            if off + 2 > n:
                raise WireError("pointer runs past the end")
            return off + 2
        if b & 0xC0:
            raise WireError("unknown label type")
        length += b + 1
        if length > MAX_NAME:
            raise WireError("name longer than 255 bytes")
        off += b + 1


@dataclass(slots=True)
class Record:
    start: int
    end: int
    rtype: int
    ttl: int
    ttl_at: int        # offset of the TTL field
    rdata_at: int
    section: int       # 1 answer, 2 authority, 3 additional


@dataclass(slots=True)
class Scan:
    ident: int
    flags: int
    question_end: int
    qdcount: int
    records: list

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def scan(data: bytes) -> Scan:
    if len(data) < 12:
        raise WireError("shorter than a header")
    ident, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    off = 12
    for _ in range(qd):
        off = skip_name(data, off) + 4
    if off > len(data):
        raise WireError("question runs past the end")
    qend, records = off, []
    for section, count in ((1, an), (2, ns), (3, ar)):
        for _ in range(count):
            start = off
            off = skip_name(data, off)
            if off + 10 > len(data):
                raise WireError("record runs past the end")
            rtype, _rclass, ttl, rdlen = RR_FIXED.unpack_from(data, off)
            ttl_at, rdata_at = off + 4, off + 10
            off = rdata_at + rdlen
            if off > len(data):
                raise WireError("rdata runs past the end")
            records.append(Record(start, off, rtype, ttl, ttl_at, rdata_at, section))
    return Scan(ident, flags, qend, qd, records)


def soa_minimum(data: bytes, record: Record) -> int:
    """The MINIMUM field of an SOA record: the last 32 bits of its rdata."""
    return TTL.unpack_from(data, record.end - 4)[0]


# --- templates ----------------------------------------------------------------------

@dataclass(slots=True)
class Template:
    """The part of an answer that does not depend on who asked."""
    flags: int                 # AA, AD, TC and the rcode's low 4 bits
    counts: tuple[int, int, int]
    body: bytes                # the records after the question (no OPT)
    ttl_at: tuple[int, ...]    # TTL fields, as offsets into body
    ttls: tuple[int, ...]
    stored: float = 0.0
    decrement: bool = True     # age the TTLs (cache) or not (authoritative answers)

    def render(self, query: Query, now: float, server_udp: int) -> bytes:
        body = self.body
        if self.decrement and self.ttl_at:
            age = int(now - self.stored)
            if age > 0:
                buf = bytearray(body)
                for off, ttl in zip(self.ttl_at, self.ttls):
                    TTL.pack_into(buf, off, max(0, ttl - age))
                body = bytes(buf)
        an, ns, ar = self.counts
        if query.edns:
            return (HEADER.pack(query.ident, response_flags(query.flags, self.flags), 1, an, ns, ar + 1)
                    + query.question + body + opt_record(server_udp, query.do))
        return HEADER.pack(query.ident, response_flags(query.flags, self.flags), 1, an, ns, ar) \
            + query.question + body


def template_from(data: bytes, parsed: Scan, ttl_cap: int | None = None, stored: float = 0.0,
                  decrement: bool = True, keep_flags: int = AA | AD | TC) -> Template:
    """A template of the response ``data`` (scanned as ``parsed``): its OPT record is
    dropped (each client gets its own), and of its flags only ``keep_flags`` and the
    rcode stay. Raises WireError when the OPT is not the last record (then the body
    cannot be cut without breaking compression pointers)."""
    records = parsed.records
    opts = [i for i, r in enumerate(records) if r.rtype == T_OPT]
    if opts and (len(opts) > 1 or opts[0] != len(records) - 1):
        raise WireError("OPT record not last")
    if opts:
        records = records[:-1]
    end = records[-1].end if records else parsed.question_end
    base = parsed.question_end
    body = bytearray(data[base:end])
    ttl_at, ttls = [], []
    for r in records:
        ttl = r.ttl if ttl_cap is None else min(r.ttl, ttl_cap)
        if ttl != r.ttl:
            TTL.pack_into(body, r.ttl_at - base, ttl)
        ttl_at.append(r.ttl_at - base)
        ttls.append(ttl)
    counts = [0, 0, 0]
    for r in records:
        counts[r.section - 1] += 1
    return Template(parsed.flags & (keep_flags | 0xF), tuple(counts), bytes(body), tuple(ttl_at),
                    tuple(ttls), stored, decrement)
