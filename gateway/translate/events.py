"""What happened to flows, as typed records the translator appends to ``events``.

The daemon drains them after each batch of packets and each timer: the kernel fast
path installs, parks and removes its map entries from them (gateway/fastpath), and
they say when a flow was established, moved or closed without anyone diffing the flow
table.
"""
from dataclasses import dataclass


@dataclass(slots=True)
class FlowEstablished:
    """Both handshakes are done: the flow carries plain data both ways."""
    flow: object
    rtt: float | None            # seconds from the first SYN (None for a resumed flow)


@dataclass(slots=True)
class FlowMoving:
    """A move is unconfirmed: packets are held, only the slow path may carry them."""
    flow: object


@dataclass(slots=True)
class FlowMoved:
    """The flow's path is confirmed: (local, peer) addresses before and after."""
    flow: object
    old: tuple
    new: tuple


@dataclass(slots=True)
class FlowSteady:
    """Plain data again after a packet that only Python could judge (a FIN or RST that
    proved damaged): whatever that packet made the kernel hand over comes back."""
    flow: object


@dataclass(slots=True)
class FlowClosing:
    """A FIN or RST was seen: the close is followed packet by packet from here."""
    flow: object


@dataclass(slots=True)
class FlowClosed:
    """The flow left every table."""
    flow: object
    reason: str
    bytes_out: int
    bytes_in: int


@dataclass(slots=True)
class UdpAnswered:
    """A UDP backend sent its first datagram on a flow (server side): it is alive (a
    UDP flow's SAL handshake says nothing about the backend)."""
    flow: object


@dataclass(slots=True)
class UdpRefused:
    """A UDP backend answered a flow's datagram with port (or protocol) unreachable
    before it ever answered on it (server side)."""
    flow: object


@dataclass(slots=True)
class PathMtuLowered:
    """An ICMP about ``flow``'s packet taught a lower path MTU toward its peer: what fit
    before may not any more (the kernel fast path's UDP flows carry a size limit)."""
    flow: object
