"""UDP and TCP listeners (Twisted adapters): bytes to the core and replies back.

Each received message goes to ``Resolver.handle`` with a reply token: ``(transport,
address)`` for UDP, the connection for TCP. The daemon carries out the actions.

TCP (RFC 7766): two-byte length framing, several queries per connection, replies in
the order they are ready, an idle timeout, a limit on connections (beyond it a new
connection is closed at once). Queries waiting upstream are bounded by the core (per
question and in all). UDP messages pass the client's token bucket; TCP ones do not (the
handshake proves the address; see ``Resolver._limited``).
"""
from __future__ import annotations

import logging
import socket

from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.protocols.basic import Int16StringReceiver
from twisted.protocols.policies import TimeoutMixin

log = logging.getLogger("serval.dns.server")

UDP_RCVBUF = 4 << 20
MAX_UDP_QUERY = 4096        # larger datagrams are no query of ours: dropped unread (wire.MAX_QUERY)


class UDPServer(DatagramProtocol):
    def __init__(self, daemon):
        self.daemon = daemon

    def startProtocol(self):
        # a burst (one client's flood, many clients at once) waits in the socket rather
        # than being dropped by the kernel before any policy sees it: past net.core.rmem_max
        # where we may (root: SO_RCVBUFFORCE), else as far as it allows
        sock = getattr(self.transport, "socket", None)
        for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if sock is None or option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, UDP_RCVBUF)
                return
            except OSError:
                continue

    def datagramReceived(self, data: bytes, addr):
        if len(data) > MAX_UDP_QUERY:
            self.daemon.core.stats["dropped"] += 1
            return
        self.daemon.received(data, addr[0], False, (self.transport, addr))


class TCPConnection(Int16StringReceiver, TimeoutMixin):
    MAX_LENGTH = 65535

    def connectionMade(self):
        self.peer = self.transport.getPeer().host
        self.setTimeout(self.factory.daemon.cfg.tcp_timeout)

    def stringReceived(self, data: bytes):
        self.resetTimeout()
        self.factory.daemon.received(data, self.peer, True, self)

    def send(self, data: bytes) -> None:
        if self.transport is not None and self.connected:
            self.sendString(data)
            self.resetTimeout()

    def lengthLimitExceeded(self, length):
        self.transport.loseConnection()

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        self.factory.open.discard(self)


class TCPServer(Factory):
    protocol = TCPConnection

    def __init__(self, daemon):
        self.daemon = daemon
        self.open: set = set()
        self.refused = 0

    def buildProtocol(self, addr):
        if len(self.open) >= self.daemon.cfg.tcp_connections:
            self.refused += 1
            return None                     # Twisted closes the connection
        proto = super().buildProtocol(addr)
        self.open.add(proto)
        return proto

    def close_all(self) -> None:
        for proto in list(self.open):
            if proto.transport is not None:
                proto.transport.abortConnection()
