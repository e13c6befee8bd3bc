"""The client side: legacy TCP toward virtual service addresses becomes SAL flows."""
from dataclasses import dataclass
from typing import Callable

import ipaddress

from sal import icmp
from sal.checksum import apply_delta, delta
from sal.flow import Event, State
from sal.ip import IPv4, TCP_ACK, TCP_RST, TCP_SYN, aton
from sal.service_table import Action, ServiceTable
from sal.wire import MalformedPacket

from .base import PASS, Flow, Translator, _TCP_PORTS, _U16, _U32
from .limits import TokenBucket
from .udp import UdpClientMixin

REFUSALS_PER_SECOND = 100     # ICMP port unreachable we send, at most (a router's own limit)


@dataclass(frozen=True)
class VirtualService:
    """A virtual address:port that stands for a serviceID."""
    address: bytes
    port: int
    service_id: bytes
    name: str = ""


class ClientTranslator(UdpClientMixin, Translator):
    role = "client"

    def __init__(self, sal_address: bytes, resolve: Callable[[bytes, int], bytes | None],
                 table: ServiceTable, carriage, virtual_network: str = "198.18.0.0/16",
                 resolve_udp: Callable[[bytes, int], bytes | None] | None = None, **kwargs):
        """``resolve(virtual_address, port)`` gives the serviceID a virtual address stands
        for (the seam for the resolver), ``resolve_udp`` the same for UDP services (none
        by default: datagrams are refused); ``table`` picks the next hop for a serviceID."""
        super().__init__(carriage, **kwargs)
        self.sal_address = sal_address
        self.resolve = resolve
        self.resolve_udp = resolve_udp
        self.table = table
        self.by_legacy: dict[tuple, Flow] = {}
        net = ipaddress.IPv4Network(virtual_network)
        self._virtual = (int(net.network_address), int(net.netmask))
        self._refusals = TokenBucket(REFUSALS_PER_SECOND, REFUSALS_PER_SECOND)

    def is_virtual(self, address: bytes) -> bool:
        base, mask = self._virtual
        return int.from_bytes(address, "big") & mask == base

    def refuse_datagram(self, pkt: bytes, now: float, reason: str = "dropped_udp_not_carried"):
        """A legacy UDP datagram toward a virtual address that no UDP service stands
        behind (or none can be reached now): its sender hears "port unreachable" at
        once (a connected socket gets ECONNREFUSED, dig says so) instead of waiting for
        nothing. Rate-limited, as a router limits its ICMP; dropped either way, and
        counted under ``reason``."""
        self.stats[reason] += 1
        if len(pkt) >= 28 and self._refusals.take(now):
            self.outbox.append(icmp.build_error(pkt[16:20], pkt[12:16], icmp.DEST_UNREACH,
                                                icmp.PORT_UNREACH, pkt))
            self.stats["icmp_port_unreachable_sent"] += 1
        return None

    # --- legacy side ---------------------------------------------------------------
    def from_legacy(self, pkt: bytes, now: float):
        if len(pkt) >= 40 and pkt[0] == 0x45 and pkt[9] == 6 and _U16.unpack_from(pkt, 2)[0] == len(pkt) \
                and not (pkt[6] & 0x3F or pkt[7]) and 20 <= (pkt[32] >> 4) * 4 <= len(pkt) - 20:
            ip, seg = None, pkt[20:]          # the common case, without a full parse
        else:
            checked = self._check_legacy(pkt)
            if checked is None or checked is PASS:
                return checked
            ip, seg = checked
        sport, dport = _TCP_PORTS.unpack_from(seg)
        flags = seg[13]
        flow = self.by_legacy.get((pkt[12:16], sport, pkt[16:20], dport))
        if flags & TCP_SYN and not flags & TCP_ACK:
            if flow is not None:
                if _U32.unpack_from(seg, 4)[0] != flow.syn_seq or flow.closed_at is not None:
                    self._replace(flow, now)              # a new connection on the same ports
                elif flow.sal.state == State.SYN_SENT:
                    return self._resend_syn(flow, now)
                else:
                    # The legacy client's SYN again (its SYN-ACK is late, on a long round
                    # trip): the connection stands; the backend answers the repeat as TCP
                    # does (its SYN-ACK again, or an ACK), so carry it like data.
                    self.stats["syn_repeated"] += 1
                    seg, csum_delta = self._clamp(seg, flow.out_delta)
                    return self._data_to_sal(flow, pkt, seg, now, csum_delta)
            return self._open(ip or IPv4(pkt), pkt, seg, sport, dport, now)
        if flow is None:
            self.stats["dropped_no_flow"] += 1
            self._refuse(ip or IPv4(pkt), seg)
            return None
        if flow.sal.state == State.SYN_SENT:
            self.stats["dropped_before_established"] += 1
            return None
        if flow.sal.state == State.RESET and not flags & TCP_RST:   # (a RST goes on: the peer judges it)
            self._after_reset(flow, pkt, seg)
            return None
        return self._data_to_sal(flow, pkt, seg, now)

    def _data_to_sal(self, flow: Flow, pkt: bytes, seg: bytes, now: float, csum_delta: int | None = None):
        header = flow.out_hdr
        if flow.send_handshake_ack:
            header = flow.sal.handshake_ack().encode()
            flow.send_handshake_ack = False
            self._handshake_done(flow, now)  # the legacy client completed its handshake
        if not self._track_tcp(flow, seg, True, now):
            return None
        if flow.held is not None:
            self._hold(flow, pkt)            # a move is unconfirmed: wait for the new path
            return None
        self.stats["to_sal"] += 1
        return self._to_sal(flow, pkt, seg, now, header, csum_delta)

    def _check_legacy(self, pkt: bytes):
        """The full checks, for what the fast test in from_legacy did not accept:
        (IPv4, segment), or None (dropped, counted), or PASS."""
        try:
            ip = IPv4(pkt)
        except MalformedPacket as exc:
            self.stats["malformed"] += 1
            self.stats[f"dropped_{exc.reason}"] += 1
            return None
        if ip.protocol != 6:
            return PASS
        if len(pkt) != ip.total_length:
            self.stats["dropped_truncated_copy"] += 1
            return None
        if ip.is_fragment:
            self.stats["dropped_fragment"] += 1
            return None
        seg = pkt[ip.ihl:]
        if len(seg) < 20 or not 20 <= (seg[12] >> 4) * 4 <= len(seg):
            self.stats["malformed"] += 1
            self.stats["dropped_tcp_truncated"] += 1
            return None
        return ip, seg

    def _open(self, ip: IPv4, pkt: bytes, seg: bytes, sport: int, dport: int, now: float):
        if not self.accepting:
            self.stats["refused_draining"] += 1
            self._refuse(ip, seg)
            return None
        service_id = self.resolve(ip.dst, dport)
        if service_id is None:
            self.stats["dropped_no_service"] += 1
            self._refuse(ip, seg)
            return None
        target = self.table.resolve(service_id, key=ip.src, now=now)   # the client, for affinity
        if target is None or target.action == Action.DROP:
            self.stats["dropped_no_route" if target is None else "dropped_rule_drop"] += 1
            self._refuse(ip, seg)
            return None
        if target.action != Action.FORWARD:
            # DELAY: nothing is held here; the legacy client's SYN retransmission asks again
            self.stats[f"dropped_rule_{target.action.value}"] += 1
            return None
        if not self._admit(ip.src):
            self._refuse(ip, seg)              # told at once (a RST), counted by the cap
            return None
        flow = self._new_flow(now)
        self._opened(flow, ip.src)
        flow.set_legacy(ip.src, ip.dst, sport, dport)
        flow.legacy_key = (ip.src, sport, ip.dst, dport)
        flow.local_addr = self.sal_address
        flow.peer_addr = aton(target.target)
        flow.peer_port = getattr(self.carriage, "peer_port", 0)
        flow.syn_seq = _U32.unpack_from(seg, 4)[0]
        flow.rebuild(self.carriage)
        self.by_legacy[flow.legacy_key] = flow
        seg, csum_delta = self._clamp(seg, flow.out_delta, flow.peer_addr, now)
        tseg = self._sal_segment(flow, seg, csum_delta)
        header = flow.sal.connect(service_id, tseg, now)
        self._track_retransmit(flow)
        self.stats["to_sal"] += 1
        flow.packets_out += 1
        return self.carriage.wrap(flow.local_addr, flow.peer_addr, header.encode() + tseg,
                                  flow.peer_port, ip.ident, ip.ttl, ip.tos, ip.frag & 0x4000)

    def redirect_pending(self, dead_hops: set[bytes], now: float) -> int:
        """Handshakes still waiting on a next hop that died (a router): look the route up
        again and send their SYN to a live hop. Returns how many were sent again."""
        moved = 0
        for flow in list(self.flows.values()):
            out = flow.sal.outstanding
            if flow.sal.state != State.SYN_SENT or flow.peer_addr not in dead_hops or out is None:
                continue
            target = self.table.resolve(flow.sal.service_id)
            if target is None or target.action != Action.FORWARD or aton(target.target) in dead_hops:
                continue
            new = aton(target.target)
            # the SYN's TCP checksum covers the destination (over IP carriage)
            old_pseudo = self.carriage.pseudo(flow.local_addr, flow.peer_addr)[1]
            new_pseudo = self.carriage.pseudo(flow.local_addr, new)[1]
            csum = apply_delta(_U16.unpack_from(out.transport, 16)[0], delta(old_pseudo, new_pseudo))
            out.transport = out.transport[:16] + _U16.pack(csum) + out.transport[18:]
            flow.peer_addr = new
            flow.rebuild(self.carriage)
            self.outbox.append(self.carriage.wrap(flow.local_addr, new, out.header.encode() + out.transport,
                                                  flow.peer_port))
            self.stats["syn_redirected"] += 1
            moved += 1
        return moved

    def _resend_syn(self, flow: Flow, now: float):
        out = flow.sal.outstanding
        if out is None:
            return None
        self.stats["syn_repeated"] += 1
        return self.carriage.wrap(flow.local_addr, flow.peer_addr, out.header.encode() + out.transport,
                                  flow.peer_port)

    def _replace(self, flow: Flow, now: float) -> None:
        """A new SYN on the 4-tuple of a flow we still hold: the old one is over."""
        if flow.closed_at is None and flow.sal.remote_flow:
            self._emit_sal(flow, flow.sal.reset().encode())
            self.stats["sal_resets_sent"] += 1
        self._forget(flow)

    def adopt(self, flow: Flow, row: dict) -> bool:
        """Take a flow back from a snapshot (see snapshot.py)."""
        flow.legacy_key = (flow.legacy_src, flow.legacy_sport, flow.legacy_dst, flow.legacy_dport)
        if flow.legacy_key in self.by_legacy:
            return False
        self.by_legacy[flow.legacy_key] = flow
        self._adopt_common(flow, flow.legacy_src, flow.last_seen)
        return True

    def _forget(self, flow: Flow) -> None:
        super()._forget(flow)
        if self.by_legacy.get(flow.legacy_key) is flow:
            del self.by_legacy[flow.legacy_key]

    def _flow_of_legacy_quote(self, src: bytes, dst: bytes, sport: int, dport: int):
        # we sent it toward the legacy client: from the virtual address it talks to
        return self.by_legacy.get((dst, dport, src, sport))

    # --- SAL side ------------------------------------------------------------------
    def from_sal(self, pkt: bytes, now: float):
        out = self._fast_from_sal(pkt, now)
        if out is not None:
            return out
        parsed = self._parse_sal(pkt)
        if parsed is None or parsed is PASS:
            return parsed
        ip, hdr, off, peer_port, body = parsed
        flow = self.flows.get(hdr.dst_flow)
        if flow is None:
            return self._answer_unknown(ip, hdr, peer_port)
        return self._from_sal_flow(flow, pkt, ip, hdr, off, peer_port, body, now)

    def _after_control(self, flow: Flow, ip: IPv4, peer_port: int, events: list, now: float) -> None:
        if Event.ESTABLISHED in events:
            # late binding: the instance that accepted answers from its own address
            flow.peer_addr = ip.src
            flow.peer_port = peer_port or flow.peer_port
            flow.rebuild(self.carriage)
            if flow.udp is not None:
                self._udp_synack(flow, now)      # no legacy handshake to wait for
                return
            flow.send_handshake_ack = True
            self.stats["flows_established"] += 1
