"""Targets for the byte-level codecs: SAL header, IPv4/TCP, pcap, registration."""
import hashlib
import hmac
import struct

from sal import registration as reg
from sal import wire
from sal.checksum import checksum
from sal.ip import IPv4, TCP, clamp_mss, transport_checksum, transport_checksum_ok
from sal.pcap import PcapError, read_pcap
from sal.serviceid import ServicePrefix, service_id_for
from sal.wire import MalformedPacket

from .base import Target
from .common import Finding, mutate, random_bytes, require

SID = service_id_for("web.svc.example", 80)


def random_extension(r, flows=()):
    k = r.randrange(10)
    if k < 3:
        flags = r.choice((wire.SYN, wire.SYN | wire.ACK, wire.ACK, wire.FIN, wire.FIN | wire.ACK,
                          wire.RST, wire.RSYN, wire.RSYN | wire.ACK, r.getrandbits(8)))
        return wire.Control(flags, r.getrandbits(32), r.getrandbits(32), r.randbytes(8),
                            r.getrandbits(8) if r.random() < 0.1 else 0)
    if k < 5:
        return wire.Service(SID if r.random() < 0.5 else r.randbytes(32),
                            r.getrandbits(16) if r.random() < 0.1 else 0)
    if k < 7:
        n = 1 + r.randrange(3) if r.random() < 0.9 else r.randrange(1, 63)
        return wire.Source([r.randbytes(4) for _ in range(n)])
    if k < 8:
        return wire.Pad()
    kind = r.choice((wire.EXT_ADDRESS, 5, 7, 15))
    n = 2 + r.randrange(30) if r.random() < 0.9 else 2 + r.randrange(254)
    raw = bytes((kind << 4 | r.getrandbits(4), n)) + r.randbytes(n - 2)
    return wire.OtherExtension(kind, raw)


def random_sal_header(r, max_ext: int = 4) -> wire.SalHeader:
    exts = [random_extension(r) for _ in range(r.randrange(max_ext + 1))]
    size = sum(len(e.encode()) for e in exts)
    exts += [wire.Pad() for _ in range(-size % 4)]
    return wire.SalHeader(r.getrandbits(32), r.getrandbits(32), 6 if r.random() < 0.9 else r.getrandbits(8), exts)


class SalDecode(Target):
    name = "sal_wire"
    description = "sal.wire.decode (and encode of what it decodes)"

    def __init__(self):
        r = __import__("random").Random(7)
        self.seeds = [random_sal_header(r).encode() + r.randbytes(r.randrange(24)) for _ in range(64)]
        self.seeds.append(wire.base_header(1, 2))

    def generate(self, r):
        k = r.random()
        if k < 0.15:
            data = random_bytes(r, 64)
        elif k < 0.6:
            data = mutate(r.choice(self.seeds), r, self.seeds)
            if r.random() < 0.5 and len(data) >= 12:
                data = _fix_sal_checksum(data)
        else:
            data = random_sal_header(r, 12 if r.random() < 0.1 else 4)
            data = data.encode() if len(data.extensions) <= wire.MAX_EXTENSIONS and \
                sum(len(e.encode()) for e in data.extensions) <= 1008 else bytes(12)
            data += r.randbytes(r.randrange(8))
        offset = r.randrange(4) if r.random() < 0.2 else 0
        return bytes(offset) + data, offset

    def run(self, inp) -> None:
        data, offset = inp
        try:
            hdr, end = wire.decode(data, offset)
        except MalformedPacket:
            return
        require(offset + 12 <= end <= len(data), f"transport offset {end} outside the buffer")
        require(end - offset == data[offset + 8] * 4, "header length is not the words field")
        require(len(hdr.extensions) <= wire.MAX_EXTENSIONS, "more extensions than allowed")
        # what decodes encodes again, to the same length, and decodes to the same
        again = hdr.encode()
        require(len(again) == end - offset, "re-encoding changed the header length")
        hdr2, end2 = wire.decode(again)
        require(hdr2.checksum_ok and end2 == len(again), "re-encoded header does not verify")
        require(hdr2.extensions == hdr.extensions and (hdr2.src_flow, hdr2.dst_flow, hdr2.protocol)
                == (hdr.src_flow, hdr.dst_flow, hdr.protocol), "decode(encode(h)) != h")
        if hdr.checksum_ok and _canonical(data[offset:end]):
            require(again == bytes(data[offset:end]), "a verified canonical header re-encodes differently")


def _canonical(head: bytes) -> bool:
    """Headers whose every bit the codec keeps (PAD bytes zero, SOURCE reserved zero)."""
    pos = 12
    while pos < len(head):
        kind = head[pos] >> 4
        if kind == wire.EXT_PAD:
            if head[pos]:
                return False
            pos += 1
            continue
        if kind == wire.EXT_SOURCE and head[pos + 2:pos + 4] != b"\0\0":
            return False
        if kind in (wire.EXT_CONTROL, wire.EXT_SERVICE, wire.EXT_SOURCE) and head[pos] & 15:
            return False
        pos += head[pos + 1]
    return True


def _fix_sal_checksum(data: bytes) -> bytes:
    hlen = data[8] * 4
    if hlen < 12 or hlen > len(data):
        return data
    head = bytearray(data[:hlen])
    head[10:12] = b"\0\0"
    head[10:12] = checksum(bytes(head)).to_bytes(2, "big")
    return bytes(head) + data[hlen:]


def _tcp_segment(r, src=bytes(4), dst=bytes(4)) -> bytes:
    opts = b""
    if r.random() < 0.5:
        parts = []
        for _ in range(r.randrange(4)):
            kind = r.choice((0, 1, 2, 2, 3, 4, 8, r.getrandbits(8)))
            if kind in (0, 1):
                parts.append(bytes((kind,)))
            elif kind == 2:
                parts.append(struct.pack("!BBH", 2, 4 if r.random() < 0.9 else r.getrandbits(8), r.getrandbits(16)))
            else:
                n = r.randrange(12)
                parts.append(bytes((kind, n)) + r.randbytes(max(0, n - 2)))
        opts = b"".join(parts)
        opts += bytes(-len(opts) % 4)
        opts = opts[:40]
    off = (20 + len(opts)) // 4
    seg = struct.pack("!HHIIBBHHH", r.getrandbits(16), r.getrandbits(16), r.getrandbits(32),
                      r.getrandbits(32), off << 4, r.getrandbits(8), r.getrandbits(16), 0, 0) + opts \
        + r.randbytes(r.randrange(16))
    csum = transport_checksum(src, dst, 6, seg, 16)
    return seg[:16] + csum.to_bytes(2, "big") + seg[18:]


class IPParse(Target):
    name = "sal_ip"
    description = "sal.ip IPv4, TCP and clamp_mss"

    def generate(self, r):
        k = r.random()
        if k < 0.3:
            return random_bytes(r, 80), r.randrange(4), r.choice((536, 1400, 1448, 1460, r.getrandbits(16)))
        from gateway.translate.carriage import ip_header
        seg = _tcp_segment(r, b"\1\2\3\4", b"\5\6\7\x08")
        pkt = ip_header(b"\1\2\3\4", b"\5\6\7\x08", 6, 20 + len(seg), r.getrandbits(16), 64, 0,
                        r.choice((0, 0x4000, 0x2000, r.getrandbits(16)))) + seg
        if r.random() < 0.7:
            pkt = mutate(pkt, r)
        return pkt, 0, r.choice((536, 1400, 1448, 1460, r.getrandbits(16)))

    def run(self, inp) -> None:
        data, pos, mss = inp
        try:
            ip = IPv4(data)
        except MalformedPacket:
            ip = None
        if ip is not None:
            require(20 <= ip.ihl <= ip.total_length <= len(data), "IPv4 accepted bad lengths")
            data = data[:ip.total_length]
            pos = ip.ihl
        try:
            tcp = TCP(data, pos)
        except MalformedPacket:
            return
        require(20 <= tcp.offset and pos + tcp.offset <= len(data), "TCP accepted a bad offset")
        seg = bytearray(data[pos:])
        ok = ip is not None and transport_checksum_ok(ip.src, ip.dst, 6, bytes(seg))
        before = bytes(seg)
        changed = clamp_mss(seg, tcp.offset, mss)
        require(len(seg) == len(before), "clamp_mss changed the length")
        if changed is None:
            require(bytes(seg) == before, "clamp_mss changed a segment and said nothing")
            return
        old, new = changed
        diff = [i for i in range(len(seg)) if seg[i] != before[i]]
        require(diff and all(20 <= i < tcp.offset for i in diff) and diff[-1] - diff[0] <= 1,
                "clamp_mss wrote outside one option field")
        at = diff[-1] - 1 if seg[diff[-1] - 1:diff[-1] + 1] == mss.to_bytes(2, "big") else diff[0]
        require(seg[at:at + 2] == mss.to_bytes(2, "big") and int.from_bytes(before[at:at + 2], "big") > mss,
                "clamp_mss did not lower the MSS to the limit")
        if ok:
            from sal.checksum import update16
            csum = update16(struct.unpack_from("!H", seg, 16)[0], old, new)
            seg[16:18] = csum.to_bytes(2, "big")
            require(transport_checksum_ok(ip.src, ip.dst, 6, bytes(seg)), "MSS checksum update is wrong")


_PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")


class Pcap(Target):
    name = "sal_pcap"
    description = "sal.pcap.read_pcap"

    def generate(self, r):
        if r.random() < 0.1:
            return random_bytes(r, 64)
        magic = r.choice(_PCAP_MAGICS)
        e = "<" if magic[0] in (0xd4, 0x4d) else ">"
        link = r.choice((1, 101, 113, 228, 0, r.getrandbits(32)))
        out = bytearray(magic + struct.pack(e + "HHiIII", 2, 4, 0, 0, 65535, link))
        for _ in range(r.randrange(5)):
            kind = r.randrange(4)
            if kind == 0:
                frame = b"\0" * 12 + b"\x08\x00" + bytes((0x45,)) + r.randbytes(r.randrange(40))
            elif kind == 1:
                frame = b"\0" * 12 + b"\x81\x00" * (1 + r.randrange(3)) + r.randbytes(r.randrange(20))
            elif kind == 2:
                frame = bytes(14) + b"\x08\x00" + r.randbytes(r.randrange(30))
            else:
                frame = r.randbytes(r.randrange(30))
            caplen = len(frame) if r.random() < 0.9 else r.getrandbits(32)
            out += struct.pack(e + "IIII", r.getrandbits(32), r.getrandbits(32), caplen, len(frame)) + frame
        data = bytes(out)
        return mutate(data, r) if r.random() < 0.4 else data

    def run(self, data) -> None:
        try:
            for item in read_pcap(data):
                require(isinstance(item, tuple) and len(item) == 2, "pcap record is not a pair")
                ts, pkt = item
                require(isinstance(ts, float), "timestamp is not a float")
                require(pkt is None or isinstance(pkt, bytes), "packet is not bytes or None")
        except PcapError:
            pass


KEY = reg.Key("deployment", bytes(range(32)))
OTHER_KEY = reg.Key("web-only", bytes(range(1, 33)), ("web.*",))


def random_message(r) -> reg.Message:
    kind = r.choice((reg.REGISTER, reg.UNREGISTER, reg.ACK, reg.PROBE, reg.PROBE_ACK))
    msg = reg.Message(kind, r.getrandbits(64), r.choice(("deployment", "web-only", "k" * 32)),
                      r.choice(("sgw0", "sgw1", "s" * 64, "ü")))
    if kind in (reg.REGISTER, reg.UNREGISTER):
        msg.address = r.randbytes(4)
        msg.hold_ms = r.getrandbits(32) if kind == reg.REGISTER else 0
        for _ in range(r.randrange(4) if r.random() < 0.95 else 255):
            name = r.choice(("web.svc.example", "api.svc.example", "x", "é" * 3, "a" * 255))
            port = r.getrandbits(16)
            bits = r.choice((256, 224, 0, r.randrange(257)))
            sid = service_id_for(name, port) if r.random() < 0.7 else r.randbytes(32)
            msg.records.append(reg.Record(name, ServicePrefix(sid, bits), 1 + r.getrandbits(16) % 65535,
                                          r.getrandbits(16)))
    elif kind in (reg.ACK, reg.PROBE_ACK):
        msg.acked_seq = r.getrandbits(64)
        msg.status = r.getrandbits(8)
    return msg


class Registration(Target):
    name = "sal_registration"
    description = "sal.registration decode/encode and Verifier.check"

    def generate(self, r):
        k = r.random()
        key = KEY if r.random() < 0.8 else OTHER_KEY
        if k < 0.1:
            return random_bytes(r, 120), r.getrandbits(64)
        msg = random_message(r)
        try:
            data = reg.encode(msg, key.secret)
        except ValueError:
            data = b"SR\x01" + r.randbytes(60)
        if k < 0.6:
            data = mutate(data, r)
            if r.random() < 0.7 and len(data) > 32:      # re-sign, so the parser is reached
                body = data[:-32]
                data = body + hmac.new(key.secret, body, hashlib.sha256).digest()
        wall = msg.seq + r.choice((0, 1, -1, 10**9, 31 * 10**9, r.getrandbits(64)))
        return data, wall

    def run(self, inp) -> None:
        data, wall = inp
        for key in (KEY, OTHER_KEY):
            try:
                reg.peek_key_id(data)
                msg = reg.decode(data, key.secret)
            except reg.Refused:
                continue
            # what decodes encodes to what decodes the same (prefix bits past the
            # length are zeroed, so the bytes may differ)
            require(reg.decode(reg.encode(msg, key.secret), key.secret) == msg, "decode(encode(m)) != m")
            for r in msg.records:
                reg.owns(key, r)
        stats = __import__("collections").Counter()
        verifier = reg.Verifier([KEY, OTHER_KEY], stats)
        for _ in range(2):
            try:
                verifier.check(data, wall)
            except reg.Refused:
                pass
        require(sum(stats.values()) >= 1, "a replayed message was accepted twice")


TARGETS = [SalDecode, IPParse, Pcap, Registration]
