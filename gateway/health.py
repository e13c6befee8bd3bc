"""Backend health, sans-IO: check results and real flows' outcomes in, up/down
transitions out.

``kind = "tcp"``: the backend is checked every ``interval`` (a TCP connect, done by the
adapter). Its first result decides at once (so a gateway registers as soon as its
backend answers, and never before); after that, ``fall`` consecutive failures take it
down and ``rise`` consecutive successes bring it back, so one lost probe does not flap
the registration.

Live traffic counts too (passive checks, as Envoy's outlier detection): a real flow's
handshake that the backend answered is a success and puts the next probe off by an
interval, so a busy backend is hardly probed; one it refused (RST to the SYN) or never
answered is a failure and calls a probe at once.

``kind = "dns"``: as "tcp", but each probe is a real DNS query over UDP (the adapter
sends :func:`dns_probe` and waits for an answer that :func:`dns_answered` accepts;
a port unreachable or no answer is a failure). A UDP service gets it when the config
says ``kind = "dns"``, or, with the kind left at its default, when its port is DNS's;
any other UDP service is passive only ("none"), since a TCP connect says nothing
about a datagram server (:func:`kind_for`). For a UDP backend, live traffic is its
datagrams: one that answers a flow is a success, a port unreachable from it a failure
(a flow it never answers proves nothing: syslog never does).

``kind = "none"``: no probes at all (a backend that logs every connection, behind
fail2ban, need never see one). The backend counts as up from the start; ``fall``
consecutive failed handshakes take it out for ``eject_time``, after which it is offered
again and real traffic decides anew; each ejection in a row doubles the time (at most
eight times), and a success resets it.
"""
import struct
from dataclasses import dataclass

MAX_EJECT_FACTOR = 8
PROBED = ("tcp", "dns")        # the kinds that send probes
# A UDP service on one of these ports, its kind left at the default, is DNS: it gets
# real queries as its checks (``kind = "dns"`` says so for any port).
DNS_PORTS = (53,)
PROBE_NAME = b"\x06health\x06serval\x07invalid\x00"     # health.serval.invalid (RFC 6761)
_DNS_HEADER = struct.Struct("!HHHHHH")


def kind_for(configured: str, protocol: str, ports) -> str:
    """The check a service gets. A UDP service cannot be TCP-connected, so "tcp" (the
    default) becomes a DNS query when its port or its backend's is DNS's, and passive
    only otherwise; "dns" and "none" are as said. A TCP service keeps its connect under
    "dns" (a table whose UDP service is DNS may cover the TCP one of the same name)."""
    if protocol != "udp":
        return "tcp" if configured == "dns" else configured
    if configured != "tcp":
        return configured
    return "dns" if any(port in DNS_PORTS for port in ports) else "none"


def dns_probe(txid: int) -> bytes:
    """A DNS query (A health.serval.invalid, no recursion): any answer proves a live server."""
    return _DNS_HEADER.pack(txid, 0, 1, 0, 0, 0) + PROBE_NAME + b"\x00\x01\x00\x01"


def dns_answered(reply: bytes, txid: int) -> bool:
    """A response to our probe: its id, QR set, our question echoed. Any rcode counts
    (NXDOMAIN or REFUSED still come from a live server)."""
    if len(reply) < 12:
        return False
    rid, flags, qdcount = _DNS_HEADER.unpack_from(reply)[:3]
    return rid == txid and flags & 0x8000 != 0 and (qdcount == 0 or PROBE_NAME.lower() in reply[12:].lower())


@dataclass
class HealthCheck:
    interval: float
    rise: int = 2
    fall: int = 2
    kind: str = "tcp"             # "tcp": connect probes, "dns": query probes (and passive); "none": passive only
    eject_time: float = 30.0      # passive only: how long a failed backend stays out
    timeout: float = 1.0          # a probe's connect time-out (the adapter applies it)
    up: bool | None = None        # None: not checked yet
    streak: int = 0               # consecutive results disagreeing with ``up``
    next_due: float = 0.0
    in_flight: bool = False
    checks: int = 0
    failures: int = 0
    passive_ok: int = 0
    passive_failed: int = 0
    transitions: int = 0
    last_error: str = ""
    ejected_until: float | None = None
    ejections: int = 0            # in a row, for the doubling

    def __post_init__(self):
        if self.kind == "none":
            self.up = True

    @property
    def state(self) -> str:
        return "unknown" if self.up is None else "up" if self.up else "down"

    def due(self, now: float) -> bool:
        return self.kind in PROBED and not self.in_flight and now >= self.next_due

    def started(self, now: float) -> None:
        self.in_flight = True
        self.next_due = now + self.interval

    def hurry(self, now: float) -> None:
        """Check again now (a backend just refused a connection: do not wait a round)."""
        self.next_due = min(self.next_due, now)

    def result(self, ok: bool, error: str = "") -> bool | None:
        """Record a finished check; returns the new state when it changed, else None."""
        self.in_flight = False
        self.checks += 1
        if not ok:
            self.failures += 1
            self.last_error = error
        return self._count(ok)

    def passive(self, ok: bool, now: float, error: str = "") -> bool | None:
        """A real flow's handshake: the backend answered it, or refused it or never
        answered. Returns the new state when it changed, else None."""
        if ok:
            self.passive_ok += 1
            self.next_due = max(self.next_due, now + self.interval)   # traffic is the probe
            if self.up:
                self.ejections = 0            # served well again: the next ejection is short
        else:
            self.passive_failed += 1
            self.last_error = error
            self.hurry(now)
        if self.kind in PROBED and self.up is None:
            return None                   # the first probe decides
        changed = self._count(ok)
        if changed is False and self.kind == "none":
            self.ejections += 1
            self.ejected_until = now + self.eject_time * min(MAX_EJECT_FACTOR, 2 ** (self.ejections - 1))
        return changed

    def tick(self, now: float) -> bool | None:
        """Passive only: an ejection that ended brings the backend back (True)."""
        if self.ejected_until is not None and now >= self.ejected_until:
            self.ejected_until = None
            self.up, self.streak = True, 0
            self.transitions += 1
            return True
        return None

    def _count(self, ok: bool) -> bool | None:
        if self.up is None or ok == self.up:
            self.streak = 0
            if self.up is None:
                self.up = ok
                self.transitions += 1
                return ok
            return None
        if self.kind == "none" and ok:
            return None                   # an ejected backend returns by time only
        self.streak += 1
        if self.streak >= (self.rise if ok else self.fall):
            self.up, self.streak = ok, 0
            self.transitions += 1
            return ok
        return None
