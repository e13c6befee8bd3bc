"""TFTP through the server gateway: the server answers from a new port.

A TFTP server (RFC 1350) answers a read or write request (RRQ, WRQ) not from the port
it listens on but from a new one, its transfer ID, and the transfer then runs between
that port and the client's. The legacy client has one UDP flow, toward the service's
virtual address:port; this helper keeps it one flow, as Linux's nf_conntrack_tftp with
its NAT helper does for a client behind a NAT. For a UDP service with
``helper = "tftp"`` (``Backend.helper``), on the server gateway:

* a request (opcode 1 or 2) the flow carries toward the backend goes to the service's
  own port (the backend's ``port``), whichever port the last transfer used, and arms
  the flow to expect the answer from a new port;
* while armed, the first well-formed datagram from the backend host, from another port,
  to the flow's own backend-side address and port, makes that port the flow's
  (``tftp_transfer_ports``): it is translated onto the same SAL flow, so the client
  sees it come from the virtual address:port it asked, as tftp clients expect (they
  take the server's port from its first answer), and the client's later datagrams go
  to the new port;
* anything else from the backend host toward a helper flow's address and port, from a
  port that is not the flow's, is dropped and counted (``dropped_tftp_unexpected_port``):
  a second server process answering a retransmitted request, say.

The helper reads only the opcode; the transfer itself stays between the legacy hosts.
A helper flow's backend port changes under it, so it stays on the Python path.
"""
import struct

from sal.checksum import delta, fold

from .verdict import PASS

NAME = "tftp"
_U16 = struct.Struct("!H")
_REQUESTS = (b"\0\x01", b"\0\x02")     # RRQ, WRQ


class TftpState:
    """A helper flow's own state (``flow.udp.helper``)."""
    __slots__ = ("service_port", "armed")

    def __init__(self, service_port: int):
        self.service_port = service_port   # where requests go (the backend's configured port)
        self.armed = False                 # a request went out: its answer may come from a new port


class TftpFlows:
    """The server gateway's TFTP flows, found by our address and port toward the backend
    (what a reply from a new port still names)."""

    def __init__(self, stats):
        self.stats = stats
        self.flows: dict = {}       # backend address + our address + our port -> Flow

    @staticmethod
    def _ours(key: bytes) -> bytes:
        return key[:8] + key[10:]    # (UdpState.key: backend, ours, backend port, our port)

    def track(self, flow, service_port: int) -> None:
        """A new flow of a TFTP service."""
        flow.udp.helper = TftpState(service_port)
        self.flows[self._ours(flow.udp.key)] = flow

    def forget(self, flow) -> None:
        ours = self._ours(flow.udp.key)
        if self.flows.get(ours) is flow:
            del self.flows[ours]

    def toward_backend(self, translator, flow, seg: bytes, csum_delta: int | None) -> int | None:
        """A datagram of ``flow`` on its way to the backend (``seg``: its UDP header with
        ports 0, then the payload): a request re-aims the flow at the service's port and
        arms it. Returns ``csum_delta`` (a delta given for this packet's addresses)
        corrected for a changed port."""
        if seg[8:10] not in _REQUESTS:
            return csum_delta
        state = flow.udp.helper
        state.armed = True
        self.stats["tftp_requests"] += 1
        old = flow.legacy_sport
        if old != state.service_port:
            self._move(translator, flow, state.service_port)
            if csum_delta is not None:
                csum_delta = fold(csum_delta + delta(_U16.pack(old), _U16.pack(state.service_port)))
        return csum_delta

    def reply_from_new_port(self, translator, pkt: bytes, ihl: int):
        """A datagram from a backend that matched no flow by its 4-tuple: the helper
        flow it now belongs to (moved to its source port), None when it is dropped
        (counted), or PASS when it is no helper flow's business."""
        flow = self.flows.get(pkt[12:20] + pkt[ihl + 2:ihl + 4])
        if flow is None:
            return PASS
        n = len(pkt)
        if (_U16.unpack_from(pkt, 2)[0] != n or pkt[6] & 0x3F or pkt[7]
                or _U16.unpack_from(pkt, ihl + 4)[0] != n - ihl):
            self.stats["malformed"] += 1
            self.stats["dropped_udp_bad_length"] += 1
            return None
        state = flow.udp.helper
        if not state.armed or flow.closed_at is not None:
            self.stats["dropped_tftp_unexpected_port"] += 1
            return None
        state.armed = False
        self._move(translator, flow, _U16.unpack_from(pkt, ihl)[0])
        self.stats["tftp_transfer_ports"] += 1
        return flow

    @staticmethod
    def _move(translator, flow, port: int) -> None:
        """``flow``'s backend port is now ``port``: its key and rewrite constants follow."""
        flows = translator.udp_flows
        old = flow.udp.key
        new = old[:8] + _U16.pack(port) + old[10:]
        if flows.get(old) is flow:
            del flows[old]
        other = flows.get(new)
        if other is not None:
            translator._forget(other)     # a closed flow lingering on the same ports
        flow.udp.key = new
        flows[new] = flow
        flow.set_legacy(flow.legacy_src, flow.legacy_dst, port, flow.legacy_dport)
        flow.rebuild(translator.carriage)
