"""A server gateway's registrations with its routers, sans-IO.

The gateway offers each configured service while its backend is healthy and it is not
drained. Every ``refresh`` it sends every router a REGISTER with the complete set on
offer (so a router that restarted, or lost a message, is right again one refresh later);
a service leaving the set is also withdrawn at once with an UNREGISTER, and one joining
it is announced at once, so health and drain changes do not wait for a refresh.
Methods return ``(datagram, router)`` pairs for the adapter to send.
"""
from collections import OrderedDict
from dataclasses import dataclass

from sal import registration as reg


@dataclass
class Offer:
    record: reg.Record
    healthy: bool | None = None     # None: not checked yet (not registered)
    drained: bool = False

    @property
    def active(self) -> bool:
        return bool(self.healthy) and not self.drained

    @property
    def state(self) -> str:
        if self.drained:
            return "draining"
        return {None: "checking", True: "registered", False: "withdrawn"}[self.healthy]


@dataclass
class RouterView:
    """What a gateway knows of one router: its last ACK."""
    acked: float | None = None
    status: int = 0
    refused: int = 0


class Registrar:
    def __init__(self, signer: reg.Signer, address: bytes, routers: list, refresh: float, hold: float):
        self.signer = signer
        self.address = address
        self.routers = list(routers)
        self.refresh, self.hold = refresh, hold
        self.offers: dict[str, Offer] = {}
        self.views = {r: RouterView() for r in self.routers}
        self.next_refresh = 0.0
        self._sent: OrderedDict = OrderedDict()     # seq -> send time, to match ACKs
        self.stats = {"sent_register": 0, "sent_unregister": 0, "acks": 0, "acks_refused": 0}

    def offer(self, key: str, record: reg.Record) -> None:
        self.offers[key] = Offer(record)

    def active(self) -> list[reg.Record]:
        return [o.record for o in self.offers.values() if o.active]

    # --- what to send ----------------------------------------------------------------
    def tick(self, now: float, wall_ns: int) -> list:
        if now < self.next_refresh:
            return []
        return self._register(now, wall_ns)

    def set_health(self, key: str, up: bool, now: float, wall_ns: int) -> list:
        offer = self.offers[key]
        was = offer.active
        offer.healthy = up
        return self._changed(offer, was, now, wall_ns)

    def set_drained(self, key: str, drained: bool, now: float, wall_ns: int) -> list:
        offer = self.offers[key]
        was = offer.active
        offer.drained = drained
        return self._changed(offer, was, now, wall_ns)

    def set_address(self, address: bytes, now: float, wall_ns: int) -> list:
        """Our address changed: re-register from the new one at once (routers replace
        the old instance address with it)."""
        if address == self.address:
            return []
        self.address = address
        return self._register(now, wall_ns)

    def stop(self, now: float, wall_ns: int) -> list:
        """A clean stop: withdraw everything from every router."""
        return self._send(reg.UNREGISTER, now, wall_ns, records=[])

    def _changed(self, offer: Offer, was: bool, now: float, wall_ns: int) -> list:
        if offer.active == was:
            return []
        if offer.active:
            return self._register(now, wall_ns)
        return self._send(reg.UNREGISTER, now, wall_ns, records=[offer.record])

    def _register(self, now: float, wall_ns: int) -> list:
        self.next_refresh = now + self.refresh
        return self._send(reg.REGISTER, now, wall_ns, records=self.active(),
                          hold_ms=max(1, round(self.hold * 1000)))

    def _send(self, kind: int, now: float, wall_ns: int, **fields) -> list:
        data, msg = self.signer.message(kind, wall_ns, address=self.address, **fields)
        self._sent[msg.seq] = now
        while len(self._sent) > 64:
            self._sent.popitem(last=False)
        self.stats["sent_" + msg.type_name] += 1
        return [(data, r) for r in self.routers]

    # --- what comes back ---------------------------------------------------------------
    def on_reply(self, data: bytes, router: tuple, now: float) -> float | None:
        """A router's ACK; returns the round trip in seconds, or None if not ours."""
        view = self.views.get(router)
        try:
            msg = self.signer.check_reply(data)
        except reg.Refused:
            return None
        sent = self._sent.get(msg.acked_seq)
        if view is None or sent is None or msg.type != reg.ACK:
            return None
        view.acked, view.status = now, msg.status
        self.stats["acks"] += 1
        if msg.status:
            view.refused += 1
            self.stats["acks_refused"] += 1
        return now - sent

    def routers_acked(self, now: float) -> int:
        """Routers that acknowledged something within the hold time."""
        return sum(1 for v in self.views.values() if v.acked is not None and now - v.acked <= self.hold and not v.status)
