"""Ask another daemon one question over its control protocol (Twisted adapter).

A control socket takes one JSON line and answers one (``gateway/adapters/control.py``).
:func:`ask` speaks it over a Unix socket (a path) or TCP (``(host, port)``) and returns
a Deferred firing with the reply's result, or failing with :class:`GatewayUnreachable`
(no socket, no answer within the timeout, an error reply).

* :func:`virtual_in_use`: the client gateway's virtual addresses with live flows; when
  it cannot be asked, the resolver reclaims nothing.
* ``dns_resolver/router_names.py`` asks the service routers which names are live.
"""
from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory
from twisted.protocols.basic import LineOnlyReceiver


class GatewayUnreachable(Exception):
    """The other daemon could not be asked (the name is historical: routers too)."""


class _Ask(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 22

    def connectionMade(self):
        self.sendLine(json.dumps({"cmd": self.factory.cmd, "args": {}}).encode())

    def lineReceived(self, line: bytes):
        self.factory.got(line)
        self.transport.loseConnection()


class _AskFactory(ClientFactory):
    protocol = _Ask

    def __init__(self, cmd: str, deferred: defer.Deferred):
        self.cmd, self.deferred = cmd, deferred

    def got(self, line: bytes):
        if self.deferred.called:
            return
        try:
            reply = json.loads(line)
        except ValueError as exc:
            self.deferred.errback(GatewayUnreachable(f"bad reply: {exc}"))
            return
        if not reply.get("ok"):
            self.deferred.errback(GatewayUnreachable(f"error reply: {reply.get('error')}"))
        else:
            self.deferred.callback(reply.get("result"))

    def clientConnectionFailed(self, connector, reason):
        if not self.deferred.called:
            self.deferred.errback(GatewayUnreachable(reason.getErrorMessage()))

    def clientConnectionLost(self, connector, reason):
        if not self.deferred.called:
            self.deferred.errback(GatewayUnreachable("closed without an answer"))


def ask(reactor, where, cmd: str, timeout: float = 2.0) -> defer.Deferred:
    """``where``: a Unix socket's path, or ``(host, port)`` for TCP."""
    d = defer.Deferred()
    if isinstance(where, str):
        connector = reactor.connectUNIX(where, _AskFactory(cmd, d), timeout=timeout)
    else:
        connector = reactor.connectTCP(where[0], where[1], _AskFactory(cmd, d), timeout=timeout)

    def expire():
        if not d.called:
            d.errback(GatewayUnreachable(f"no answer within {timeout:g} s"))
            connector.disconnect()

    timer = reactor.callLater(timeout, expire)

    def cleanup(result):
        if timer.active():
            timer.cancel()
        return result

    return d.addBoth(cleanup)


def virtual_in_use(reactor, path: str, timeout: float = 2.0) -> defer.Deferred:
    def to_set(result):
        if not isinstance(result, list):
            raise GatewayUnreachable(f"unexpected result {result!r}")
        return {str(a) for a in result}

    return ask(reactor, path, "virtual_in_use", timeout).addCallback(to_set)
