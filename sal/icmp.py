"""ICMPv4 error messages: parsing the ones routers send, building the ones we send.

An error (destination unreachable, time exceeded) quotes the start of the packet that
caused it: its IP header and at least 8 bytes after it (RFC 792); routers quote as much
as fits in 576 bytes (RFC 1812), which is what lets a gateway find the SAL flow of a
quoted packet by its flowIDs.
"""
import struct

from .checksum import checksum
from .ip import PROTO_TCP, ipv4_header
from .wire import MalformedPacket

PROTO_ICMP = 1
DEST_UNREACH, TIME_EXCEEDED = 3, 11
# destination unreachable codes
NET_UNREACH, HOST_UNREACH, PROTO_UNREACH, PORT_UNREACH, FRAG_NEEDED = 0, 1, 2, 3, 4
ADMIN_PROHIBITED = 13
MIN_MTU = 576                 # what every IPv4 link carries; a smaller "MTU" is not believed
QUOTE_LIMIT = 576 - 20 - 8    # quoted bytes in an error we build (RFC 1812)
# RFC 1191's plateau table, for a router that says "fragmentation needed" without an MTU
_PLATEAUS = (65535, 32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68)

_ICMP = struct.Struct("!BBHHH")


class IcmpError:
    """A parsed ICMP error: ``type``, ``code``, ``mtu`` (next-hop MTU of a frag-needed,
    else 0), ``src`` (who sent the error) and the quoted packet: ``quoted`` (its bytes,
    as many as were quoted), ``quoted_ihl``, ``quoted_protocol``, ``quoted_src``,
    ``quoted_dst``, ``quoted_length`` (the total length its IP header claims)."""

    __slots__ = ("type", "code", "mtu", "src", "quoted", "quoted_ihl", "quoted_protocol",
                 "quoted_src", "quoted_dst", "quoted_length")

    def __init__(self, pkt: bytes, ihl: int):
        if len(pkt) < ihl + 8 + 20:
            raise MalformedPacket("icmp_truncated", f"{len(pkt)} bytes")
        if checksum(pkt[ihl:]) != 0:
            raise MalformedPacket("icmp_bad_checksum")
        self.type, self.code, _, _, mtu = _ICMP.unpack_from(pkt, ihl)
        self.src = pkt[12:16]
        self.quoted = pkt[ihl + 8:]
        q = self.quoted
        if q[0] >> 4 != 4 or (q[0] & 15) < 5:
            raise MalformedPacket("icmp_bad_quote", "quoted header is not IPv4")
        self.quoted_ihl = (q[0] & 15) * 4
        if len(q) < self.quoted_ihl + 8:
            raise MalformedPacket("icmp_bad_quote", f"{len(q)} quoted bytes")
        self.quoted_protocol = q[9]
        self.quoted_src, self.quoted_dst = q[12:16], q[16:20]
        self.quoted_length = int.from_bytes(q[2:4], "big")
        self.mtu = mtu if self.type == DEST_UNREACH and self.code == FRAG_NEEDED else 0

    @property
    def frag_needed(self) -> bool:
        return self.type == DEST_UNREACH and self.code == FRAG_NEEDED

    @property
    def body(self) -> bytes:
        """The quoted bytes after the quoted IP header."""
        return self.quoted[self.quoted_ihl:]

    def next_hop_mtu(self) -> int:
        """The MTU a frag-needed reports; from an old router that leaves it 0, the next
        plateau below the quoted packet's length (RFC 1191). Never below MIN_MTU."""
        mtu = self.mtu
        if not mtu:
            mtu = next((p for p in _PLATEAUS if p < self.quoted_length), MIN_MTU)
        return max(mtu, MIN_MTU)


def parse(pkt: bytes) -> IcmpError | None:
    """The ICMP error in an IPv4 packet, or None when it is another ICMP message (an
    echo, a redirect). Raises MalformedPacket for a damaged one."""
    ihl = (pkt[0] & 15) * 4
    if len(pkt) < ihl + 8:
        raise MalformedPacket("icmp_truncated", f"{len(pkt)} bytes")
    if pkt[ihl] not in (DEST_UNREACH, TIME_EXCEEDED):
        return None
    return IcmpError(pkt, ihl)


def build_error(src: bytes, dst: bytes, icmp_type: int, code: int, quoted: bytes,
                mtu: int = 0, ttl: int = 64) -> bytes:
    """An ICMP error from ``src`` to ``dst`` quoting ``quoted`` (cut to RFC 1812's 576
    bytes); ``mtu`` is the next-hop MTU of a frag-needed."""
    quoted = quoted[:QUOTE_LIMIT]
    head = _ICMP.pack(icmp_type, code, 0, 0, mtu)
    csum = checksum(head + quoted)
    icmp = head[:2] + csum.to_bytes(2, "big") + head[4:] + quoted
    return ipv4_header(src, dst, PROTO_ICMP, len(icmp), ttl=ttl) + icmp


def quoted_tcp(quoted: bytes) -> tuple[int, int, int] | None:
    """(source port, destination port, sequence number) of a quoted TCP packet, or None
    when fewer than 8 bytes of TCP were quoted or it is not TCP."""
    ihl = (quoted[0] & 15) * 4
    if quoted[9] != PROTO_TCP or len(quoted) < ihl + 8:
        return None
    return struct.unpack_from("!HHI", quoted, ihl)
