"""Moving live flows to a new address (RSYN, RSYN|ACK, ACK), for either translator.

The side whose address changed sends an RSYN from the new address; the peer answers
RSYN|ACK to where the RSYN came from and switches when the ACK arrives. While a move is
unconfirmed, legacy packets toward the peer are held (bounded, counted) and translated
when the new path is known, so the legacy TCP does not have to time out.
"""
from sal.flow import State

from .events import FlowMoved, FlowMoving

MAX_HELD_PER_FLOW = 256     # ~370 KB of 1448-byte segments: more than a window in flight
HOLD_TIMEOUT = 1.0          # seconds; then held packets go to the current address anyway


class MigrationMixin:
    def migrate(self, now: float, new_local: bytes, peer: bytes | None = None, only=None) -> int:
        """Move the live flows (those toward ``peer``, or all; those ``only(flow)`` accepts)
        to our address ``new_local``. Returns how many started moving."""
        moved = 0
        for flow in list(self.flows.values()):
            if (flow.closed_at is not None or flow.sal.state != State.ESTABLISHED
                    or flow.local_addr == new_local or (peer is not None and flow.peer_addr != peer)
                    or (only is not None and not only(flow))):
                continue
            old = (flow.local_addr, flow.peer_addr)
            flow.local_addr = new_local
            flow.rebuild(self.carriage)
            self._start_holding(flow, now, old)
            flow.migration_started = now
            rsyn = flow.sal.migrate(now)
            if rsyn is not None:
                self._emit_sal(flow, rsyn.encode())
            self._track_retransmit(flow)
            self.stats["migrations_started"] += 1
            moved += 1
        return moved

    def challenge_path(self, flow, addr: bytes, port: int, now: float) -> None:
        """Packets of an established flow with its flowIDs came from somewhere new
        (``addr``:``port``): a NAT on the way rebound the peer (a home router's reboot,
        a carrier NAT's expired mapping), or someone forges them. The flow moves only
        once the peer answers from there, as QUIC validates a new path: a control packet
        that only the peer can answer (it needs the peer's nonce and acknowledges our
        latest number) goes both to the new place and to the current path, and the flow
        switches to wherever the answer comes from (a late packet from an older mapping
        is then answered on the current path and moves nothing). The challenge is an
        RSYN, or the control packet already outstanding (a FIN), sent again at once;
        while an RSYN is out legacy packets toward the peer wait, as for any move."""
        if flow.closed_at is not None or flow.sal.state != State.ESTABLISHED or flow.moving_peer is not None:
            self.stats["path_challenges_deferred"] += 1
            return
        flow.rebind_to = (addr, port)
        self.stats["path_challenges_sent"] += 1
        out = flow.sal.outstanding
        if out is not None:
            # something of ours is waiting for its answer (our RSYN, a FIN): the same
            # packet, now, to the newest place and the current path
            self._emit_sal(flow, out.header.encode() + out.transport)
            return
        self._start_holding(flow, now, (flow.local_addr, flow.peer_addr))
        flow.migration_started = now
        rsyn = flow.sal.migrate(now)
        if rsyn is not None:
            self._emit_sal(flow, rsyn.encode())
        self._track_retransmit(flow)

    def _challenge_answered(self, flow, addr: bytes, port: int, events: list) -> None:
        """Our outstanding control packet was answered (RSYN|ACK, the ACK of a FIN)
        while a path challenge is out: the flow's path is wherever it came from."""
        flow.rebind_to = None
        if (addr, port) != (flow.peer_addr, flow.peer_port):
            flow.prev_peer_addr = flow.peer_addr
            flow.peer_addr, flow.peer_port = addr, port or flow.peer_port
            flow.rebuild(self.carriage)
            self.stats["nat_rebindings_followed"] += 1

    def _start_holding(self, flow, now: float, old: tuple) -> None:
        if flow.held is None:
            flow.held = []
        flow.hold_deadline = now + HOLD_TIMEOUT
        if flow.sal.local_flow not in self._holding:
            self._holding[flow.sal.local_flow] = old
            self.events.append(FlowMoving(flow))

    def _hold(self, flow, pkt: bytes) -> None:
        """Keep a legacy packet until the flow's path is confirmed (drop when full: TCP
        will retransmit it)."""
        if len(flow.held) >= MAX_HELD_PER_FLOW:
            self.stats["dropped_hold_full"] += 1
        elif self._held_total >= self.limits.max_held_packets:
            self.stats["limit_held_packets"] += 1
        else:
            flow.held.append(pkt)
            self._held_total += 1
            self.stats["packets_held"] += 1

    def _release(self, flow, now: float) -> None:
        """Send what was held, translated toward the flow's current address."""
        held, flow.held = flow.held or [], None
        self._held_total -= len(held)
        old = self._holding.pop(flow.sal.local_flow, None)
        if old is not None:
            self.events.append(FlowMoved(flow, old, (flow.local_addr, flow.peer_addr)))
        for pkt in held:
            seg = pkt[(pkt[0] & 15) * 4:]
            self.outbox.append(self._to_sal(flow, pkt, seg, now, flow.out_hdr) if flow.udp is None
                               else self._udp_to_sal(flow, pkt, seg, now))
        self.stats["packets_released"] += len(held)

    def _on_migrated(self, flow, now: float) -> None:
        """Our RSYN was answered (the ACK is already out): the new path is confirmed."""
        self.stats["migrations_completed"] += 1
        started = getattr(flow, "migration_started", None)
        if started is not None:
            self.migration_times.append(now - started)
            del self.migration_times[:-1000]
        self._release(flow, now)

    def _on_peer_moving(self, flow, addr: bytes, port: int, now: float) -> None:
        flow.moving_peer = (addr, port)
        self._start_holding(flow, now, (flow.local_addr, flow.peer_addr))
        self.stats["peer_migrations_seen"] += 1

    def _on_peer_moved(self, flow, addr: bytes, port: int, now: float) -> None:
        # what the peer sent from its old address may still be queued here: still its own
        if addr != flow.peer_addr:
            flow.prev_peer_addr = flow.peer_addr
        flow.peer_addr, flow.peer_port = addr, port or flow.peer_port
        flow.moving_peer = None
        flow.rebuild(self.carriage)
        self.stats["peer_migrations_completed"] += 1
        self._release(flow, now)

    def _expire_holds(self, now: float) -> None:
        for fid in list(self._holding):
            flow = self.flows.get(fid)
            if flow is None:
                self._holding.pop(fid, None)
            elif flow.hold_deadline <= now and not flow.sal.migrating:
                self.stats["holds_timed_out"] += 1
                self._release(flow, now)
