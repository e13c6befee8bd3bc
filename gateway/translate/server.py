"""The server side: SAL flows become legacy TCP toward unmodified backends.

A SYN from a peer flowID we already hold a flow for (a reference host numbers its flows
1, 2, 3, ... and starts again from 1 when it restarts) is judged by its nonce: the same
nonce is the same SYN again; another nonce starts a new flow at once if the old one is
closed, lingering or never answered, and if the old one looks established, the peer is
asked first (``SalFlow.challenge``, as TCP's challenge ACK of RFC 5961) and the old flow
is replaced only once the peer shows it no longer knows it: a reset, or no answer within
``CHALLENGE_TRIES * CHALLENGE_INTERVAL``. A forged SYN cannot end a live flow.
"""
import heapq
from dataclasses import dataclass

from sal.flow import State
from sal.ip import IPv4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ntoa
from sal.service_table import Action, ServiceTable
from sal.wire import RST, SYN

from .base import PASS, Flow, Translator, _TCP_PORTS, _U16, _U32, _seq_geq
from .ports import TIME_WAIT, PortPool
from .udp import UdpServerMixin

# The reference retransmits a SYN after 3 s: the verdict on an old flow comes before
# (1.8 s), and a live peer up to about a second and a half away answers in time.
CHALLENGE_INTERVAL = 0.6    # seconds between probes of an old flow
CHALLENGE_TRIES = 3         # unanswered this many times: the peer no longer knows the flow
CHALLENGE_HOLDOFF = 1.0     # after an answer, new SYNs for the flow are dropped unprobed
_NEW = object()             # the old flow is gone: the SYN opens a new one


class _Challenge:
    __slots__ = ("tries", "deadline", "answered")

    def __init__(self, deadline: float):
        self.tries, self.deadline, self.answered = 1, deadline, False


@dataclass(frozen=True)
class Backend:
    """A legacy server: where DEMUX sends a service. ``source`` is our address facing it;
    ``protocol`` the transport it serves (6 TCP, 17 UDP); ``helper`` a UDP application
    helper its flows need ("tftp": tftp.py), or ""."""
    address: bytes
    port: int
    source: bytes
    name: str = ""
    protocol: int = 6
    helper: str = ""

    def __str__(self):
        return f"{ntoa(self.address)}:{self.port}"


class ServerTranslator(UdpServerMixin, Translator):
    role = "server"

    def __init__(self, table: ServiceTable, carriage, port_range: tuple[int, int] = (1024, 32767),
                 keep_client_address: bool = False, sources: list[bytes] | None = None,
                 backend_time_wait: float = TIME_WAIT, accept_broadcast_syn: bool = True, **kwargs):
        """``table`` maps serviceIDs to DEMUX targets whose target is a ``Backend``.
        With ``keep_client_address`` the backend sees the SAL peer's (client gateway's)
        address instead of ours, and must route it back through this gateway. Else it
        sees one of ``sources`` (our addresses facing the backends; default: each
        backend's ``source``) with a port of ``port_range``."""
        super().__init__(carriage, **kwargs)
        self.table = table
        self.port_range = port_range
        self.keep_client_address = keep_client_address
        self.sources = list(sources or [])
        self.backend_time_wait = backend_time_wait
        self.accept_broadcast_syn = accept_broadcast_syn
        # the broadcast address of each of our subnets -> our address there (set by the daemon)
        self.broadcast_addresses: dict[bytes, bytes] = {}
        self.by_peer: dict[tuple, Flow] = {}      # (peer address, peer flowID)
        self.by_backend: dict[bytes, Flow] = {}   # backend address, our address, backend port, our port
        self.pools: dict[tuple, PortPool] = {}
        self._backend_fate: dict[int, str] = {}   # flowID -> "time_wait" (backend closed first) or "reset"
        self._syns_sent: dict[int, bytes] = {}    # flowID -> our SYN to the backend, until its SYN-ACK
        self._challenges: dict[int, _Challenge] = {}
        self._challenge_heap: list = []           # (deadline, flowID), checked lazily

    # --- SAL side ------------------------------------------------------------------
    def from_sal(self, pkt: bytes, now: float):
        out = self._fast_from_sal(pkt, now)
        if out is not None:
            return out
        parsed = self._parse_sal(pkt)
        if parsed is None or parsed is PASS:
            return parsed
        ip, hdr, off, peer_port, body = parsed
        if hdr.dst_flow == 0:
            ours = self.broadcast_addresses.get(ip.dst)
            if ours is not None:
                # a reference host's default rule broadcasts SYNs on its subnet: answer
                # from our address there, as a reference host would
                if not self.accept_broadcast_syn:
                    return PASS
                return self._on_syn(pkt, ip, hdr, off, peer_port, body, now, ours)
            if self.local_addresses and ip.dst not in self.local_addresses:
                return PASS                  # a SYN on its way elsewhere
            return self._on_syn(pkt, ip, hdr, off, peer_port, body, now, ip.dst)
        flow = self.flows.get(hdr.dst_flow)
        if flow is None:
            return self._answer_unknown(ip, hdr, peer_port)
        if self._challenges:
            self._check_answer(flow, hdr, now)
        return self._from_sal_flow(flow, pkt, ip, hdr, off, peer_port, body, now)

    def _on_syn(self, pkt: bytes, ip: IPv4, hdr, off: int, peer_port: int, body: bytes, now: float,
                local: bytes):
        ctl = hdr.control
        if ctl is None or not ctl.flags & SYN or off >= len(body):
            self.stats["dropped_no_flow"] += 1
            return None
        seg = body[off:]
        broadcast = local != ip.dst
        source = hdr.source
        reply_to = source.addresses[0] if source and source.addresses else ip.src
        flow = self.by_peer.get((reply_to, hdr.src_flow))
        if flow is not None:
            verdict = self._syn_for_old_flow(flow, pkt, seg, ip, ctl, now, broadcast, peer_port)
            if verdict is not _NEW:
                return verdict
        if not self.accepting:
            self.stats["refused_draining"] += 1
            return None
        service = hdr.service
        target = self.table.resolve(service.service_id) if service else None
        if target is None or target.action != Action.DEMUX:
            if broadcast:
                return PASS                  # asked of every host on the subnet: not ours
            # as the reference: a SYN that matches nothing is dropped, not reset
            self.stats["dropped_no_service"] += 1
            return None
        backend: Backend = target.target
        if backend.protocol != hdr.protocol:
            self.stats["dropped_wrong_protocol"] += 1     # a UDP SYN for a TCP service, say
            return None
        if hdr.protocol == 17:
            return self._udp_on_syn(pkt, ip, hdr, peer_port, now, local, reply_to, backend)
        if not self._admit(reply_to):
            return self._refuse_sal_syn(ip, hdr, peer_port, "flow_cap")
        pool = self._pool(backend)
        pair = pool.take(now)
        if pair is None:
            pair = pool.take_early()
            if pair is None:
                return self._refuse_sal_syn(ip, hdr, peer_port, "ports_exhausted")
            self.stats["ports_reused_in_time_wait"] += 1
        ours = ip.src if self.keep_client_address else pair[0]
        key = backend.address + ours + _TCP_PORTS.pack(backend.port, pair[1])
        old = self.by_backend.get(key)
        if old is not None:
            # a closed flow lingers on the pair the backend has let go of: forgotten, so
            # that no late packet of it reaches the backend on the new connection
            self.stats["ports_reused_early"] += 1
            self._forget(old)
        flow = self._new_flow(now)
        pool.leased[pair] = flow
        flow.sal.accept(hdr)                 # a SYN with CONTROL: checked above
        self._opened(flow, reply_to)
        flow.local_addr = local
        flow.peer_addr = reply_to
        flow.peer_port = peer_port
        flow.extra = (backend, pool, pair[1], (reply_to, hdr.src_flow))
        flow.set_legacy(backend.address, ours, backend.port, pair[1])
        flow.legacy_key = key
        flow.rebuild(self.carriage)
        flow.legacy_last_ack = (_U32.unpack_from(seg, 4)[0] + 1) & 0xFFFFFFFF   # what the backend expects
        self.by_peer[flow.extra[3]] = flow
        self.by_backend[key] = flow
        if broadcast:
            self.stats["syn_broadcast_accepted"] += 1
        return self._syn_to_backend(flow, pkt, seg, now, ip, broadcast)

    def _syn_for_old_flow(self, flow: Flow, pkt: bytes, seg: bytes, ip: IPv4, ctl, now: float,
                          broadcast: bool, peer_port: int = 0):
        """A SYN naming the peer flowID of ``flow``: the same SYN again, or a new
        connection from a peer that forgot the old one (see the module's docstring).
        Returns the verdict for the packet, or _NEW once the old flow is forgotten."""
        state = flow.sal.state
        if ctl.nonce == flow.sal.remote_nonce:
            if state in (State.SYN_SEEN, State.SYN_RECEIVED):
                self.stats["syn_repeated"] += 1       # the legacy client retried: so do we
                if flow.udp is not None:
                    return self._udp_send_synack(flow, now)
                if peer_port and peer_port != flow.peer_port and ip.src == flow.peer_addr:
                    # from another UDP port: a NAT rebound the peer mid-handshake; the
                    # same nonce says it is the same peer, and our answer must follow it
                    flow.peer_port = peer_port
                    self.stats["nat_rebindings_followed"] += 1
                return self._syn_to_backend(flow, pkt, seg, now, ip, broadcast)
            self.stats["dropped_syn_duplicate"] += 1  # a late copy of a SYN already answered
            return None
        if flow.closed_at is None and state == State.ESTABLISHED:
            self._challenge(flow, now)
            self.stats["dropped_syn_challenged"] += 1  # its retransmission finds the verdict
            return None
        # Closed, lingering, or a handshake never completed: the peer started again. No
        # SAL RST toward it: it would name the peer's new flow, which reuses the flowID.
        self.stats["syn_replaced_closed" if flow.closed_at is not None else "syn_replaced_unanswered"] += 1
        if flow.closed_at is None:
            self._reset_legacy(flow)
            self._backend_fate[flow.sal.local_flow] = "reset"
            self._finish(flow, now, "replaced")
        self._forget(flow)
        return _NEW

    def _syn_to_backend(self, flow: Flow, pkt: bytes, seg: bytes, now: float, ip: IPv4,
                        broadcast: bool = False):
        # the SYN's checksum is over its own addresses, which need not be the flow's
        # (a SOURCE naming another peer, a repeated SYN to another of our addresses)
        in_delta = self._in_delta_for(flow, ip)
        seg, csum_delta = self._clamp(seg, flow.in_delta if in_delta is None else in_delta, flow.peer_addr, now)
        self.stats["from_sal"] += 1
        out = self._to_legacy(flow, pkt, seg, now, csum_delta)
        self._syns_sent[flow.sal.local_flow] = out
        if broadcast:
            # The kernel keeps a broadcast packet's type through a rewrite, and neither
            # forwards nor delivers such a packet to TCP: the SYN is sent anew instead.
            self.outbox.append(out)
            return None
        return out

    # --- challenges: does the peer still know an old flow? ---------------------------
    def _challenge(self, flow: Flow, now: float) -> None:
        fid = flow.sal.local_flow
        if fid in self._challenges:
            return                       # one at a time, and none again just after an answer
        self._emit_sal(flow, flow.sal.challenge().encode())
        self.stats["syn_challenges_sent"] += 1
        c = self._challenges[fid] = _Challenge(now + CHALLENGE_INTERVAL)
        heapq.heappush(self._challenge_heap, (c.deadline, fid))

    def _check_answer(self, flow: Flow, hdr, now: float) -> None:
        """A control packet from the peer, on the flow, with the nonce it gave us: it
        still holds the flow (a reset is judged by the flow itself)."""
        c = self._challenges.get(flow.sal.local_flow)
        ctl = hdr.control
        if c is None or c.answered or ctl is None or ctl.flags & RST \
                or hdr.src_flow != flow.sal.remote_flow or ctl.nonce != flow.sal.remote_nonce:
            return
        c.answered = True
        c.deadline = now + CHALLENGE_HOLDOFF
        heapq.heappush(self._challenge_heap, (c.deadline, flow.sal.local_flow))
        self.stats["syn_challenge_answered"] += 1

    def _challenge_timers(self, now: float) -> None:
        heap = self._challenge_heap
        while heap and heap[0][0] <= now:
            at, fid = heapq.heappop(heap)
            c = self._challenges.get(fid)
            if c is None or c.deadline != at:
                continue                 # stale: answered, or ended with its flow
            flow = self.flows.get(fid)
            if c.answered or flow is None:
                del self._challenges[fid]
            elif c.tries < CHALLENGE_TRIES:
                c.tries += 1
                c.deadline = now + CHALLENGE_INTERVAL
                heapq.heappush(heap, (c.deadline, fid))
                self._emit_sal(flow, flow.sal.challenge().encode())
            else:
                # the peer no longer knows the flow: its next SYN opens the new one
                self.stats["syn_challenge_unanswered"] += 1
                self._reset_legacy(flow)
                self._backend_fate[fid] = "reset"
                self._finish(flow, now, "replaced")
                self._forget(flow)

    def next_deadline(self) -> float | None:
        at = super().next_deadline()
        heap, challenges = self._challenge_heap, self._challenges
        while heap and (heap[0][1] not in challenges or challenges[heap[0][1]].deadline != heap[0][0]):
            heapq.heappop(heap)          # stale: answered (a later deadline is in), or ended
        if heap:
            at = heap[0][0] if at is None else min(at, heap[0][0])
        return at

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        self._challenge_timers(now)

    # --- backend side --------------------------------------------------------------
    def from_backend(self, pkt: bytes, now: float):
        # only whole, unfragmented TCP is ours; anything else passes untouched
        if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6 or _U16.unpack_from(pkt, 2)[0] != len(pkt) \
                or pkt[6] & 0x3F or pkt[7]:
            return PASS
        seg = pkt[(pkt[0] & 15) * 4:]
        if len(seg) < 20:
            return PASS
        flow = self.by_backend.get(pkt[12:20] + seg[:4])
        if flow is None:
            return PASS          # not a translated connection: the kernel answers it
        flags = seg[13]
        state = flow.sal.state
        if state in (State.SYN_SEEN, State.SYN_RECEIVED):
            if flags & TCP_SYN and flags & TCP_ACK:
                self._syns_sent.pop(flow.sal.local_flow, None)
                seg, csum_delta = self._clamp(seg, flow.out_delta, flow.peer_addr, now)
                tseg = self._sal_segment(flow, seg, csum_delta)
                header = flow.sal.syn_ack(tseg, now)
                self._track_retransmit(flow)
                self.stats["to_sal"] += 1
                flow.packets_out += 1
                flow.last_seen = now
                return self.carriage.wrap(flow.local_addr, flow.peer_addr, header.encode() + tseg,
                                          flow.peer_port, _U16.unpack_from(pkt, 4)[0], pkt[8], pkt[1])
            if flags & TCP_RST and state == State.SYN_SEEN:
                # the backend refused: a SAL RST carrying the TCP RST, so the client is refused too
                header = flow.sal.reset().encode()
                self._finish(flow, now, "refused")
                self.stats["to_sal"] += 1
                return self._to_sal(flow, pkt, seg, now, header)
            if state == State.SYN_SEEN and flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK:
                return self._end_time_wait(flow, seg)
        if state == State.RESET and not flags & TCP_RST:     # (a RST goes on: the peer judges it)
            self._after_reset(flow, pkt, seg)
            return None
        if flags & TCP_FIN and (flow.remote_fin_end is None
                                or not _seq_geq(_U32.unpack_from(seg, 8)[0], flow.remote_fin_end)):
            # the backend closes before it has the peer's FIN: it will hold TIME_WAIT
            self._backend_fate[flow.sal.local_flow] = "time_wait"
        if not self._track_tcp(flow, seg, True, now):
            return None
        if flow.held is not None:
            self._hold(flow, pkt)            # a move is unconfirmed: wait for the new path
            return None
        self.stats["to_sal"] += 1
        return self._to_sal(flow, pkt, seg, now, flow.out_hdr)

    def _end_time_wait(self, flow: Flow, seg: bytes) -> None:
        """An ACK answering our SYN: the backend still holds an older connection on this
        4-tuple in TIME_WAIT (a pair taken early) and did not take the SYN as newer. A
        RST in that connection's window ends it (RFC 793's reset for an ACK that
        acknowledges nothing of ours; Linux honours it, RFC 1337 aside), and our SYN
        goes again at once instead of after the client's retransmission."""
        self._legacy_rst(flow, _U32.unpack_from(seg, 8)[0], 0, TCP_RST)
        self.stats["backend_time_wait_reset"] += 1
        syn = self._syns_sent.get(flow.sal.local_flow)
        if syn is not None:
            self.outbox.append(syn)
        return None

    # --- ports ---------------------------------------------------------------------
    def _pool(self, backend: Backend) -> PortPool:
        key = (backend.address, backend.port)
        pool = self.pools.get(key)
        if pool is None:
            sources = [b""] if self.keep_client_address else self.sources or [backend.source]
            # a backend that shares our address must never see its own port as ours
            exclude = (backend.port,) if backend.address in sources else ()
            pool = self.pools[key] = PortPool(*self.port_range, sources, rng=self.rng, exclude=exclude)
        return pool

    def _give_back_port(self, flow: Flow, when: float, done: bool) -> None:
        """Give the flow's pair back when the flow ends (``when``), ready when the
        backend can take a new connection on it: at once if the backend's side is gone
        (our side closed first, or a reset); after the backend's TIME_WAIT if it closed
        first or we cannot tell (before that only ``take_early`` hands it out). The
        flow still carries late packets while it lingers, until a new connection takes
        its pair."""
        fid = flow.sal.local_flow
        fate = self._backend_fate.pop(fid, None) if done else self._backend_fate.get(fid)
        if fate == "time_wait":
            ready_at = when + self.backend_time_wait
        elif fate == "reset" or flow.sal.state in (State.CLOSED, State.RESET, State.FAILED):
            ready_at = when
        else:
            ready_at = flow.last_seen + self.backend_time_wait   # a handshake given up: who knows
        _, pool, port, _ = flow.extra
        pair = (b"" if self.keep_client_address else flow.legacy_dst, port)
        if not pool.release(pair, flow, ready_at):
            return
        self.stats["ports_back_at_once" if ready_at == when else "ports_back_after_time_wait"] += 1

    def _finish(self, flow: Flow, now: float, reason: str) -> None:
        first = flow.closed_at is None
        super()._finish(flow, now, reason)
        if first:
            self._challenges.pop(flow.sal.local_flow, None)   # the flow ended: no verdict needed
            if flow.extra is not None:
                self._give_back_port(flow, now, done=False)

    def adopt(self, flow: Flow, row: dict) -> bool:
        """Take a flow back from a snapshot (see snapshot.py): its port leaves the pool."""
        address, port, source, name = row["backend"]
        backend = Backend(bytes.fromhex(address), port, bytes.fromhex(source), name)
        pool = self._pool(backend)
        pair = (b"" if self.keep_client_address else flow.legacy_dst, row["port"])
        if not pool.lease(pair):
            return False
        pool.leased[pair] = flow
        peer_key = (bytes.fromhex(row["peer_key"][0]), row["peer_key"][1])
        flow.extra = (backend, pool, row["port"], peer_key)
        flow.legacy_key = backend.address + flow.legacy_dst + _TCP_PORTS.pack(backend.port, row["port"])
        self.by_peer[peer_key] = flow
        self.by_backend[flow.legacy_key] = flow
        self._adopt_common(flow, flow.peer_addr, flow.last_seen)
        return True

    def _evicted(self, flow: Flow) -> None:
        # the backend holds a half-open connection for it, and would keep repeating its
        # SYN-ACK: a RST frees it at once
        if flow.legacy_key is not None:
            self._reset_legacy(flow)
            self._backend_fate[flow.sal.local_flow] = "reset"

    def _flow_of_legacy_quote(self, src: bytes, dst: bytes, sport: int, dport: int):
        # we sent it toward the backend: keyed as the backend's answers would be
        return self.by_backend.get(dst + src + _TCP_PORTS.pack(dport, sport))

    def live_flows_by_backend(self) -> dict[tuple[bytes, int], int]:
        """Open flows per backend (address, port), for the services view."""
        counts: dict = {}
        for flow in self.flows.values():
            if flow.closed_at is None and flow.extra is not None:
                key = (flow.extra[0].address, flow.extra[0].port)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _forget(self, flow: Flow) -> None:
        super()._forget(flow)
        fid = flow.sal.local_flow
        self._challenges.pop(fid, None)
        self._syns_sent.pop(fid, None)
        if flow.extra is None:
            self._backend_fate.pop(fid, None)
            return
        if self.by_backend.get(flow.legacy_key) is flow:
            del self.by_backend[flow.legacy_key]
        self._give_back_port(flow, flow.last_seen if flow.closed_at is None else flow.closed_at, done=True)
        if self.by_peer.get(flow.extra[3]) is flow:
            del self.by_peer[flow.extra[3]]
