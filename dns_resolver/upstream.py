"""Forwarding to the upstream resolvers (Twisted adapter): timeouts, failover, TCP.

:meth:`Forwarder.query` sends one query (bytes from ``Resolver.upstream_query``) and
returns a Deferred that fires with the response bytes, or None when no upstream gave a
usable answer. For each upstream in turn:

* a UDP attempt from a fresh socket (random source port), connected to the upstream so
  the kernel only delivers its datagrams and an ICMP port-unreachable fails the attempt
  at once; a fresh random ID; a reply counts only if its ID and question match;
* a reply with TC set is asked again over TCP, same upstream;
* no reply within ``timeout`` seconds, a refused port, or SERVFAIL/REFUSED/NOTIMP/FORMERR
  moves on to the next upstream.

Upstreams that time out or refuse are tried last for ``retry_down_after`` seconds (one
log line when that starts, one when the upstream answers again), so one dead upstream
costs one timeout, not one per query. When all are marked down they are still tried,
in order, so an upstream that comes back is used at once.
"""
from __future__ import annotations

import logging
import secrets
import struct

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, DatagramProtocol
from twisted.protocols.basic import Int16StringReceiver

from . import wire

log = logging.getLogger("serval.dns.upstream")

RETRY_RCODES = {wire.SERVFAIL, wire.REFUSED, wire.NOTIMP, wire.FORMERR}


class Upstream:
    def __init__(self, host: str, port: int = 53):
        self.host, self.port = host, port
        self.down_until = 0.0
        self.down = False
        self.answers = self.failures = 0

    def __str__(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Forwarder:
    def __init__(self, reactor, servers, timeout: float = 1.5, retry_down_after: float = 30.0):
        self.reactor = reactor
        self.upstreams = [Upstream(h, p) for h, p in servers]
        self.timeout = timeout
        self.retry_down_after = retry_down_after
        self.live: set = set()
        self.stats = {"udp_attempts": 0, "tcp_attempts": 0, "timeouts": 0, "refused": 0,
                      "bad_rcode": 0, "mismatched": 0, "all_failed": 0}

    def order(self) -> list[Upstream]:
        now = self.reactor.seconds()
        up = [u for u in self.upstreams if u.down_until <= now]
        down = sorted((u for u in self.upstreams if u.down_until > now), key=lambda u: u.down_until)
        return up + down

    def query(self, data: bytes) -> defer.Deferred:
        lookup = _Lookup(self, data)
        self.live.add(lookup)
        lookup.deferred.addBoth(self._done, lookup)
        lookup.next()
        return lookup.deferred

    def _done(self, result, lookup):
        self.live.discard(lookup)
        return result

    def close(self) -> None:
        for lookup in list(self.live):
            lookup.finish(None)

    # --- health --------------------------------------------------------------------
    def failed(self, upstream: Upstream, why: str) -> None:
        upstream.failures += 1
        upstream.down_until = self.reactor.seconds() + self.retry_down_after
        if not upstream.down:
            upstream.down = True
            others = len(self.upstreams) - 1
            log.warning("upstream %s failed (%s): %s", upstream, why,
                        f"trying the other {others} first for {self.retry_down_after:g} s" if others
                        else "it is the only one, still trying it")

    def answered(self, upstream: Upstream) -> None:
        upstream.answers += 1
        upstream.down_until = 0.0
        if upstream.down:
            upstream.down = False
            log.info("upstream %s answers again", upstream)


class _Lookup:
    """One query's way through the upstreams."""

    def __init__(self, fwd: Forwarder, data: bytes):
        self.fwd = fwd
        self.data = data
        self.question = _question(data)
        self.queue = fwd.order()
        self.deferred = defer.Deferred()
        self.fallback = None         # a truncated UDP answer, if TCP fails too
        self.attempt = None
        self.timer = None
        self.done = False

    def next(self) -> None:
        if self.done:
            return
        if not self.queue:
            if self.fallback is None:
                self.fwd.stats["all_failed"] += 1
            self.finish(self.fallback)
            return
        upstream = self.queue.pop(0)
        self._start(upstream, tcp=False)

    def _start(self, upstream: Upstream, tcp: bool) -> None:
        ident = secrets.randbits(16)
        data = struct.pack("!H", ident) + self.data[2:]
        if tcp:
            self.fwd.stats["tcp_attempts"] += 1
            self.attempt = _TCPAttempt(self, upstream, ident, data)
        else:
            self.fwd.stats["udp_attempts"] += 1
            self.attempt = _UDPAttempt(self, upstream, ident, data)
        self.timer = self.fwd.reactor.callLater(self.fwd.timeout, self._timeout, self.attempt)
        self.attempt.start()

    def _timeout(self, attempt) -> None:
        self.timer = None
        if attempt is not self.attempt:
            return
        self.fwd.stats["timeouts"] += 1
        self.fwd.failed(attempt.upstream, f"no answer within {self.fwd.timeout:g} s")
        self._end_attempt()
        self.next()

    def _end_attempt(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.attempt is not None:
            attempt, self.attempt = self.attempt, None
            attempt.close()

    # called by attempts
    def received(self, attempt, data: bytes) -> bool:
        """A reply from ``attempt``; False when it is not ours (ignored)."""
        if attempt is not self.attempt or self.done:
            return False
        if len(data) < 12 or struct.unpack_from("!H", data)[0] != attempt.ident or not data[2] & 0x80:
            self.fwd.stats["mismatched"] += 1
            return False
        if _question(data).lower() != self.question.lower():
            self.fwd.stats["mismatched"] += 1
            return False
        upstream = attempt.upstream
        rcode = data[3] & 0xF
        tcp = isinstance(attempt, _TCPAttempt)
        self._end_attempt()
        if rcode in RETRY_RCODES:
            self.fwd.stats["bad_rcode"] += 1
            log.debug("upstream %s answered %s", upstream, wire.RCODE_NAMES.get(rcode, rcode))
            self.next()
            return True
        self.fwd.answered(upstream)
        if data[2] & 0x02 and not tcp:         # TC: ask again over TCP
            self.fallback = data
            self._start(upstream, tcp=True)
            return True
        self.finish(data)
        return True

    def attempt_failed(self, attempt, why: str) -> None:
        if attempt is not self.attempt or self.done:
            return
        self.fwd.stats["refused"] += 1
        self.fwd.failed(attempt.upstream, why)
        self._end_attempt()
        self.next()

    def finish(self, result) -> None:
        if self.done:
            return
        self.done = True
        self._end_attempt()
        self.deferred.callback(result)


def _question(data: bytes) -> bytes:
    try:
        end = wire.skip_name(data, 12) + 4
    except wire.WireError:
        return b""
    return data[12:end] if end <= len(data) else b""


class _UDPAttempt(DatagramProtocol):
    def __init__(self, lookup: _Lookup, upstream: Upstream, ident: int, data: bytes):
        self.lookup, self.upstream, self.ident, self.data = lookup, upstream, ident, data
        self.port = None

    def start(self) -> None:
        interface = "::" if ":" in self.upstream.host else ""
        try:
            self.port = self.lookup.fwd.reactor.listenUDP(0, self, interface=interface)
        except Exception as exc:
            self.lookup.fwd.reactor.callLater(0, self.lookup.attempt_failed, self, f"socket: {exc}")

    def startProtocol(self) -> None:
        try:
            self.transport.connect(self.upstream.host, self.upstream.port)
            self.transport.write(self.data)
        except Exception as exc:
            self.lookup.fwd.reactor.callLater(0, self.lookup.attempt_failed, self, f"send: {exc}")

    def datagramReceived(self, data: bytes, addr) -> None:
        self.lookup.received(self, data)

    def connectionRefused(self) -> None:
        self.lookup.attempt_failed(self, "port unreachable")

    def close(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()


class _TCPClient(Int16StringReceiver):
    MAX_LENGTH = 65535

    def connectionMade(self) -> None:
        self.sendString(self.factory.attempt.data)

    def stringReceived(self, data: bytes) -> None:
        self.factory.attempt.lookup.received(self.factory.attempt, data)


class _TCPFactory(ClientFactory):
    protocol = _TCPClient

    def __init__(self, attempt):
        self.attempt = attempt

    def clientConnectionFailed(self, connector, reason) -> None:
        self.attempt.lookup.attempt_failed(self.attempt, f"TCP: {reason.getErrorMessage()}")

    def clientConnectionLost(self, connector, reason) -> None:
        self.attempt.lookup.attempt_failed(self.attempt, "TCP connection closed without an answer")


class _TCPAttempt:
    def __init__(self, lookup: _Lookup, upstream: Upstream, ident: int, data: bytes):
        self.lookup, self.upstream, self.ident, self.data = lookup, upstream, ident, data
        self.connector = None

    def start(self) -> None:
        self.connector = self.lookup.fwd.reactor.connectTCP(
            self.upstream.host, self.upstream.port, _TCPFactory(self), timeout=self.lookup.fwd.timeout)

    def close(self) -> None:
        if self.connector is not None:
            connector, self.connector = self.connector, None
            connector.disconnect()
