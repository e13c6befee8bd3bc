"""Telling a client gateway at once that its SYN cannot be forwarded: ICMP destination
unreachable, sans-IO.

The message quotes the SYN exactly as it arrived (RFC 1812 4.3.2.3: the original IP
header and as much after it as fits in a 576-byte datagram), so the client gateway can
match it to its flow by the SAL header's flowIDs and nonce and reset its legacy client.
A quote never cuts the SAL header: when the header and 8 bytes after it do not fit in
576 bytes (extensions near their limit), the datagram grows past 576 to hold them.

    IPv4 (20): 0x45, TOS 0xc0, total length, ID 0, DF, TTL 64, protocol 1, checksum,
               source = the address the SYN was sent to (the router's), destination = its source
    ICMP (8):  type 3, code 1 (host unreachable), checksum (over ICMP header and quote), 0 x 4
    quote:     the SYN's bytes from its IP header on: IP [UDP 8] SAL header + extensions, transport
"""
from sal.checksum import checksum
from sal.ip import ipv4_header

PROTO_ICMP = 1
UNREACHABLE, HOST_UNREACHABLE = 3, 1
MAX_DATAGRAM = 576
_TOS_INTERNETCONTROL = 0xC0     # IP precedence "internetwork control", as routers mark ICMP errors
_HEADERS = 20 + 8               # our IPv4 header (no options) and the ICMP header


def quote_length(total: int, sal_end: int) -> int:
    """How many bytes of a ``total``-byte packet to quote when its SAL header ends at
    ``sal_end``: all that fits in a 576-byte datagram, and never less than the SAL header
    and 8 bytes after it (or the whole packet, when shorter)."""
    return min(total, max(MAX_DATAGRAM - _HEADERS, sal_end + 8))


def host_unreachable(pkt: bytes, sal_end: int) -> bytes:
    """ICMP type 3 code 1 to the source of the SYN ``pkt`` (whole, as it arrived), from
    the address it was sent to; ``sal_end`` is where its SAL header ends."""
    quote = pkt[:quote_length(len(pkt), sal_end)]
    body = bytearray(bytes((UNREACHABLE, HOST_UNREACHABLE, 0, 0, 0, 0, 0, 0)) + quote)
    body[2:4] = checksum(bytes(body)).to_bytes(2, "big")
    head = ipv4_header(pkt[16:20], pkt[12:16], PROTO_ICMP, len(body), ident=0, ttl=64,
                       tos=_TOS_INTERNETCONTROL, dont_fragment=True)
    return head + bytes(body)


class TokenBucket:
    """At most ``burst`` at once, refilled at ``rate`` per second (time passed in)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float = 0.0):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> bool:
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
