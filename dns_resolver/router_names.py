"""Poll the service routers' names views (Twisted adapter) into a :class:`Liveness`.

Every ``interval`` seconds each router is asked ``{"cmd": "live_names"}`` over TCP, in
the control protocol's framing (one JSON line each way, ``gateway_link.ask``); at most
one question per router is in flight. Replies and failures go to the sans-IO
:class:`~dns_resolver.liveness.Liveness`; after each, its ``live`` set is recomputed and
``on_change(before, after)`` called when it changed. One log line when a router stops
answering (or answers nonsense), one when it answers again.
"""
from __future__ import annotations

import logging

from twisted.internet.task import LoopingCall

from . import gateway_link
from .liveness import BadView, Liveness

log = logging.getLogger("serval.dns.liveness")

COMMAND = "live_names"


class RouterPoller:
    def __init__(self, reactor, liveness: Liveness, interval: float, timeout: float, on_change=None):
        self.reactor = reactor
        self.liveness = liveness
        self.interval, self.timeout = interval, timeout
        self.on_change = on_change or (lambda before, after: None)
        self.in_flight: set = set()
        self.trouble: dict = {}          # router -> why it was last not heard (logged once)
        self.loop = None

    def start(self) -> None:
        self.loop = LoopingCall(self.poll)
        self.loop.clock = self.reactor
        self.loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.loop = None

    def poll(self) -> None:
        self._refresh()                  # views go stale with time alone
        for router in self.liveness.views:
            if router in self.in_flight:
                continue
            self.in_flight.add(router)
            d = gateway_link.ask(self.reactor, router, COMMAND, self.timeout)
            d.addCallbacks(self._heard, self._failed, callbackArgs=(router,), errbackArgs=(router,))

    def _heard(self, result, router) -> None:
        self.in_flight.discard(router)
        if self.loop is None:
            return
        try:
            self.liveness.heard(router, result, self.reactor.seconds())
        except BadView as exc:
            self._trouble(router, str(exc))
        else:
            if self.trouble.pop(router, None) is not None:
                log.info("router %s answers its names view again", _where(router))
        self._refresh()

    def _failed(self, failure, router) -> None:
        self.in_flight.discard(router)
        if self.loop is None:
            return
        self.liveness.failed(router, self.reactor.seconds())
        self._trouble(router, failure.getErrorMessage())
        self._refresh()

    def _trouble(self, router, why: str) -> None:
        if router not in self.trouble:
            log.warning("cannot read router %s's names view (%s): its last view counts for %g s more at most",
                        _where(router), why, self.liveness.stale_after)
        self.trouble[router] = why

    def _refresh(self) -> None:
        before, after = self.liveness.refresh(self.reactor.seconds())
        if before != after:
            self.on_change(before, after)


def _where(router) -> str:
    host, port = router
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
