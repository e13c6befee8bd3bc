"""Plain words for an address this gateway cannot reach.

At start, a next hop, router or backend with no route is refused with the config line
that names it and what to check (not a bare ``(101, 'Network is unreachable')``).
While running, a send that fails is counted each time and said once a minute per
address and reason (:class:`SendFailures`), with what that address is to us.
"""
import errno
import logging
import os
import time
import tomllib

log = logging.getLogger("serval.reach")

# errno -> (what it means, what to check; {addr} is the address)
REASONS = {
    errno.ENETUNREACH: ("this host has no route to it",
                        "`ip route get {addr}` on this host: add a route (or a default route) toward it"),
    errno.EHOSTUNREACH: ("nothing answers for it on its link (no ARP reply)",
                         "that {addr} is up, on the link `ip route get {addr}` names (`ip neigh show {addr}`)"),
    errno.EPERM: ("a firewall rule on this host refuses packets to it",
                  "this host's OUTPUT rules (`iptables-save`, `nft list ruleset`)"),
    errno.EACCES: ("a firewall rule on this host refuses packets to it",
                   "this host's OUTPUT rules (`iptables-save`, `nft list ruleset`)"),
    errno.EMSGSIZE: ("the packet is larger than the route's MTU",
                     "`mtu` in the config and `ip route get {addr}`"),
    errno.ENOBUFS: ("the outgoing interface's queue is full",
                    "the load on the interface `ip route get {addr}` names"),
}


class NoRoute(LookupError):
    """This host cannot send to ``address``; ``reason`` says why, in words."""

    def __init__(self, address: str, reason: str):
        super().__init__(f"no route to {address}: {reason}")
        self.address, self.reason = address, reason


def reason_for(code: int) -> str:
    return REASONS.get(code, (os.strerror(code), ""))[0]


def roles(cfg) -> dict[str, tuple[str, str, str, int | None]]:
    """``{address: (what it is to us, config table, key, index)}`` for the addresses a
    config names as next hops, routers and backends."""
    out = {}
    for i, svc in enumerate(cfg.services):
        if svc.backend:
            out.setdefault(svc.backend[0], (f"backend {svc.backend[0]}:{svc.backend[1]} of service "
                                            f"{svc.name}:{svc.port}", "service", "backend", i))
    if getattr(cfg, "routing", None):
        for address, _ in cfg.routing.routers:
            out.setdefault(address, (f"router {address}", "routing", "routers", None))
    for r in getattr(cfg, "rules", []):
        if r.next_hop:
            out.setdefault(r.next_hop, (f"next hop {r.next_hop}", "route", "next_hop", None))
    return out


def _file_index(path: str, table: str, key: str, address: str) -> int | None:
    """Which ``[[table]]`` of the file names ``address`` under ``key`` (the parsed
    config may hold more entries than the file: defaults, mappings)."""
    try:
        with open(path, "rb") as f:
            entries = tomllib.load(f).get(table, [])
    except (OSError, tomllib.TOMLDecodeError):
        return None
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if str(entry.get(key, "")).rpartition(":")[0 if key == "backend" else 2] == address:
            return i
    return None


def unreachable_at_start(cfg, exc: NoRoute):
    """The ConfigError that refuses a start for want of a route to ``exc.address``."""
    from .config import ConfigError, line_of

    what, table, key, _ = roles(cfg).get(exc.address, (f"address {exc.address}", None, None, None))
    line = None
    if table is not None:
        index = None if table == "routing" else _file_index(cfg.path, table, key, exc.address)
        if table == "routing" or index is not None:
            line = line_of(cfg.path, table, key, index)
    hint = ("set sal_address, or " if key in ("next_hop", "routers") and not cfg.sal_address else "")
    return ConfigError(cfg.path, line,
                       f"the {what} is unreachable from this host: {exc.reason}. Check `ip route get "
                       f"{exc.address}` here; {hint}fix the route or this address, then start again")


class SendFailures:
    """Counts each failed send (``inject_failed_<errno>``) and says why, once a minute
    per address and reason, naming what the address is to us."""

    EVERY = 60.0
    REMEMBERED = 1024               # (address, errno) pairs; forgotten all at once beyond

    def __init__(self, stats, describe=None, clock=time.monotonic):
        self.stats, self.describe, self.clock = stats, describe, clock
        self._said: dict[tuple[str, int], float] = {}

    def failed(self, address: str, code: int) -> str | None:
        """Count one failed send to ``address``; the line logged, or None (said lately)."""
        self.stats[f"inject_failed_{errno.errorcode.get(code, str(code)).lower()}"] += 1
        now = self.clock()
        key = (address, code)
        last = self._said.get(key)
        if last is not None and now - last < self.EVERY:
            return None
        if len(self._said) >= self.REMEMBERED:
            self._said.clear()
        self._said[key] = now
        line = self.line(address, code)
        log.warning("%s", line)
        return line

    def line(self, address: str, code: int) -> str:
        what = (self.describe(address) if self.describe else None) or f"address {address}"
        reason, check = REASONS.get(code, (os.strerror(code), "`ip route get {addr}` on this host"))
        name = errno.errorcode.get(code, str(code))
        return (f"cannot send to the {what}: {reason} ({name}); check {check.format(addr=address)}. "
                f"Said once a minute; every failure is counted as inject_failed_{name.lower()}")
