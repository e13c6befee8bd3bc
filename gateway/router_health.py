"""A client gateway's view of its routers, sans-IO.

Each router is probed every ``interval`` (PROBE, answered by an authenticated PROBE_ACK
echoing our seq, so neither a forged nor a replayed answer counts). A router is live
while its last "ready" answer is younger than ``misses`` intervals; a router that just
started answers "not ready" until it has heard the registrations' refreshes, and counts
as down meanwhile. At start every router is given the benefit of the doubt for the same
time.

The default rule (prefix /0, FORWARD) holds the live routers, weighted equally; when
none is live it holds them all (sending somewhere beats sending nowhere): the gateway's
:class:`~gateway.table_owner.TableOwner` writes it from :meth:`RouterHealth.live`. SYNs already
sent to a router that went down are sent again to a live one
(``ClientTranslator.redirect_pending``).
"""
from collections import OrderedDict
from dataclasses import dataclass, field

from sal import registration as reg


@dataclass
class RouterState:
    address: str
    port: int
    alive_until: float
    next_probe: float = 0.0
    ready: bool = False
    rtt: float | None = None
    answers: int = 0
    sent: OrderedDict = field(default_factory=OrderedDict)    # seq -> send time


class RouterHealth:
    def __init__(self, signer: reg.Signer, routers: list, interval: float, misses: int, now: float):
        self.signer = signer
        self.interval, self.misses = interval, misses
        self.routers = {(a, p): RouterState(a, p, now + interval * misses) for a, p in routers}

    def tick(self, now: float, wall_ns: int) -> list:
        """Probes due now: ``(datagram, (address, port))`` pairs."""
        out = []
        for key, r in self.routers.items():
            if now >= r.next_probe:
                data, msg = self.signer.message(reg.PROBE, wall_ns)
                r.sent[msg.seq] = now
                while len(r.sent) > 2 * self.misses + 2:
                    r.sent.popitem(last=False)
                r.next_probe = now + self.interval
                out.append((data, key))
        return out

    def on_reply(self, data: bytes, router: tuple, now: float) -> bool:
        """A PROBE_ACK; True if it was a valid answer to one of our recent probes."""
        r = self.routers.get(router)
        try:
            msg = self.signer.check_reply(data)
        except reg.Refused:
            return False
        if r is None or msg.type != reg.PROBE_ACK or msg.acked_seq not in r.sent:
            return False
        r.rtt = now - r.sent.pop(msg.acked_seq)
        r.answers += 1
        r.ready = bool(msg.status)
        r.alive_until = now + self.interval * self.misses if r.ready else now
        return True

    def live(self, now: float) -> list[str]:
        return [r.address for r in self.routers.values() if r.alive_until > now]

    def rows(self, now: float) -> list[dict]:
        return [{"router": f"{r.address}:{r.port}",
                 "state": "live" if r.alive_until > now else "warming" if r.answers and not r.ready else "down",
                 "rtt_ms": round(r.rtt * 1000, 2) if r.rtt is not None else None,
                 "answers": r.answers} for r in self.routers.values()]
