"""Legacy UDP as SAL flows: the reference's connected-UDP exchange (udp_basic.pcap).

A legacy datagram toward a virtual address:port of a UDP service opens a SAL flow whose
transport protocol is 17: SYN (CONTROL + SERVICE + an empty UDP header, ports 0, its
checksum over the pseudo-header), SYN-ACK and ACK (an empty UDP header with checksum 0,
as the reference sends them), then each datagram is one SAL data packet (base header, the
UDP header with ports 0). The SAL control exchange is ``SalFlow``'s, as for TCP.

Datagrams sent before the SYN-ACK wait on the flow (at most ``MAX_PENDING``, counted)
and follow the handshake ACK. A flow idle for ``Timeouts.udp_idle`` ends with the
reference's SAL FIN; a SAL FIN from the peer is answered with ours (UDP has no close of
its own). A datagram that would not fit the path once our headers are added is refused
with an ICMP frag-needed to its sender, as a router would, never fragmented.

Established UDP flows take the kernel fast path too (gateway/fastpath), driven by the
same events as TCP's: ``FlowEstablished`` at the SYN-ACK (client) or the handshake ACK
(server; installed once the backend answered, ``UdpAnswered``), ``FlowClosing`` at an
idle close, a FIN or a reset. UDP flows have no ``legacy_key`` (that is TCP's), and no
TCP reset is ever sent for them.
"""
import struct

from sal import icmp
from sal.checksum import apply_delta
from sal.flow import State
from sal.ip import PROTO_UDP, aton, transport_checksum
from sal.service_table import Action

from .carriage import ip_header
from .events import UdpAnswered, UdpRefused
from .limits import TokenBucket
from .ports import PortPool
from .tftp import TftpFlows
from .verdict import PASS

MAX_PENDING = 16              # datagrams a flow holds while its handshake is out
ICMP_PER_SECOND = 100         # frag-needed / port unreachable we send, at most
_U16 = struct.Struct("!H")
_IDENT_FRAG = struct.Struct("!HH")
_PORTS = struct.Struct("!HH")
EMPTY_UDP = b"\0\0\0\0\0\x08\0\0"   # the SYN-ACK's and ACK's transport: no checksum


class UdpState:
    """What a UDP flow holds besides the shared ``Flow`` record."""
    __slots__ = ("key", "pending", "helper")

    def __init__(self, key: bytes):
        self.key = key            # legacy src, dst, sport, dport as on the wire
        self.pending = []         # datagrams waiting for the handshake
        self.helper = None        # a server helper's state (tftp.py), for a service asking for one


def legacy_datagram(translator, pkt: bytes) -> bytes | None:
    """The UDP part of a whole, well-formed legacy IPv4 datagram; None (dropped,
    counted) for anything else."""
    n = len(pkt)
    ihl = (pkt[0] & 15) * 4 if n else 0
    if n < 28 or pkt[0] >> 4 != 4 or ihl < 20 or n < ihl + 8:
        translator.stats["malformed"] += 1
        translator.stats["dropped_udp_truncated"] += 1
        return None
    if _U16.unpack_from(pkt, 2)[0] != n:
        translator.stats["dropped_truncated_copy"] += 1
        return None
    if pkt[6] & 0x3F or pkt[7]:
        translator.stats["dropped_fragment"] += 1
        return None
    seg = pkt[ihl:]
    if _U16.unpack_from(seg, 4)[0] != len(seg):
        translator.stats["malformed"] += 1
        translator.stats["dropped_udp_bad_length"] += 1
        return None
    return seg


def _udp_checksum(csum: int, d: int) -> int:
    """A UDP checksum updated by ``d``: 0 stays 0 (none), a result of 0 is sent as 0xFFFF."""
    if not csum:
        return 0
    return apply_delta(csum, d) or 0xFFFF


class UdpMixin:
    """What both translators share for UDP flows."""

    def _init_udp(self) -> None:
        self.udp_flows: dict = {}          # UdpState.key -> Flow
        self._udp_icmp = TokenBucket(ICMP_PER_SECOND, ICMP_PER_SECOND)
        self.tftp = TftpFlows(self.stats)  # server: flows of services with helper = "tftp"

    def _udp_flow(self, now: float, key: bytes):
        flow = self._new_flow(now, PROTO_UDP)
        flow.udp = UdpState(key)
        self.udp_flows[key] = flow
        return flow

    def _udp_adopt(self, flow) -> bool:
        """A UDP flow restored from a snapshot (snapshot.py) under its legacy 4-tuple
        again; False if a flow holds that 4-tuple already."""
        key = flow.legacy_src + flow.legacy_dst + _PORTS.pack(flow.legacy_sport, flow.legacy_dport)
        if key in self.udp_flows:
            return False
        flow.udp = UdpState(key)
        self.udp_flows[key] = flow
        return True

    def _udp_forget(self, flow) -> None:
        if self.udp_flows.get(flow.udp.key) is flow:
            del self.udp_flows[flow.udp.key]
        if flow.udp.helper is not None:
            self.tftp.forget(flow)
        if flow.udp.pending:
            self.stats["dropped_udp_pending"] += len(flow.udp.pending)
            flow.udp.pending = []

    def _udp_fits(self, flow, pkt: bytes, seg: bytes, now: float) -> bool:
        """Does the datagram fit the path toward the peer with our headers added? If
        not, its sender hears an ICMP frag-needed naming the size that fits."""
        limit = self.mss_limit_toward(flow.peer_addr, now) + 20   # UDP header + payload
        if len(seg) <= limit:
            return True
        self.stats["dropped_udp_too_big"] += 1
        if self._udp_icmp.take(now):
            self.outbox.append(icmp.build_error(pkt[16:20], pkt[12:16], icmp.DEST_UNREACH,
                                                icmp.FRAG_NEEDED, pkt, limit + 20))
            self.stats["icmp_frag_needed_sent"] += 1
        return False

    def _udp_to_sal(self, flow, pkt: bytes, seg: bytes, now: float) -> bytes:
        """A legacy datagram as one SAL data packet toward the peer."""
        csum = _udp_checksum(_U16.unpack_from(seg, 6)[0], flow.out_delta)
        body = flow.out_hdr + b"\0\0\0\0" + seg[4:6] + _U16.pack(csum) + seg[8:]
        flow.packets_out += 1
        flow.bytes_out += len(seg)
        flow.last_seen = now
        self.stats["to_sal"] += 1
        ident, frag = _IDENT_FRAG.unpack_from(pkt, 4)
        return self.carriage.wrap(flow.local_addr, flow.peer_addr, body, flow.peer_port,
                                  ident, pkt[8], pkt[1], frag & 0x4000, flow.out_ip_sum)

    def _udp_out(self, flow, pkt: bytes, seg: bytes, now: float):
        """A legacy datagram of an established flow: to the peer, or refused."""
        if flow.held is not None:
            self._hold(flow, pkt)            # a move is unconfirmed: wait for the new path
            return None
        if not self._udp_fits(flow, pkt, seg, now):
            return None
        return self._udp_to_sal(flow, pkt, seg, now)

    def _udp_hold(self, flow, pkt: bytes) -> None:
        pending = flow.udp.pending
        if len(pending) >= MAX_PENDING:
            self.stats["dropped_udp_pending_full"] += 1
        else:
            pending.append(pkt)
            self.stats["udp_held"] += 1

    def _udp_release(self, flow, now: float) -> None:
        """The handshake is done: the datagrams that waited for it go out, in order."""
        pending, flow.udp.pending = flow.udp.pending, []
        for pkt in pending:
            seg = pkt[(pkt[0] & 15) * 4:]
            if self._udp_fits(flow, pkt, seg, now):
                self.outbox.append(self._udp_to_sal(flow, pkt, seg, now))
                self.stats["udp_released"] += 1

    def _udp_from_sal(self, flow, pkt: bytes, seg: bytes, now: float, csum_delta: int | None = None):
        """A SAL data packet's datagram, toward the legacy host."""
        if len(seg) < 8 or _U16.unpack_from(seg, 4)[0] != len(seg):
            self.stats["malformed"] += 1
            self.stats["dropped_udp_bad_length"] += 1
            return None
        if flow.udp.helper is not None:        # (server: the helper may re-aim the flow)
            csum_delta = self.tftp.toward_backend(self, flow, seg, csum_delta)
        csum = _udp_checksum(_U16.unpack_from(seg, 6)[0], flow.in_delta if csum_delta is None else csum_delta)
        seg = _PORTS.pack(flow.legacy_dport, flow.legacy_sport) + seg[4:6] + _U16.pack(csum) + seg[8:]
        flow.packets_in += 1
        flow.bytes_in += len(seg)
        flow.last_seen = now
        self.stats["from_sal"] += 1
        ident, frag = _IDENT_FRAG.unpack_from(pkt, 4)
        return ip_header(flow.legacy_dst, flow.legacy_src, PROTO_UDP, 20 + len(seg), ident, pkt[8],
                         pkt[1], frag & 0x4000, flow.in_ip_sum) + seg

    def _udp_from_sal_flow(self, flow, pkt: bytes, hdr, off: int, body: bytes, in_delta, now: float):
        """The rest of the full SAL path for a UDP flow, once its control part is done:
        a control packet's transport (the handshake's empty UDP header) is consumed;
        a FIN from the peer is answered with ours."""
        sal = flow.sal
        if sal.peer_fin and not sal.fin_sent and flow.closed_at is None:
            fin = sal.close(now)
            if fin is not None:
                self._emit_sal(flow, fin.encode())
                self._track_retransmit(flow)
        if hdr.control is not None:
            return None
        if off >= len(body):
            self.stats["dropped_empty"] += 1
            return None
        if sal.state != State.ESTABLISHED:
            self.stats["dropped_before_established"] += 1
            return None
        return self._udp_from_sal(flow, pkt, body[off:], now, in_delta)

    def _icmp_about_udp(self, err, now: float):
        """An ICMP error about a datagram we sent toward a legacy host. A backend that
        refuses (port or protocol unreachable, from the backend itself) before it ever
        answered on the flow ends it: a SAL RST tells the client gateway, which tells
        its client at once. Anything else is only counted (UDP has no handshake to
        fail; a later datagram may well be taken)."""
        sport, dport = _PORTS.unpack_from(err.quoted, err.quoted_ihl)
        flow = self.udp_flows.get(err.quoted_dst + err.quoted_src + _PORTS.pack(dport, sport))
        if flow is None:
            return PASS           # the host's own datagram: the kernel's
        if (self.role == "server" and err.src == err.quoted_dst and flow.closed_at is None
                and not flow.bytes_out and err.type == icmp.DEST_UNREACH
                and err.code in (icmp.PORT_UNREACH, icmp.PROTO_UNREACH)):
            self.stats["icmp_udp_backend_refused"] += 1
            self.events.append(UdpRefused(flow))
            self._end_unreachable(flow, now)
        else:
            self.stats["icmp_soft_errors"] += 1
        return None

    def _udp_refused(self, flow) -> None:
        """The client gateway's UDP flow was reset before any datagram came back (the
        service refused it): its legacy client hears port unreachable, as from the host
        itself, quoting its own datagram. A flow that has carried answers does not: its
        next datagram simply opens a new flow (a restarted peer, say)."""
        if self.role != "client":
            return
        if self.refresh is not None:
            self.refresh(flow)                 # answers the kernel carried count too
        if flow.bytes_in:
            return
        quoted = ip_header(flow.legacy_src, flow.legacy_dst, PROTO_UDP, 28, 0, 64, 0, 0) \
            + _PORTS.pack(flow.legacy_sport, flow.legacy_dport) + b"\0\x08\0\0"
        self.outbox.append(icmp.build_error(flow.legacy_dst, flow.legacy_src, icmp.DEST_UNREACH,
                                            icmp.PORT_UNREACH, quoted))
        self.stats["icmp_port_unreachable_sent"] += 1

    def _udp_idle_close(self, flow, now: float) -> bool:
        """An idle UDP flow: our SAL FIN, as the reference ends one; the flow lingers
        for the close. False when it never got established (nothing to close)."""
        if flow.sal.state != State.ESTABLISHED:
            return False
        fin = flow.sal.close(now)
        if fin is not None:
            self._emit_sal(flow, fin.encode())
            self._track_retransmit(flow)
        self._finish(flow, now, "idle_closed")
        return True


class UdpClientMixin(UdpMixin):
    """The client side: legacy datagrams toward virtual addresses."""

    resolve_udp = None       # (virtual address, port) -> serviceID of a UDP service, or None

    def from_legacy_udp(self, pkt: bytes, now: float):
        """A legacy datagram toward the virtual range: carried when a UDP service
        stands behind its address:port, else refused (ICMP port unreachable)."""
        seg = legacy_datagram(self, pkt)
        if seg is None:
            return None
        key = pkt[12:20] + seg[:4]
        flow = self.udp_flows.get(key)
        if flow is not None:
            sal = flow.sal
            if flow.closed_at is None and not (sal.fin_sent or sal.peer_fin):
                if sal.state == State.ESTABLISHED:
                    return self._udp_out(flow, pkt, seg, now)
                self._udp_hold(flow, pkt)      # (SYN_SENT: the only other open state)
                return None
            self._forget(flow)                 # closing (the other side may be gone): a new flow
        return self._udp_open(pkt, seg, key, now)

    def _udp_open(self, pkt: bytes, seg: bytes, key: bytes, now: float):
        src, dst = pkt[12:16], pkt[16:20]
        sport, dport = _PORTS.unpack_from(seg)
        service_id = self.resolve_udp(dst, dport) if self.resolve_udp is not None else None
        if service_id is None:
            return self.refuse_datagram(pkt, now)
        if not self.accepting:
            return self.refuse_datagram(pkt, now, "refused_draining")
        target = self.table.resolve(service_id, key=src, now=now)
        if target is None or target.action != Action.FORWARD:
            return self.refuse_datagram(pkt, now, "dropped_no_route" if target is None
                                        else f"dropped_rule_{target.action.value}")
        if not self._admit(src):
            return self.refuse_datagram(pkt, now, "refused_flow_cap")   # (the cap counts too)
        flow = self._udp_flow(now, key)
        self._opened(flow, src)
        flow.set_legacy(src, dst, sport, dport)
        flow.local_addr = self.sal_address
        flow.peer_addr = aton(target.target)
        flow.peer_port = getattr(self.carriage, "peer_port", 0)
        flow.rebuild(self.carriage)
        self._udp_hold(flow, pkt)
        tseg = self._udp_syn_segment(flow)
        header = flow.sal.connect(service_id, tseg, now)
        self._track_retransmit(flow)
        self.stats["udp_flows_opened"] += 1
        self.stats["to_sal"] += 1
        flow.packets_out += 1
        self.outbox.append(self.carriage.wrap(flow.local_addr, flow.peer_addr, header.encode() + tseg,
                                              flow.peer_port))
        return None

    def adopt_udp(self, flow, row: dict) -> bool:
        """Take a UDP flow back from a snapshot (see snapshot.py)."""
        if not self._udp_adopt(flow):
            return False
        self._adopt_common(flow, flow.legacy_src, flow.last_seen)
        return True

    def _udp_syn_segment(self, flow) -> bytes:
        """The SYN's empty UDP header: ports 0, length 8, checksum over the pseudo-header
        (protocol 17) of the SAL addresses, as the reference sends it."""
        local, peer = self.carriage.pseudo(flow.local_addr, flow.peer_addr)
        csum = transport_checksum(local, peer, PROTO_UDP, EMPTY_UDP, 6) or 0xFFFF
        return EMPTY_UDP[:6] + _U16.pack(csum)

    def _udp_synack(self, flow, now: float) -> None:
        """The SYN-ACK arrived: our handshake ACK, then what waited for it."""
        self._emit_sal(flow, flow.sal.handshake_ack().encode() + EMPTY_UDP)
        self._handshake_done(flow, now)
        self.stats["flows_established"] += 1
        self._udp_release(flow, now)


class UdpServerMixin(UdpMixin):
    """The server side: SAL UDP flows toward UDP backends, and the backends' replies."""

    def _udp_on_syn(self, pkt: bytes, ip, hdr, peer_port: int, now: float, local: bytes,
                    reply_to: bytes, backend):
        """A SAL SYN for a UDP service: the flow, its port toward the backend, and our
        SYN-ACK at once (there is no legacy handshake to wait for)."""
        if not self._admit(reply_to):
            return self._refuse_sal_syn(ip, hdr, peer_port, "flow_cap")
        pool = self._udp_pool(backend)
        pair = pool.take(now)
        if pair is None:
            return self._refuse_sal_syn(ip, hdr, peer_port, "ports_exhausted")
        ours = ip.src if self.keep_client_address else pair[0]
        key = backend.address + ours + _PORTS.pack(backend.port, pair[1])
        old = self.udp_flows.get(key)
        if old is not None:
            self._forget(old)                    # a closed flow lingering on the pair
        flow = self._udp_flow(now, key)
        pool.leased[pair] = flow
        flow.sal.accept(hdr)
        self._opened(flow, reply_to)
        flow.local_addr = local
        flow.peer_addr = reply_to
        flow.peer_port = peer_port
        flow.extra = (backend, pool, pair[1], (reply_to, hdr.src_flow))
        self._backend_fate[flow.sal.local_flow] = "reset"   # UDP: no TIME_WAIT to wait out
        flow.set_legacy(backend.address, ours, backend.port, pair[1])
        flow.rebuild(self.carriage)
        if backend.helper:
            self.tftp.track(flow, backend.port)
        self.by_peer[flow.extra[3]] = flow
        self.stats["udp_flows_opened"] += 1
        return self._udp_send_synack(flow, now)

    def _udp_send_synack(self, flow, now: float):
        """Our SYN-ACK (again, for a repeated SYN)."""
        header = flow.sal.syn_ack(EMPTY_UDP, now)
        self._track_retransmit(flow)
        flow.packets_out += 1
        self.outbox.append(self.carriage.wrap(flow.local_addr, flow.peer_addr, header.encode() + EMPTY_UDP,
                                              flow.peer_port))
        return None

    def adopt_udp(self, flow, row: dict) -> bool:
        """Take a UDP flow back from a snapshot (see snapshot.py): its pair toward the
        backend leaves the pool."""
        from .server import Backend      # (server.py builds on this module)
        address, port, source, name = row["backend"]
        backend = Backend(bytes.fromhex(address), port, bytes.fromhex(source), name, PROTO_UDP)
        pool = self._udp_pool(backend)
        pair = (b"" if self.keep_client_address else flow.legacy_dst, row["port"])
        if not pool.lease(pair):
            return False
        if not self._udp_adopt(flow):
            pool.release(pair, None, 0.0)
            return False
        pool.leased[pair] = flow
        peer_key = (bytes.fromhex(row["peer_key"][0]), row["peer_key"][1])
        flow.extra = (backend, pool, row["port"], peer_key)
        self._backend_fate[flow.sal.local_flow] = "reset"   # UDP: no TIME_WAIT to wait out
        self.by_peer[peer_key] = flow
        self._adopt_common(flow, flow.peer_addr, flow.last_seen)
        return True

    def _udp_pool(self, backend) -> PortPool:
        key = (backend.address, backend.port, PROTO_UDP)
        pool = self.pools.get(key)
        if pool is None:
            sources = [b""] if self.keep_client_address else self.sources or [backend.source]
            exclude = (backend.port,) if backend.address in sources else ()
            pool = self.pools[key] = PortPool(*self.port_range, sources, rng=self.rng, exclude=exclude)
        return pool

    def from_backend_udp(self, pkt: bytes, now: float):
        """A backend's datagram: toward its flow's peer, or PASS when it is no flow's."""
        if len(pkt) < 28 or pkt[0] >> 4 != 4:
            return PASS
        ihl = (pkt[0] & 15) * 4
        flow = self.udp_flows.get(pkt[12:20] + pkt[ihl:ihl + 4])
        if flow is None:         # (a TFTP server answers from a new port: tftp.py)
            flow = self.tftp.reply_from_new_port(self, pkt, ihl) if self.tftp.flows else PASS
            if flow is PASS or flow is None:
                return flow
        seg = legacy_datagram(self, pkt)
        if seg is None:
            return None
        if flow.closed_at is not None or flow.sal.state != State.ESTABLISHED:
            self.stats["dropped_before_established" if flow.closed_at is None else "dropped_udp_closed"] += 1
            return None
        if not flow.bytes_out:
            self.events.append(UdpAnswered(flow))       # (passive health: the backend lives)
        return self._udp_out(flow, pkt, seg, now)


