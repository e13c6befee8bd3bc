"""Address, link and route changes from the kernel (a pyroute2 netlink socket bound to
the rtnetlink groups), as a Twisted reader. Events are only a hint: the daemon debounces
them and then asks the kernel which source address now reaches each peer."""
import logging

from pyroute2 import IPRoute
from zope.interface import implementer
from twisted.internet.interfaces import IReadDescriptor

log = logging.getLogger("serval.netwatch")


@implementer(IReadDescriptor)
class NetlinkWatcher:
    def __init__(self, on_change):
        self.on_change = on_change
        self.ipr = IPRoute()
        self.ipr.bind()          # links, IPv4 addresses and routes, among others

    def fileno(self) -> int:
        return self.ipr.fileno()

    def doRead(self):
        try:
            # IPv6 address and route churn (DAD, router solicitations) is not our business
            events = {m.get("event") for m in self.ipr.get() if m.get("family") != 10}
        except Exception as exc:     # a bad message must not stop the watcher
            log.warning("reading netlink: %s", exc)
            events = {"?"}
        if events & {"RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWROUTE", "RTM_DELROUTE", "RTM_NEWLINK",
                     "RTM_DELLINK", "?"}:
            self.on_change(events)

    def connectionLost(self, reason):
        pass

    def logPrefix(self) -> str:
        return "netlink"

    def close(self) -> None:
        self.ipr.close()
