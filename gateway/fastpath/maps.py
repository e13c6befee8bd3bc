"""The layouts of ``bpf/fastpath.h`` in Python: a translator's flow as the kernel's map
entries, and the kernel's counters back."""
from __future__ import annotations

import struct
import sys

from sal.checksum import delta

from ..translate.carriage import ZERO_ADDR

FLOW_SLOW = 1
# struct flow: addresses and ports as on the wire, the rest in host order
FLOW = struct.Struct("=4s4s4s4s2s2s2sBx12s12sIIIII4sQQQQQ")
FLOW_KEY = struct.Struct("!I")
LEGACY_KEY = struct.Struct("=4s4s2s2sB3x")
CONFIG = struct.Struct("=IBB2s")
COUNTERS = ("to_sal", "from_sal", "passed_gso", "passed_control", "passed_slow",
            "passed_mismatch", "errors", "redirected", "passed_too_big")
_PORTS = struct.Struct("!HH")


def _memory_order(d: int) -> int:
    """A one's-complement sum of big-endian words as the kernel adds it: in the
    machine's order (the sum commutes with byte swapping)."""
    return int.from_bytes(d.to_bytes(2, "big"), "little")


def legacy_key(flow) -> bytes:
    """The key of the legacy packets the kernel translates toward the peer: the 4-tuple
    as the translator keys it (``by_legacy``, ``udp_flows``) and the transport."""
    return LEGACY_KEY.pack(flow.legacy_src, flow.legacy_dst, _PORTS.pack(flow.legacy_sport, 0)[:2],
                           _PORTS.pack(flow.legacy_dport, 0)[:2], flow.sal.protocol)


def udp_max(translator, flow) -> int:
    """A UDP flow's longest datagram (UDP header and payload) the translator carries
    toward its peer now (``_udp_fits``); the kernel hands longer ones up."""
    return translator.mss_limit_toward(flow.peer_addr, flow.last_seen) + 20


def flow_value(flow, carriage, udp_max: int = 0) -> bytes:
    """``struct flow`` for a translator's established flow (counters from zero).
    ``udp_max``: a UDP flow's longest datagram (UDP header and payload) that fits the
    path; the kernel hands longer ones up."""
    pseudo_local, pseudo_peer = carriage.pseudo(flow.local_addr, flow.peer_addr)
    legacy_ports = _PORTS.pack(flow.legacy_sport, flow.legacy_dport)
    back_ports = _PORTS.pack(flow.legacy_dport, flow.legacy_sport)
    out_addr = delta(flow.legacy_src + flow.legacy_dst, pseudo_local + pseudo_peer)
    out_port = delta(legacy_ports, ZERO_ADDR)
    in_addr = delta(pseudo_peer + pseudo_local, flow.legacy_dst + flow.legacy_src)
    in_port = delta(ZERO_ADDR, back_ports)
    peer_port = (flow.peer_port or getattr(carriage, "peer_port", 0)) if carriage.name == "udp" else 0
    udp = flow.udp is not None
    last_ack_or_max = udp_max.to_bytes(4, sys.byteorder) if udp else flow.legacy_last_ack.to_bytes(4, "big")
    return FLOW.pack(flow.local_addr, flow.peer_addr, flow.legacy_src, flow.legacy_dst,
                     legacy_ports[:2], legacy_ports[2:], peer_port.to_bytes(2, "big"), flow.sal.protocol,
                     flow.out_hdr, flow.in_hdr,
                     _memory_order(out_addr), _memory_order(out_port),
                     _memory_order(in_addr), _memory_order(in_port),
                     0, last_ack_or_max, 0, 0, 0, 0, 0)


class KernelCounters:
    """What the kernel counted for one flow: (flags, last ACK (TCP), packets and bytes
    each way, last seen in seconds of CLOCK_MONOTONIC)."""

    __slots__ = ("protocol", "flags", "legacy_last_ack", "packets_out", "bytes_out", "packets_in", "bytes_in",
                 "last_seen")

    def __init__(self, raw: bytes):
        fields = FLOW.unpack(raw)
        self.protocol = fields[7]
        self.flags = fields[14]
        self.legacy_last_ack = int.from_bytes(fields[15], "big") if self.protocol == 6 else 0
        self.packets_out, self.bytes_out, self.packets_in, self.bytes_in = fields[16:20]
        self.last_seen = fields[20] / 1e9


def legacy_key_of(raw_flow: bytes) -> bytes:
    """The legacy key of a kernel flow's value (for flows no translator flow describes)."""
    f = FLOW.unpack(raw_flow)
    return LEGACY_KEY.pack(f[2], f[3], f[4], f[5], f[7])


def config_value(mark: int, carriage, redirect: bool = False) -> bytes:
    udp = carriage.name == "udp"
    port = carriage.local_port if udp else 0
    return CONFIG.pack(mark, 1 if udp else 0, 1 if redirect else 0, port.to_bytes(2, "big"))
