"""What every target shares: byte mutation, a Random that reads its choices from fuzz
input (for atheris), and the checks of emitted packets."""
import random
import struct

from sal import wire
from sal.checksum import checksum
from sal.ip import IPv4, PROTO_UDP, transport_checksum_ok
from sal.wire import MalformedPacket

INTERESTING8 = (0, 1, 2, 3, 4, 0x0F, 0x10, 0x20, 0x3F, 0x40, 0x45, 0x7F, 0x80, 0xC0, 0xFE, 0xFF)
INTERESTING16 = (0, 1, 3, 5, 12, 20, 36, 40, 0x7F, 0xFF, 0x100, 576, 1460, 1500, 0x7FFF,
                 0x8000, 0xFFFE, 0xFFFF)


class Finding(AssertionError):
    """A property that did not hold."""


def require(cond, what: str) -> None:
    if not cond:
        raise Finding(what)


# --- mutation ---------------------------------------------------------------------------

def mutate(data: bytes, r, others=(), max_len: int = 4096) -> bytes:
    """A few random edits of ``data`` (bit flips, interesting values, inserts, deletes,
    truncation, splices with ``others``)."""
    buf = bytearray(data)
    for _ in range(1 + (r.getrandbits(3) % 4 if r.random() < 0.5 else 0)):
        op = r.randrange(11)
        n = len(buf)
        if op == 0 and n:
            i = r.randrange(n)
            buf[i] ^= 1 << r.randrange(8)
        elif op == 1 and n:
            buf[r.randrange(n)] = r.getrandbits(8)
        elif op == 2 and n:
            buf[r.randrange(n)] = r.choice(INTERESTING8)
        elif op == 3 and n >= 2:
            i = r.randrange(n - 1)
            buf[i:i + 2] = struct.pack("!H", r.choice(INTERESTING16))
        elif op == 4:
            i = r.randrange(n + 1)
            buf[i:i] = r.randbytes(1 + r.randrange(8))
        elif op == 5 and n:
            i = r.randrange(n)
            del buf[i:i + 1 + r.randrange(min(16, n - i))]
        elif op == 6 and n:
            del buf[r.randrange(n + 1):]
        elif op == 7 and n:
            i = r.randrange(n)
            j = min(n, i + 1 + r.randrange(32))
            k = r.randrange(n + 1)
            buf[k:k] = buf[i:j]
        elif op == 8 and others:
            other = r.choice(others)
            if other:
                i = r.randrange(len(other))
                k = r.randrange(n + 1)
                buf[k:] = other[i:]
        elif op == 9 and n:
            i = r.randrange(n)
            buf[i] = (buf[i] + r.choice((1, 2, 255, 254, 16, 240))) & 0xFF
        elif op == 10:
            buf += r.randbytes(1 + r.randrange(16))
    return bytes(buf[:max_len])


def random_bytes(r, max_len: int = 96) -> bytes:
    n = r.randrange(max_len + 1) if r.random() < 0.9 else r.randrange(1600)
    return r.randbytes(n)


class BytesRandom(random.Random):
    """A Random whose choices are read from ``data`` (zeros once it runs out), so that a
    coverage-guided fuzzer (atheris) mutates the choices of a structured generator."""

    def __init__(self, data: bytes):
        super().__init__(0)
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> int:
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return int.from_bytes(chunk.ljust(n, b"\0"), "little")

    def getrandbits(self, k: int) -> int:
        if k <= 0:
            return 0
        return self._take((k + 7) // 8) & ((1 << k) - 1)

    def random(self) -> float:
        return self._take(2) / 65536.0

    def randbytes(self, n: int) -> bytes:
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return bytes(chunk).ljust(n, b"\0")


# --- checks of emitted packets ----------------------------------------------------------

def check_ipv4(pkt) -> IPv4:
    """A well-formed IPv4 packet: parses, length is its total length, header checksum."""
    require(type(pkt) is bytes, f"emitted {type(pkt).__name__}, not bytes")
    try:
        ip = IPv4(pkt)
    except MalformedPacket as exc:
        raise Finding(f"emitted a malformed IPv4 packet: {exc}") from None
    require(len(pkt) == ip.total_length, f"length {len(pkt)} != total length {ip.total_length}")
    require(checksum(pkt[:ip.ihl]) == 0, "IPv4 header checksum does not verify")
    require(not ip.frag & 0x3FFF, "emitted a fragment")
    return ip


def sal_body(pkt: bytes, ip: IPv4, carriage: str) -> bytes:
    if carriage == "udp":
        require(ip.protocol == PROTO_UDP, f"SAL over UDP has protocol {ip.protocol}")
        udp = pkt[ip.ihl:]
        require(len(udp) >= 8, "UDP header truncated")
        require(struct.unpack_from("!H", udp, 4)[0] == len(udp), "UDP length != payload")
        if udp[6:8] != b"\0\0":
            require(transport_checksum_ok(ip.src, ip.dst, PROTO_UDP, udp), "UDP checksum")
        return udp[8:]
    require(ip.protocol == wire.PROTO_SAL, f"SAL packet with protocol {ip.protocol}")
    return pkt[ip.ihl:]


def check_sal(pkt, carriage: str, transport_valid: bool):
    """A well-formed SAL packet: IPv4 checks, SAL header decodes and its checksum
    verifies, the transport inside has ports zero and (when the input's did) a TCP
    checksum that verifies over the carriage's pseudo-header."""
    ip = check_ipv4(pkt)
    body = sal_body(pkt, ip, carriage)
    try:
        hdr, off = wire.decode(body)
    except MalformedPacket as exc:
        raise Finding(f"emitted an undecodable SAL header: {exc}") from None
    require(hdr.checksum_ok, "SAL checksum does not verify")
    require(hdr.protocol == 6, "SAL transport protocol is not TCP")
    seg = body[off:]
    if seg:
        require(len(seg) >= 20, f"SAL transport of {len(seg)} bytes")
        if transport_valid:
            pseudo = (ip.src, ip.dst) if carriage == "ip" else (bytes(4), bytes(4))
            require(transport_checksum_ok(*pseudo, 6, seg), "SAL transport checksum does not verify")
    return ip, hdr, seg


def check_legacy(pkt, transport_valid: bool) -> IPv4:
    ip = check_ipv4(pkt)
    require(ip.protocol == 6, f"legacy packet with protocol {ip.protocol}")
    seg = pkt[ip.ihl:]
    require(len(seg) >= 20, "legacy TCP segment truncated")
    if transport_valid:
        require(transport_checksum_ok(ip.src, ip.dst, 6, seg), "legacy TCP checksum does not verify")
    return ip


def fix_ipv4(pkt: bytes) -> bytes:
    """Total length and header checksum made right (so a mutation gets past them)."""
    if len(pkt) < 20:
        return pkt
    buf = bytearray(pkt)
    ihl = (buf[0] & 15) * 4
    if ihl < 20 or ihl > len(buf):
        return pkt
    buf[2:4] = struct.pack("!H", min(len(buf), 0xFFFF))
    buf[10:12] = b"\0\0"
    buf[10:12] = struct.pack("!H", checksum(bytes(buf[:ihl])))
    return bytes(buf)


def fix_sal(pkt: bytes, sal_at: int) -> bytes:
    """The SAL checksum made right, when the header's length fits."""
    if len(pkt) < sal_at + 12:
        return pkt
    hlen = pkt[sal_at + 8] * 4
    if hlen < 12 or sal_at + hlen > len(pkt):
        return pkt
    head = bytearray(pkt[sal_at:sal_at + hlen])
    head[10:12] = b"\0\0"
    head[10:12] = struct.pack("!H", checksum(bytes(head)))
    return pkt[:sal_at] + bytes(head) + pkt[sal_at + hlen:]


def format_input(inp) -> str:
    return repr(inp)
