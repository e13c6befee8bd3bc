"""Forwarding a SAL SYN as a service router does: new IP destination, SOURCE appended.

The packet keeps its IP source (the client gateway), so the chosen instance answers the
client directly and no data ever passes through the router. What has to be redone:

* SAL header: length in words grows by the SOURCE extension; its checksum (which covers
  the SAL header only) is recomputed — a few dozen bytes.
* Transport checksum inside: over IP carriage its pseudo-header holds the real IP
  addresses, so the destination change is folded in incrementally (RFC 1624). Over UDP
  carriage the inner pseudo-header uses zero addresses (gateway/translate/carriage.py),
  so it stays valid; only the outer UDP length (and checksum, if one is set) changes.
* IPv4 header: destination, total length, header checksum.
"""
import struct

from sal import wire
from sal.checksum import apply_delta, checksum, delta
from sal.ip import PROTO_TCP, PROTO_UDP, transport_checksum

_U16 = struct.Struct("!H")


def with_source(hdr: wire.SalHeader, original_source: bytes, hop: bytes | None) -> bytes:
    """The SAL header ``hdr`` encoded again with SOURCE extended: a new SOURCE holding
    the original source, or, when an earlier router already added one, our address
    (``hop``) appended to it, as the reference lists [original source, hops...]."""
    exts = list(hdr.extensions)
    for i, ext in enumerate(exts):
        if isinstance(ext, wire.Source):
            exts[i] = wire.Source(ext.addresses + ([hop] if hop else []))
            break
    else:
        exts.append(wire.Source([original_source]))
    # a receiver takes at most MAX_EXTENSIONS, a SOURCE of 62 addresses, 255 words
    if len(exts) > wire.MAX_EXTENSIONS or any(isinstance(e, wire.Source) and len(e.addresses) > 62 for e in exts) \
            or wire.BASE_LEN + sum(len(e.encode()) for e in exts) > 255 * 4:
        raise ValueError("no room for SOURCE in this SAL header")
    return wire.SalHeader(hdr.src_flow, hdr.dst_flow, hdr.protocol, exts).encode()


def forward_syn(pkt: bytes, ihl: int, sal_at: int, sal_len: int, new_dst: bytes,
                new_head: bytes) -> bytes:
    """The SYN ``pkt`` sent on to ``new_dst`` with its SAL header (``sal_len`` bytes at
    ``sal_at``: ``ihl`` over IP, ``ihl + 8`` over UDP) replaced by ``new_head``.
    The caller has checked that the packet is whole."""
    total = _U16.unpack_from(pkt, 2)[0]
    seg = pkt[sal_at + sal_len:total]
    udp = pkt[9] == PROTO_UDP
    if seg and not udp:
        seg = _fix_transport(seg, pkt[sal_at + 9], delta(pkt[16:20], new_dst))
    growth = len(new_head) - sal_len
    out = bytearray(pkt[:sal_at]) + new_head + seg
    out[2:4] = _U16.pack(total + growth)
    out[16:20] = new_dst
    out[10:12] = b"\0\0"
    out[10:12] = _U16.pack(checksum(bytes(out[:ihl])))
    if udp:
        out[ihl + 4:ihl + 6] = _U16.pack(len(out) - ihl)    # not the sender's field: it may lie
        if pkt[ihl + 6:ihl + 8] != b"\0\0":      # a sender that set one: recompute it
            out[ihl + 6:ihl + 8] = b"\0\0"
            csum = transport_checksum(bytes(out[12:16]), new_dst, PROTO_UDP, bytes(out[ihl:]), 6) or 0xFFFF
            out[ihl + 6:ihl + 8] = _U16.pack(csum)
    return bytes(out)


def _fix_transport(seg: bytes, protocol: int, d: int) -> bytes:
    at = 16 if protocol == PROTO_TCP else 6 if protocol == PROTO_UDP else None
    if at is None or len(seg) < at + 2:
        return seg
    old = _U16.unpack_from(seg, at)[0]
    if protocol == PROTO_UDP and old == 0:
        return seg                                # no checksum: nothing to update
    return seg[:at] + _U16.pack(apply_delta(old, d)) + seg[at + 2:]
