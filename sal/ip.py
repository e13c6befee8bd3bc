"""IPv4, TCP and UDP headers: just enough parsing and building for translation.

Addresses are 4-byte ``bytes`` here; text forms are for the edges (config, logs).
"""
import socket
import struct

from .checksum import checksum, ones_sum, fold
from .wire import MalformedPacket

PROTO_TCP, PROTO_UDP = 6, 17
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP_FIXED = struct.Struct("!HHIIBBHHH")

# TCP flags
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def aton(text: str) -> bytes:
    return socket.inet_aton(text)


def ntoa(addr: bytes) -> str:
    return socket.inet_ntoa(addr)


class IPv4:
    """A parsed IPv4 header (the fields translation needs)."""

    __slots__ = ("ihl", "tos", "total_length", "ident", "frag", "ttl", "protocol", "src", "dst")

    def __init__(self, buf: bytes):
        if len(buf) < 20:
            raise MalformedPacket("ip_truncated", f"{len(buf)} bytes")
        vihl, self.tos, self.total_length, self.ident, self.frag, self.ttl, self.protocol, _, \
            self.src, self.dst = _IPV4.unpack_from(buf)
        if vihl >> 4 != 4:
            raise MalformedPacket("ip_not_v4", f"version {vihl >> 4}")
        self.ihl = (vihl & 15) * 4
        if self.ihl < 20 or self.total_length < self.ihl:
            raise MalformedPacket("ip_bad_header", f"ihl {self.ihl} total {self.total_length}")
        if self.total_length > len(buf):
            raise MalformedPacket("ip_truncated", f"total length {self.total_length}, have {len(buf)}")

    @property
    def is_fragment(self) -> bool:
        return bool(self.frag & 0x3FFF)  # MF set or a non-zero offset


def ipv4_header(src: bytes, dst: bytes, protocol: int, payload_len: int,
                ident: int = 0, ttl: int = 64, tos: int = 0, dont_fragment: bool = False) -> bytes:
    head = _IPV4.pack(0x45, tos, 20 + payload_len, ident, 0x4000 if dont_fragment else 0,
                      ttl, protocol, 0, src, dst)
    return head[:10] + checksum(head).to_bytes(2, "big") + head[12:]


class TCP:
    """The fixed TCP header fields, parsed from a TCP segment."""

    __slots__ = ("sport", "dport", "seq", "ack", "offset", "flags", "window", "checksum", "urgent")

    def __init__(self, seg: bytes, pos: int = 0):
        if len(seg) - pos < 20:
            raise MalformedPacket("tcp_truncated", f"{len(seg) - pos} bytes")
        self.sport, self.dport, self.seq, self.ack, off, self.flags, self.window, \
            self.checksum, self.urgent = _TCP_FIXED.unpack_from(seg, pos)
        self.offset = (off >> 4) * 4
        if self.offset < 20 or pos + self.offset > len(seg):
            raise MalformedPacket("tcp_bad_offset", f"data offset {self.offset}")


def tcp_flag_names(flags: int) -> str:
    names = [n for b, n in ((TCP_SYN, "S"), (TCP_FIN, "F"), (TCP_RST, "R"), (TCP_PSH, "P"), (TCP_ACK, "."))
             if flags & b]
    return "".join(names) or "-"


def transport_checksum(src: bytes, dst: bytes, protocol: int, segment: bytes, field_at: int) -> int:
    """Full TCP/UDP checksum over ``segment`` with its checksum field (at ``field_at``) zeroed."""
    seg = segment[:field_at] + b"\0\0" + segment[field_at + 2:]
    return ~fold(ones_sum(src + dst) + protocol + len(seg) + ones_sum(seg)) & 0xFFFF


def transport_checksum_ok(src: bytes, dst: bytes, protocol: int, segment: bytes) -> bool:
    """True when a TCP or UDP segment's checksum verifies (UDP 0 means none: accepted)."""
    if protocol == PROTO_UDP and segment[6:8] == b"\0\0":
        return True
    total = fold(ones_sum(src + dst) + protocol + len(segment) + ones_sum(segment))
    return total == 0xFFFF


def clamp_mss(segment: bytearray, offset: int, mss: int) -> tuple[int, int] | None:
    """Lower the MSS option of a SYN in place; returns (old, new) 16-bit words for a
    checksum update, or None when there was nothing to lower. An MSS at an odd offset
    straddles two checksum words: its words are returned byte-swapped, as they count
    in the sum."""
    pos = 20
    offset = min(offset, len(segment))
    while pos < offset:
        kind = segment[pos]
        if kind == 0:
            break
        if kind == 1:
            pos += 1
            continue
        if pos + 1 >= offset:
            break
        length = segment[pos + 1]
        if length < 2:
            break
        if kind == 2 and length == 4 and pos + 4 <= offset:
            old = int.from_bytes(segment[pos + 2:pos + 4], "big")
            if old > mss:
                segment[pos + 2:pos + 4] = mss.to_bytes(2, "big")
                if pos & 1:
                    return _swap16(old), _swap16(mss)
                return old, mss
            return None
        pos += length
    return None


def _swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)
