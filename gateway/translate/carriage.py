"""How SAL packets travel between gateways: directly over IP (protocol 144) or in UDP.

Over UDP the transport checksum inside uses a pseudo-header with zero addresses, so that
a NAT rewriting the outer header leaves it valid (the reference never implemented UDP
carriage, so there is nothing to be compatible with; see docs/protocol.md).
"""
import struct

from sal.checksum import ones_sum
from sal.ip import PROTO_UDP
from sal.wire import PROTO_SAL

UDP_PORT_CLIENT, UDP_PORT_SERVER = 54324, 54325
ZERO_ADDR = b"\0\0\0\0"
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def header_sum(src: bytes, dst: bytes, protocol: int) -> int:
    """The part of an IPv4 header checksum that is constant within a flow."""
    return ones_sum(src + dst) + 0x4500 + protocol


def ip_header(src: bytes, dst: bytes, protocol: int, total: int, ident: int, ttl: int,
              tos: int, frag: int, partial: int | None = None) -> bytes:
    """A 20-byte IPv4 header; ``partial`` is ``header_sum(src, dst, protocol)``, which a
    flow computes once so that each packet only adds its varying fields."""
    if partial is None:
        partial = header_sum(src, dst, protocol)
    s = partial + tos + total + ident + frag + (ttl << 8)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return _IPV4.pack(0x45, tos, total, ident, frag, ttl, protocol, ~s & 0xFFFF, src, dst)


class IPCarriage:
    name = "ip"
    protocol = PROTO_SAL
    overhead = 0

    def pseudo(self, src: bytes, dst: bytes) -> tuple[bytes, bytes]:
        return src, dst

    def wrap(self, src: bytes, dst: bytes, body: bytes, peer_port: int, ident: int = 0,
             ttl: int = 64, tos: int = 0, frag: int = 0, partial: int | None = None) -> bytes:
        return ip_header(src, dst, PROTO_SAL, 20 + len(body), ident, ttl, tos, frag, partial) + body

    def is_ours(self, pkt: bytes) -> bool:
        """Cheap test for the data fast path: a plain 20-byte-header SAL packet."""
        return pkt[9] == PROTO_SAL

    def unwrap(self, pkt: bytes, ihl: int, protocol: int, total: int):
        """(SAL body, peer port) of an inbound packet, or None when it is not SAL."""
        if protocol != PROTO_SAL:
            return None
        return pkt[ihl:total], 0

    def unwrap_quoted(self, quoted: bytes, ihl: int) -> bytes | None:
        """The SAL bytes of a packet we sent, as an ICMP error quotes it."""
        return quoted[ihl:]


class UDPCarriage:
    """The UDP checksum is left 0 (none, as IPv4 allows): the SAL header and the
    transport inside each carry their own, so it would only repeat them."""

    name = "udp"
    protocol = PROTO_UDP
    overhead = 8

    def __init__(self, local_port: int, peer_port: int):
        self.local_port = local_port
        self.peer_port = peer_port     # default for a new flow; replies go to the port seen
        self._port_bytes = local_port.to_bytes(2, "big")

    def pseudo(self, src: bytes, dst: bytes) -> tuple[bytes, bytes]:
        return ZERO_ADDR, ZERO_ADDR

    def wrap(self, src: bytes, dst: bytes, body: bytes, peer_port: int, ident: int = 0,
             ttl: int = 64, tos: int = 0, frag: int = 0, partial: int | None = None) -> bytes:
        length = 8 + len(body)
        return (ip_header(src, dst, PROTO_UDP, 20 + length, ident, ttl, tos, frag, partial)
                + _UDP.pack(self.local_port, peer_port or self.peer_port, length, 0) + body)

    def is_ours(self, pkt: bytes) -> bool:
        return pkt[9] == PROTO_UDP and pkt[22:24] == self._port_bytes

    def unwrap(self, pkt: bytes, ihl: int, protocol: int, total: int):
        if protocol != PROTO_UDP or total < ihl + 8:
            return None
        sport, dport = struct.unpack_from("!HH", pkt, ihl)
        if dport != self.local_port:
            return None
        return pkt[ihl + 8:total], sport

    def unwrap_quoted(self, quoted: bytes, ihl: int) -> bytes | None:
        """The SAL bytes of a packet we sent, as an ICMP error quotes it (None when
        the quoted datagram is not from our port)."""
        if quoted[ihl:ihl + 2] != self._port_bytes:
            return None
        return quoted[ihl + 8:]


def make_carriage(name: str, role: str):
    if name == "ip":
        return IPCarriage()
    if name == "udp":
        if role == "client":
            return UDPCarriage(UDP_PORT_CLIENT, UDP_PORT_SERVER)
        return UDPCarriage(UDP_PORT_SERVER, UDP_PORT_CLIENT)
    raise ValueError(f"unknown carriage {name!r} (want 'ip' or 'udp')")
