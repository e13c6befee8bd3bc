"""ICMP errors about packets a gateway translated, on either side.

* About a SAL packet we sent (a router on the path could not forward it): the flow is
  found by the quoted flowIDs and believed only if the quote matches it exactly — our
  address, the peer's, both flowIDs, and our nonce when the quote is a control packet —
  so a forger off the path can neither shrink nor kill a flow. "Fragmentation needed"
  lowers the path MTU toward that peer and goes on to the legacy sender as its own
  frag-needed (our overhead taken off the MTU, the quote rewritten into the packet that
  sender sent), so its PMTU discovery does the rest. Any other error ends a flow still in
  its handshake (the legacy client is refused at once); an established flow only counts
  it, as TCP does with soft errors (RFC 1122 4.2.3.9): a route may come back, a peer
  gateway may be restarting.
* About a legacy packet we sent (toward the backend, or the legacy client): the same
  rule — a handshake ends at once and the peer is told with a SAL RST.

Anything that is not about one of our flows passes, untouched, to the host's own stack.
"""
import struct

from sal import icmp
from sal.checksum import checksum
from sal.flow import State
from sal.wire import BASE_LEN, MalformedPacket, decode

from .events import PathMtuLowered
from .verdict import PASS

_U32 = struct.Struct("!I")
# path MTU learnt per peer: kept this long, then forgotten (the path may have grown)
PMTU_TIMEOUT = 600.0


class IcmpMixin:
    """Mixed into Translator: ``from_icmp`` and the path MTU it learns."""

    def _init_icmp(self) -> None:
        self.peer_mtu: dict[bytes, tuple[int, float]] = {}   # peer -> (path MTU, expiry)

    def from_icmp(self, pkt: bytes, now: float):
        try:
            if len(pkt) < 20 or pkt[0] >> 4 != 4 or int.from_bytes(pkt[2:4], "big") != len(pkt) \
                    or int.from_bytes(pkt[6:8], "big") & 0x3FFF:
                return PASS
            err = icmp.parse(pkt)
        except MalformedPacket as exc:
            self.stats[f"dropped_{exc.reason}"] += 1
            return None
        if err is None:
            return PASS
        if err.quoted_protocol == self.carriage.protocol:
            out = self._icmp_about_sal(err, now)
            if out is not PASS or err.quoted_protocol != 17:
                return out
        if err.quoted_protocol == 6:
            return self._icmp_about_legacy(err, now)
        if err.quoted_protocol == 17 and self.udp_flows:
            return self._icmp_about_udp(err, now)      # (udp.py)
        return PASS

    # --- about SAL we sent -----------------------------------------------------------
    def _icmp_about_sal(self, err, now: float):
        found = self.carriage.unwrap_quoted(err.quoted, err.quoted_ihl)
        if found is None:
            return PASS           # another UDP port: not our carriage
        body = found
        if len(body) < 8:
            self.stats["dropped_icmp_short_quote"] += 1
            return None
        src_flow, dst_flow = struct.unpack_from("!II", body)
        flow = self.flows.get(src_flow)
        if flow is None:
            if self.local_addresses and err.quoted_src not in self.local_addresses:
                return PASS       # someone else's SAL, forwarded through us
            self.stats["dropped_icmp_no_flow"] += 1
            return None
        if not self._quote_matches_flow(flow, err, body, dst_flow):
            self.stats["dropped_icmp_unverified"] += 1
            return None
        if err.frag_needed:
            self._learn_path_mtu(flow, err, body, now)
            return None
        if self._in_handshake(flow) and _a_refusal(err):
            self.stats["icmp_refused_handshake"] += 1
            self._reset_legacy(flow)
            self._finish(flow, now, "unreachable")
        else:
            self.stats["icmp_soft_errors"] += 1
        return None

    def _quote_matches_flow(self, flow, err, body: bytes, dst_flow: int) -> bool:
        """The quote is of a packet this flow sent: from our address (this one or the
        one a move left), to the peer or to the next hop its SYN went to, naming the
        peer's flowID (none yet for a SYN), with our nonce if it quotes a control part."""
        if err.quoted_src != flow.local_addr and err.quoted_src not in self.local_addresses:
            return False
        if err.quoted_dst != flow.peer_addr and err.quoted_dst != flow.prev_peer_addr:
            return False
        if dst_flow != flow.sal.remote_flow and not (dst_flow == 0 and flow.sal.state == State.SYN_SENT):
            return False
        if len(body) > BASE_LEN and body[8] * 4 > BASE_LEN:
            # a control packet: believed only with its nonce, which never left the path
            if len(body) < body[8] * 4:
                return False
            try:
                hdr, _ = decode(body)
            except MalformedPacket:
                return False
            ctl = hdr.control
            if ctl is None or ctl.nonce != flow.sal.local_nonce:
                return False
        return True

    def _in_handshake(self, flow) -> bool:
        state = flow.sal.state
        return state in (State.SYN_SENT, State.SYN_SEEN, State.SYN_RECEIVED) or flow.send_handshake_ack

    def _learn_path_mtu(self, flow, err, body: bytes, now: float) -> None:
        mtu = err.next_hop_mtu()
        if mtu >= err.quoted_length:
            self.stats["dropped_icmp_mtu_not_lower"] += 1
            return
        self.stats["icmp_frag_needed"] += 1
        known = self.peer_mtu.get(flow.peer_addr)
        if known is None or mtu < known[0] or known[1] <= now:
            self.peer_mtu[flow.peer_addr] = (mtu, now + PMTU_TIMEOUT)
            self.events.append(PathMtuLowered(flow))
        hlen = body[8] * 4
        seg = body[hlen:]
        if hlen != BASE_LEN or len(seg) < 8 or (flow.legacy_key is None and flow.udp is None):
            return                              # a control packet: nothing to tell the legacy host
        legacy_mtu = mtu - BASE_LEN - self.carriage.overhead
        quoted = self._legacy_quote(flow, err, seg)
        self.outbox.append(icmp.build_error(flow.legacy_dst, flow.legacy_src, icmp.DEST_UNREACH,
                                            icmp.FRAG_NEEDED, quoted, legacy_mtu))
        self.stats["icmp_frag_needed_sent"] += 1

    def _legacy_quote(self, flow, err, seg: bytes) -> bytes:
        """The quoted SAL packet as the legacy host sent it: its addresses and ports,
        the length without our headers, the rest of its TCP (or UDP) bytes as they were."""
        overhead = BASE_LEN + self.carriage.overhead
        q = err.quoted
        length = max(err.quoted_length - overhead, 20 + len(seg))
        head = bytearray(q[:20])
        head[0] = 0x45
        head[2:4] = length.to_bytes(2, "big")
        head[9] = flow.sal.protocol
        head[10:12] = b"\0\0"
        head[12:16], head[16:20] = flow.legacy_src, flow.legacy_dst
        head[10:12] = checksum(bytes(head)).to_bytes(2, "big")
        ports = struct.pack("!HH", flow.legacy_sport, flow.legacy_dport)
        return bytes(head) + ports + seg[4:]

    def mss_limit_toward(self, peer: bytes, now: float) -> int:
        """The MSS a new flow toward ``peer`` may use: the configured MTU, lowered by a
        path MTU an ICMP taught (while it is fresh)."""
        known = self.peer_mtu.get(peer)
        if known is None:
            return self.mss_limit
        if known[1] <= now:
            del self.peer_mtu[peer]
            return self.mss_limit
        return min(self.mss_limit, known[0] - self._mss_overhead)

    # --- about legacy TCP we sent ----------------------------------------------------
    def _flow_of_legacy_quote(self, src: bytes, dst: bytes, sport: int, dport: int):
        """The flow that sent the quoted legacy packet (``src``:``sport`` is our side of
        the legacy connection), or None; each side keys its flows its own way."""
        raise NotImplementedError

    def _icmp_about_legacy(self, err, now: float):
        ports = icmp.quoted_tcp(err.quoted)
        if ports is None:
            return PASS
        sport, dport, _seq = ports
        flow = self._flow_of_legacy_quote(err.quoted_src, err.quoted_dst, sport, dport)
        if flow is None:
            return PASS           # the host's own connection: the kernel's
        if err.frag_needed:
            self.stats["icmp_legacy_frag_needed"] += 1
            return PASS
        if self._in_handshake(flow) and flow.closed_at is None:
            self.stats["icmp_legacy_unreachable"] += 1
            self._end_unreachable(flow, now)
        else:
            self.stats["icmp_soft_errors"] += 1
        return None

    def _end_unreachable(self, flow, now: float) -> None:
        """The legacy host cannot be reached for the flow: it ends, and the peer hears
        a SAL RST once it knows our flow."""
        if flow.sal.remote_flow:
            self._emit_sal(flow, flow.sal.reset().encode())
            self.stats["sal_resets_sent"] += 1
        self._finish(flow, now, "unreachable")


def _a_refusal(err) -> bool:
    """An error that refuses a handshake: the hop we sent it to says it cannot reach
    anyone for it (a service router with no live instance says host unreachable). A hop
    whose daemon is down answers with its kernel's protocol or port unreachable instead:
    not a refusal, the SYN goes on (to another router, once that one is known dead)."""
    return (err.type == icmp.DEST_UNREACH and err.src == err.quoted_dst
            and err.code in (icmp.NET_UNREACH, icmp.HOST_UNREACH, icmp.ADMIN_PROHIBITED))
