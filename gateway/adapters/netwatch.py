"""Address, link and route changes from the kernel, as a Twisted reader.

A plain rtnetlink socket subscribed to the link, IPv4 address and IPv4 route groups
(pyroute2's bound socket was seen to hand over only part of a burst). Events are only a
hint: the daemon then asks the kernel (through pyroute2) which of our addresses reaches
each peer, so the messages need no parsing.
"""
import logging
import socket

from zope.interface import implementer
from twisted.internet.interfaces import IReadDescriptor

log = logging.getLogger("serval.netwatch")
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40


@implementer(IReadDescriptor)
class NetlinkWatcher:
    def __init__(self, on_change):
        self.on_change = on_change
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self):
        got = 0
        while True:
            try:
                got += len(self.sock.recv(65536))
            except BlockingIOError:
                break
            except OSError as exc:        # ENOBUFS: we missed some; look anyway
                log.info("netlink: %s", exc)
                got += 1
                break
        if got:
            self.on_change(got)

    def connectionLost(self, reason):
        pass

    def logPrefix(self) -> str:
        return "netlink"

    def close(self) -> None:
        self.sock.close()
