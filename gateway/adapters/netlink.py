"""Addresses and routes from the kernel (pyroute2): which source address reaches a peer.

One netlink socket is kept for the process: opening one costs milliseconds, and these
questions are asked on the way to moving live flows.
"""
import ipaddress
import socket
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..reachability import NoRoute, reason_for

_shared = None


@contextmanager
def _ipr():
    global _shared
    if _shared is None:
        _shared = IPRoute()
    try:
        yield _shared
    except Exception:
        _shared.close()       # a broken socket is not reused
        _shared = None
        raise


def source_for(destination: str) -> tuple[str, str]:
    """(source address, interface name) the kernel would use to reach ``destination``."""
    with _ipr() as ipr:
        try:
            routes = ipr.route("get", dst=destination)
        except NetlinkError as exc:         # ENETUNREACH, an unreachable/prohibit route
            raise NoRoute(destination, reason_for(exc.code)) from None
        if not routes:
            raise NoRoute(destination, "this host has no route to it")
        route = routes[0]
        src = route.get_attr("RTA_PREFSRC")
        oif = route.get_attr("RTA_OIF")
        links = ipr.get_links(oif)
        dev = links[0].get_attr("IFLA_IFNAME") if links else "?"
        if not src:
            raise NoRoute(destination, f"the route to it (via {dev}) has no source address of ours")
        return src, dev


def has_route(destination: str) -> bool:
    try:
        with _ipr() as ipr:
            return bool(ipr.route("get", dst=destination))
    except Exception:
        return False


def link_mtus() -> dict[str, int]:
    """The MTU of each interface that carries an IPv4 address (not loopback)."""
    with _ipr() as ipr:
        with_v4 = {a["index"] for a in ipr.get_addr(family=2)}
        return {link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_MTU") for link in ipr.get_links()
                if link["index"] in with_v4 and link.get_attr("IFLA_IFNAME") != "lo"}


def ipv4_interfaces() -> list[str]:
    """Names of the interfaces that carry an IPv4 address (not loopback)."""
    with _ipr() as ipr:
        names = {}
        for link in ipr.get_links():
            names[link["index"]] = link.get_attr("IFLA_IFNAME")
        return sorted({names[a["index"]] for a in ipr.get_addr(family=2)
                       if a["index"] in names and names[a["index"]] != "lo"})


def address_interfaces() -> dict[str, str]:
    """Our IPv4 addresses and the interface each is on."""
    with _ipr() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"): names.get(a["index"], "?")
                for a in ipr.get_addr(family=2)}


def links_up() -> set[str]:
    """Names of the interfaces that are up (administratively and with a carrier)."""
    with _ipr() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                if link.get_attr("IFLA_OPERSTATE") in ("UP", "UNKNOWN") and link["flags"] & 1}


def broadcast_addresses() -> dict[bytes, bytes]:
    """The broadcast address of each of our IPv4 subnets -> our address on it (both
    packed). The kernel takes a subnet's all-ones host part as broadcast (up to /30)
    whether or not the address was given one (``brd``); a primary address wins over
    a secondary one on the same subnet."""
    out = {}
    with _ipr() as ipr:
        for a in ipr.get_addr(family=2):
            local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if not local or a["prefixlen"] > 30:
                continue
            net = ipaddress.IPv4Interface(f"{local}/{a['prefixlen']}").network
            for brd in {str(net.broadcast_address), a.get_attr("IFA_BROADCAST")} - {None}:
                if a["flags"] & 0x01:            # IFA_F_SECONDARY
                    out.setdefault(socket.inet_aton(brd), socket.inet_aton(local))
                else:
                    out[socket.inet_aton(brd)] = socket.inet_aton(local)
    return out
