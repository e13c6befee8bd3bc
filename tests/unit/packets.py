"""Builders for legacy IPv4/TCP packets used by the unit tests (correct checksums)."""
import struct

from sal.ip import aton, transport_checksum
from gateway.translate.carriage import ip_header

SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08


def tcp_packet(src: str, sport: int, dst: str, dport: int, seq: int, ack: int = 0,
               flags: int = ACK, payload: bytes = b"", mss: int | None = None, ident: int = 1) -> bytes:
    opts = b"" if mss is None else struct.pack("!BBH", 2, 4, mss)
    off = (20 + len(opts)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0, 0) + opts + payload
    s, d = aton(src), aton(dst)
    csum = transport_checksum(s, d, 6, seg, 16)
    seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
    return ip_header(s, d, 6, 20 + len(seg), ident, 64, 0, 0x4000) + seg
