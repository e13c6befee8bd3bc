"""The per-flow SAL state machine: handshake, close, reset and control retransmission.

Sans-IO: methods take the time ``now`` and return SAL headers to send or events; the
caller owns sockets and clocks. Numbering follows the reference (see docs/protocol.md):
SYN and FIN (and RSYN) consume one control number, ACKs and RSYN|ACK do not; ``ackno``
always names the next number expected from the peer.

One control packet is outstanding at a time; it is retransmitted with an RTO that starts
at 3 s, doubles up to 120 s, and gives up after 15 tries. A control packet that carries a
transport segment (the handshake) keeps that segment, so a retransmission is complete.
"""
from dataclasses import dataclass
from enum import Enum

from .wire import ACK, FIN, RSYN, RST, SYN, Control, SalHeader, Service

RTO_INITIAL, RTO_MIN, RTO_MAX, MAX_TRIES = 3.0, 0.2, 120.0, 15
MASK32 = 0xFFFFFFFF


class State(Enum):
    SYN_SENT = "syn-sent"          # we sent SYN, waiting for SYN|ACK
    SYN_SEEN = "syn-seen"          # we got a SYN, our SYN|ACK is not out yet
    SYN_RECEIVED = "syn-received"  # we sent SYN|ACK, waiting for ACK
    ESTABLISHED = "established"
    CLOSED = "closed"              # both directions finished
    RESET = "reset"
    FAILED = "failed"              # a control packet was never answered


# Events returned by ``receive`` and ``handle_timer``
class Event(Enum):
    ESTABLISHED = "established"
    PEER_FIN = "peer-fin"          # the peer finished sending
    FIN_ACKED = "fin-acked"        # our FIN was acknowledged
    CLOSED = "closed"
    RESET = "reset"
    FAILED = "failed"
    MIGRATED = "migrated"          # our RSYN was answered: the new path is confirmed
    PEER_MOVING = "peer-moving"    # the peer sent an RSYN from a new address
    PEER_MOVED = "peer-moved"      # ... and acknowledged our RSYN|ACK: switch to it


@dataclass(slots=True)
class Outstanding:
    header: SalHeader
    transport: bytes       # segment carried with it (b"" for control-only)
    deadline: float
    rto: float
    tries: int = 1


class Rejected(Exception):
    """A control packet that fails validation (wrong nonce or numbers); ``reason`` counts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SalFlow:
    __slots__ = ("local_flow", "remote_flow", "local_nonce", "remote_nonce", "snd_nxt",
                 "rcv_nxt", "state", "fin_pending", "fin_sent", "fin_acked", "peer_fin",
                 "outstanding", "service_id", "rto_initial", "migrate_pending", "peer_moving",
                 "protocol")

    def __init__(self, local_flow: int, local_nonce: bytes, initial_verno: int,
                 rto_initial: float = RTO_INITIAL, protocol: int = 6):
        self.local_flow = local_flow
        self.protocol = protocol       # the transport after the SAL: 6 TCP, 17 UDP
        self.remote_flow = 0
        self.local_nonce = local_nonce
        self.remote_nonce: bytes | None = None
        self.snd_nxt = initial_verno & MASK32
        self.rcv_nxt = 0
        self.state: State | None = None
        self.fin_pending = self.fin_sent = self.fin_acked = self.peer_fin = False
        self.migrate_pending = self.peer_moving = False
        self.outstanding: Outstanding | None = None
        self.service_id: bytes | None = None
        self.rto_initial = rto_initial

    # --- opening -------------------------------------------------------------------
    def connect(self, service_id: bytes, transport: bytes, now: float) -> SalHeader:
        """Client: the SYN (CONTROL + SERVICE), carrying the legacy SYN segment."""
        self.service_id = service_id
        self.state = State.SYN_SENT
        hdr = self._control(SYN, ackno=0, service=True)
        self.snd_nxt = (self.snd_nxt + 1) & MASK32
        self._send(hdr, transport, now)
        return hdr

    def accept(self, syn: SalHeader) -> None:
        """Server: take the peer's SYN; the SYN|ACK goes out with the backend's SYN-ACK."""
        ctl = syn.control
        if ctl is None or not ctl.flags & SYN:
            raise Rejected("not_a_syn")
        self.remote_flow = syn.src_flow
        self.remote_nonce = ctl.nonce
        self.rcv_nxt = (ctl.verno + 1) & MASK32
        self.service_id = syn.service.service_id if syn.service else None
        self.state = State.SYN_SEEN

    def syn_ack(self, transport: bytes, now: float) -> SalHeader:
        """Server: the SYN|ACK (or its repetition), carrying the backend's SYN-ACK."""
        if self.state == State.SYN_SEEN:
            hdr = self._control(SYN | ACK)
            self.snd_nxt = (self.snd_nxt + 1) & MASK32
            self.state = State.SYN_RECEIVED
            self._send(hdr, transport, now)
            return hdr
        # a repeated backend SYN-ACK: same numbers as the first
        hdr = self._control(SYN | ACK, verno=(self.snd_nxt - 1) & MASK32)
        if self.outstanding is not None:
            self.outstanding.transport = transport
        return hdr

    def challenge(self) -> SalHeader:
        """Server: ask the peer whether it still holds this flow (a SYN named its flowID
        with another nonce), as TCP answers a SYN in ESTABLISHED with a challenge ACK
        (RFC 5961). It is our SYN|ACK again, numbered with a number the peer has already
        had: a peer that holds the flow answers with an ACK (the reference does so for
        any control packet with an old number, ours for a repeated SYN|ACK), carrying
        the nonce we know; a peer that lost the flow stays silent or resets."""
        spent = 2 if self.outstanding is not None else 1   # the outstanding one may not have arrived
        return self._control(SYN | ACK, verno=(self.snd_nxt - spent) & MASK32)

    def handshake_ack(self) -> SalHeader:
        """Client: the ACK that completes the handshake (CONTROL + SERVICE)."""
        return self._control(ACK, service=True)

    def keepalive(self) -> SalHeader:
        """A bare ACK of what we have (it consumes no number and asks for no answer):
        traffic that keeps a NAT's mapping of an idle flow alive."""
        return self._control(ACK)

    # --- closing -------------------------------------------------------------------
    def close(self, now: float) -> SalHeader | None:
        """Our side has finished sending: a SAL FIN, now or once the outstanding
        control packet is answered (then ``take_pending`` returns it)."""
        if self.fin_pending or self.fin_sent or self.state in (State.CLOSED, State.RESET, State.FAILED):
            return None
        self.fin_pending = True
        return self.take_pending(now)

    def take_pending(self, now: float) -> SalHeader | None:
        """A control packet that waited for the outstanding one (an RSYN before a FIN),
        if it is now due."""
        if self.outstanding is not None or self.state not in (State.ESTABLISHED, State.CLOSED):
            return None
        if self.migrate_pending:
            self.migrate_pending = False
            flags = RSYN
        elif self.fin_pending:
            self.fin_pending, self.fin_sent = False, True
            flags = FIN
        else:
            return None
        hdr = self._control(flags)
        self.snd_nxt = (self.snd_nxt + 1) & MASK32
        self._send(hdr, b"", now)
        return hdr

    # --- migration -----------------------------------------------------------------
    @property
    def migrating(self) -> bool:
        """Our RSYN is out (or waiting to go out) and not yet answered."""
        out = self.outstanding
        return self.migrate_pending or (out is not None and bool(out.header.flags & RSYN))

    def migrate(self, now: float) -> SalHeader | None:
        """Our address changed: an RSYN, to be sent from the new address (now, or once
        the outstanding control packet is answered). Moving again before the first move
        is confirmed repeats the same RSYN from the newest address."""
        if self.state != State.ESTABLISHED:
            return None
        out = self.outstanding
        if out is not None and out.header.flags & RSYN:
            out.rto = max(self.rto_initial, RTO_MIN)
            out.deadline = now + out.rto
            return out.header
        if out is not None:
            self.migrate_pending = True
            return None
        self.migrate_pending = True
        return self.take_pending(now)

    def reset(self) -> SalHeader:
        self.state = State.RESET
        self.outstanding = None
        self.fin_pending = self.migrate_pending = False
        return self._control(RST)

    # --- input ---------------------------------------------------------------------
    def receive(self, hdr: SalHeader, now: float, on_path: bool = False) -> tuple[list, list]:
        """Process a packet's CONTROL extension. Returns (events, headers to send).

        ``on_path`` says the packet came from the peer's current address naming both
        flowIDs: enough to accept a RST without our nonce (a peer that lost its state
        cannot know it). Raises Rejected for a control packet that must be dropped."""
        ctl = hdr.control
        if ctl is None:
            # plain data: in SYN_RECEIVED it stands in for a lost handshake ACK
            if self.state == State.SYN_RECEIVED:
                return self._established(), []
            return [], []
        flags = ctl.flags
        if flags & RST:
            return self._on_reset(ctl, on_path and hdr.src_flow == self.remote_flow)
        if self.state == State.SYN_SENT and flags & SYN and flags & ACK:
            return self._on_syn_ack(hdr, ctl)
        if self.remote_nonce is not None and ctl.nonce != self.remote_nonce:
            raise Rejected("bad_nonce")
        events, out = [], []
        if flags & RSYN:
            return self._on_rsyn_ack(ctl) if flags & ACK else self._on_rsyn(ctl)
        if flags & SYN:
            if self.state in (State.SYN_SEEN, State.SYN_RECEIVED):
                return [], []            # a retransmitted SYN: the caller re-offers it
            if self.state == State.ESTABLISHED and flags & ACK:
                return [], [self.handshake_ack()]   # our ACK was lost: repeat it
            raise Rejected("unexpected_syn")
        # judge the whole packet before acting on any part of it
        if flags & ACK and self.state == State.SYN_SENT:
            raise Rejected("unexpected_ack")     # only a SYN|ACK answers our SYN
        if flags & FIN and ctl.verno != self.rcv_nxt \
                and not (ctl.verno == (self.rcv_nxt - 1) & MASK32 and self.peer_fin):
            raise Rejected("bad_verno")
        if flags & ACK:
            events += self._on_ack(ctl)
        if flags & FIN:
            if ctl.verno == (self.rcv_nxt - 1) & MASK32 and self.peer_fin:
                out.append(self._control(ACK))          # repeated FIN: re-acknowledge
            elif ctl.verno != self.rcv_nxt:
                raise Rejected("bad_verno")
            else:
                self.peer_fin = True
                self.rcv_nxt = (self.rcv_nxt + 1) & MASK32
                out.append(self._control(ACK))
                events.append(Event.PEER_FIN)
        events += self._maybe_closed()
        return events, out

    def _on_syn_ack(self, hdr: SalHeader, ctl: Control):
        if ctl.ackno != self.snd_nxt:
            raise Rejected("bad_ackno")
        self.remote_flow = hdr.src_flow
        self.remote_nonce = ctl.nonce
        self.rcv_nxt = (ctl.verno + 1) & MASK32
        self.outstanding = None
        self.state = State.ESTABLISHED
        return [Event.ESTABLISHED], []

    def _on_rsyn(self, ctl: Control):
        if ctl.verno == self.rcv_nxt:
            self.rcv_nxt = (self.rcv_nxt + 1) & MASK32
        elif not (self.peer_moving and ctl.verno == (self.rcv_nxt - 1) & MASK32):
            raise Rejected("bad_verno")       # (a repeated RSYN is answered again)
        if self.state not in (State.ESTABLISHED, State.CLOSED):
            raise Rejected("unexpected_rsyn")
        self.peer_moving = True
        return [Event.PEER_MOVING], [self._control(RSYN | ACK)]

    def _on_rsyn_ack(self, ctl: Control):
        if ctl.ackno != self.snd_nxt:
            raise Rejected("bad_ackno")
        out = self.outstanding
        if out is not None and out.header.flags & RSYN:
            self.outstanding = None
            return [Event.MIGRATED], [self._control(ACK)]
        return [], [self._control(ACK)]       # a repeated RSYN|ACK: our ACK was lost

    def _on_ack(self, ctl: Control) -> list:
        if ctl.ackno != self.snd_nxt:
            raise Rejected("bad_ackno")
        events = []
        if self.peer_moving:
            self.peer_moving = False
            events.append(Event.PEER_MOVED)
        if self.state == State.SYN_RECEIVED:
            events += self._established()
        out = self.outstanding
        if out is not None and out.header.flags & FIN:
            self.fin_acked = True
            events.append(Event.FIN_ACKED)
        self.outstanding = None
        return events

    def _on_reset(self, ctl: Control, on_path: bool):
        # Stricter than the reference, which checks nothing: a RST must carry the peer's
        # nonce, come from its path naming both flowIDs, or (before we know the nonce)
        # acknowledge our SYN.
        if self.remote_nonce is not None and ctl.nonce != self.remote_nonce and not on_path:
            raise Rejected("bad_nonce")
        if self.remote_nonce is None and ctl.ackno != self.snd_nxt:
            raise Rejected("bad_ackno")
        self.state = State.RESET
        self.outstanding = None
        self.fin_pending = self.migrate_pending = False
        return [Event.RESET], []

    def _established(self) -> list:
        self.state = State.ESTABLISHED
        self.outstanding = None
        return [Event.ESTABLISHED]

    def _maybe_closed(self) -> list:
        if self.fin_acked and self.peer_fin and self.state != State.CLOSED:
            self.state = State.CLOSED
            return [Event.CLOSED]
        return []

    # --- timers --------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        return self.outstanding.deadline if self.outstanding else None

    def handle_timer(self, now: float) -> tuple[list, list]:
        """Returns (events, [(header, transport)] to retransmit)."""
        out = self.outstanding
        if out is None or now < out.deadline:
            return [], []
        if out.tries >= MAX_TRIES:
            self.state = State.FAILED
            self.outstanding = None
            self.fin_pending = self.migrate_pending = False
            return [Event.FAILED], []
        out.tries += 1
        out.rto = min(max(out.rto * 2, RTO_MIN), RTO_MAX)
        out.deadline = now + out.rto
        return [], [(out.header, out.transport)]

    # --- helpers -------------------------------------------------------------------
    def _control(self, flags: int, ackno: int | None = None, verno: int | None = None,
                 service: bool = False) -> SalHeader:
        ctl = Control(flags, self.snd_nxt if verno is None else verno,
                      self.rcv_nxt if ackno is None else ackno, self.local_nonce)
        exts = [ctl]
        if service and self.service_id is not None:
            exts.append(Service(self.service_id))
        return SalHeader(self.local_flow, self.remote_flow, self.protocol, exts)

    def _send(self, hdr: SalHeader, transport: bytes, now: float) -> None:
        rto = max(self.rto_initial, RTO_MIN)
        self.outstanding = Outstanding(hdr, transport, now + rto, rto)
