"""How SAL packets travel between gateways: directly over IP (protocol 144) or in UDP.

Over UDP the transport checksum inside uses a pseudo-header with zero addresses, so that
a NAT rewriting the outer header leaves it valid (the reference never implemented UDP
carriage, so there is nothing to be compatible with; see docs/protocol.md).
"""
import struct

from sal.checksum import checksum, fold, ones_sum
from sal.ip import PROTO_UDP
from sal.wire import PROTO_SAL

UDP_PORT_CLIENT, UDP_PORT_SERVER = 54324, 54325
ZERO_ADDR = b"\0\0\0\0"
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def ip_header(src: bytes, dst: bytes, protocol: int, total: int, ident: int, ttl: int,
              tos: int, frag: int) -> bytes:
    head = _IPV4.pack(0x45, tos, total, ident, frag, ttl, protocol, 0, src, dst)
    return head[:10] + checksum(head).to_bytes(2, "big") + head[12:]


class IPCarriage:
    name = "ip"
    overhead = 0

    def pseudo(self, src: bytes, dst: bytes) -> tuple[bytes, bytes]:
        return src, dst

    def wrap(self, src: bytes, dst: bytes, body: bytes, peer_port: int, ident: int = 0,
             ttl: int = 64, tos: int = 0, frag: int = 0) -> bytes:
        return ip_header(src, dst, PROTO_SAL, 20 + len(body), ident, ttl, tos, frag) + body

    def unwrap(self, pkt: bytes, ihl: int, protocol: int, total: int):
        """(SAL body, peer port) of an inbound packet, or None when it is not SAL."""
        if protocol != PROTO_SAL:
            return None
        return pkt[ihl:total], 0


class UDPCarriage:
    name = "udp"
    overhead = 8

    def __init__(self, local_port: int, peer_port: int):
        self.local_port = local_port
        self.peer_port = peer_port     # default for a new flow; replies go to the port seen

    def pseudo(self, src: bytes, dst: bytes) -> tuple[bytes, bytes]:
        return ZERO_ADDR, ZERO_ADDR

    def wrap(self, src: bytes, dst: bytes, body: bytes, peer_port: int, ident: int = 0,
             ttl: int = 64, tos: int = 0, frag: int = 0) -> bytes:
        length = 8 + len(body)
        udp = _UDP.pack(self.local_port, peer_port or self.peer_port, length, 0)
        total = fold(ones_sum(src + dst) + PROTO_UDP + length + ones_sum(udp) + ones_sum(body))
        csum = (~total & 0xFFFF) or 0xFFFF
        return (ip_header(src, dst, PROTO_UDP, 20 + length, ident, ttl, tos, frag)
                + udp[:6] + csum.to_bytes(2, "big") + body)

    def unwrap(self, pkt: bytes, ihl: int, protocol: int, total: int):
        if protocol != PROTO_UDP or total < ihl + 8:
            return None
        sport, dport = struct.unpack_from("!HH", pkt, ihl)
        if dport != self.local_port:
            return None
        return pkt[ihl + 8:total], sport


def make_carriage(name: str, role: str):
    if name == "ip":
        return IPCarriage()
    if name == "udp":
        if role == "client":
            return UDPCarriage(UDP_PORT_CLIENT, UDP_PORT_SERVER)
        return UDPCarriage(UDP_PORT_SERVER, UDP_PORT_CLIENT)
    raise ValueError(f"unknown carriage {name!r} (want 'ip' or 'udp')")
