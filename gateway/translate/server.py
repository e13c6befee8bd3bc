"""The server side: SAL flows become legacy TCP toward unmodified backends."""
from collections import deque
from dataclasses import dataclass

from sal.flow import State
from sal.ip import IPv4, TCP_ACK, TCP_RST, TCP_SYN, ntoa
from sal.service_table import Action, ServiceTable
from sal.wire import SYN

from .base import PASS, Flow, Translator, _TCP_PORTS, _U16, _U32


@dataclass(frozen=True)
class Backend:
    """A legacy server: where DEMUX sends a service. ``source`` is our address facing it."""
    address: bytes
    port: int
    source: bytes
    name: str = ""

    def __str__(self):
        return f"{ntoa(self.address)}:{self.port}"


class PortPool:
    """Local ports toward one backend; freed ports go to the back, so that a port is
    reused as late as possible (the backend may still hold it in TIME_WAIT). A pool
    starts at a random place, so a restarted gateway does not reuse the very ports its
    previous run just closed."""

    def __init__(self, low: int, high: int, rng=None):
        self.free = deque(range(low, high + 1))
        if rng is not None:
            self.free.rotate(-rng.randrange(len(self.free)))

    def take(self) -> int | None:
        return self.free.popleft() if self.free else None

    def give_back(self, port: int) -> None:
        self.free.append(port)


class ServerTranslator(Translator):
    role = "server"

    def __init__(self, table: ServiceTable, carriage, port_range: tuple[int, int] = (10000, 32767),
                 keep_client_address: bool = False, **kwargs):
        """``table`` maps serviceIDs to DEMUX targets whose target is a ``Backend``.
        With ``keep_client_address`` the backend sees the SAL peer's (client gateway's)
        address instead of ours, and must route it back through this gateway."""
        super().__init__(carriage, **kwargs)
        self.table = table
        self.port_range = port_range
        self.keep_client_address = keep_client_address
        self.by_peer: dict[tuple, Flow] = {}      # (peer address, peer flowID)
        self.by_backend: dict[tuple, Flow] = {}   # (backend address, port, our port)
        self.pools: dict[tuple, PortPool] = {}

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
            if self.local_addresses and ip.dst not in self.local_addresses:
                return PASS                  # a SYN on its way elsewhere
            return self._on_syn(pkt, ip, hdr, off, peer_port, body, now)
        flow = self.flows.get(hdr.dst_flow)
        if flow is None:
            return self._answer_unknown(ip, hdr, peer_port)
        return self._from_sal_flow(flow, pkt, ip, hdr, off, peer_port, body, now)

    def _on_syn(self, pkt: bytes, ip: IPv4, hdr, off: int, peer_port: int, body: bytes, now: float):
        ctl = hdr.control
        if ctl is None or not ctl.flags & SYN or off >= len(body):
            self.stats["dropped_no_flow"] += 1
            return None
        seg = body[off:]
        flow = self.by_peer.get((ip.src, hdr.src_flow))
        if flow is not None:
            if flow.sal.state not in (State.SYN_SEEN, State.SYN_RECEIVED):
                self.stats["dropped_unexpected_syn"] += 1
                return None
            self.stats["syn_repeated"] += 1       # the legacy client retried: so do we
            return self._syn_to_backend(flow, pkt, seg, now, ip)
        if not self.accepting:
            self.stats["refused_draining"] += 1
            return None
        service = hdr.service
        target = self.table.resolve(service.service_id) if service else None
        if target is None or target.action != Action.DEMUX:
            # as the reference: a SYN that matches nothing is dropped, not reset
            self.stats["dropped_no_service"] += 1
            return None
        backend: Backend = target.target
        source = hdr.source
        reply_to = source.addresses[0] if source and source.addresses else ip.src
        if not self._admit(reply_to):
            return None
        pool = self.pools.get((backend.address, backend.port))
        if pool is None:
            pool = self.pools[(backend.address, backend.port)] = PortPool(*self.port_range, rng=self.rng)
        port = pool.take()
        if port is None:
            self.stats["dropped_ports_exhausted"] += 1
            return None
        flow = self._new_flow(now)
        flow.sal.accept(hdr)                 # a SYN with CONTROL: checked above
        self._opened(flow, reply_to)
        flow.local_addr = ip.dst
        flow.peer_addr = reply_to
        flow.peer_port = peer_port
        flow.extra = (backend, pool, port, (ip.src, hdr.src_flow))
        ours = ip.src if self.keep_client_address else backend.source
        flow.set_legacy(backend.address, ours, backend.port, port)
        flow.legacy_key = (backend.address, backend.port, port)
        flow.rebuild(self.carriage)
        flow.legacy_last_ack = (_U32.unpack_from(seg, 4)[0] + 1) & 0xFFFFFFFF   # what the backend expects
        self.by_peer[flow.extra[3]] = flow
        self.by_backend[flow.legacy_key] = flow
        return self._syn_to_backend(flow, pkt, seg, now, ip)

    def _syn_to_backend(self, flow: Flow, pkt: bytes, seg: bytes, now: float, ip: IPv4) -> bytes:
        # the SYN's checksum is over its own addresses, which need not be the flow's
        # (a SOURCE naming another peer, a repeated SYN to another of our addresses)
        in_delta = self._in_delta_for(flow, ip)
        seg, csum_delta = self._clamp(seg, flow.in_delta if in_delta is None else in_delta, flow.peer_addr, now)
        self.stats["from_sal"] += 1
        return self._to_legacy(flow, pkt, seg, now, csum_delta)

    # --- backend side --------------------------------------------------------------
    def from_backend(self, pkt: bytes, now: float):
        # only whole, unfragmented TCP is ours; anything else passes untouched
        if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6 or _U16.unpack_from(pkt, 2)[0] != len(pkt) \
                or pkt[6] & 0x3F or pkt[7]:
            return PASS
        seg = pkt[(pkt[0] & 15) * 4:]
        if len(seg) < 20:
            return PASS
        sport, dport = _TCP_PORTS.unpack_from(seg)
        flow = self.by_backend.get((pkt[12:16], sport, dport))
        if flow is None or pkt[16:20] != flow.legacy_dst:
            return PASS          # not a translated connection: the kernel answers it
        flags = seg[13]
        state = flow.sal.state
        if state in (State.SYN_SEEN, State.SYN_RECEIVED):
            if flags & TCP_SYN and flags & TCP_ACK:
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
        if not self._track_tcp(flow, seg, True, now):
            return None
        if flow.held is not None:
            self._hold(flow, pkt)            # a move is unconfirmed: wait for the new path
            return None
        self.stats["to_sal"] += 1
        return self._to_sal(flow, pkt, seg, now, flow.out_hdr)

    def adopt(self, flow: Flow, row: dict) -> bool:
        """Take a flow back from a snapshot (see snapshot.py): its port leaves the pool."""
        address, port, source, name = row["backend"]
        backend = Backend(bytes.fromhex(address), port, bytes.fromhex(source), name)
        key = (backend.address, backend.port)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = PortPool(*self.port_range, rng=self.rng)
        if row["port"] not in pool.free:
            return False
        pool.free.remove(row["port"])
        peer_key = (bytes.fromhex(row["peer_key"][0]), row["peer_key"][1])
        flow.extra = (backend, pool, row["port"], peer_key)
        flow.legacy_key = (backend.address, backend.port, row["port"])
        self.by_peer[peer_key] = flow
        self.by_backend[flow.legacy_key] = flow
        self._adopt_common(flow, flow.peer_addr, flow.last_seen)
        return True

    def _evicted(self, flow: Flow) -> None:
        # the backend holds a half-open connection for it, and would keep repeating its
        # SYN-ACK: a RST frees it at once
        if flow.legacy_key is not None:
            self._reset_legacy(flow)

    def _flow_of_legacy_quote(self, src: bytes, dst: bytes, sport: int, dport: int):
        # we sent it toward the backend: from our port on our address facing it
        flow = self.by_backend.get((dst, dport, sport))
        return flow if flow is not None and flow.legacy_dst == src else None

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
        if flow.extra is None:
            return
        backend, pool, port, peer_key = flow.extra
        if self.by_backend.get(flow.legacy_key) is flow:
            del self.by_backend[flow.legacy_key]
            pool.give_back(port)
        if self.by_peer.get(peer_key) is flow:
            del self.by_peer[peer_key]
