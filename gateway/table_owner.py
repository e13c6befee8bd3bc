"""The one writer of a gateway's service table, with no I/O.

Three things decide what the table holds, each changed by its own part of the daemon:

* the config's rules (start, and SIGHUP reload);
* on a client gateway with [routing], which routers are live (router health): the
  default rule holds the live routers, or every router when none is live;
* on a server gateway, each service's availability: its backend down (health checks)
  or the service drained (``serval ctl drain``).

Each writer only sets its input here; the table is then rewritten from all three, so a
reload keeps a dead router out and a drained service drained, and a health change never
brings back a service that is being drained. Targets that stay keep their counters.
"""
from dataclasses import dataclass

from sal.serviceid import ServicePrefix
from sal.service_table import Action, ServiceTable


@dataclass(frozen=True)
class Rule:
    prefix: ServicePrefix
    action: Action
    target: object = None
    priority: int = 1
    weight: int = 1
    router: bool = False           # a router of the default rule: in while live (or none is)
    service: str | None = None     # a server's service ("name:port"): in unless down or drained
    affinity: object = None        # a client's rule: "client" affinity among its targets


def config_rules(cfg, source_for) -> list[Rule]:
    """The rules ``cfg`` asks for; ``source_for(address) -> (our address, interface)``
    gives a backend our address facing it."""
    from sal.ip import aton
    from .routing_config import DEFAULT_PREFIX
    from .translate import Backend

    if cfg.role == "client":
        routers = {a for a, _ in cfg.routing.routers} if cfg.routing else set()
        return [Rule(r.prefix, r.action, r.next_hop, r.priority, r.weight,
                     router=r.prefix == DEFAULT_PREFIX and r.action == Action.FORWARD and r.next_hop in routers,
                     affinity=r.affinity)
                for r in cfg.rules]
    rules = []
    for svc in cfg.services:
        host, port = svc.backend
        backend = Backend(aton(host), port, aton(source_for(host)[0]), svc.name,
                          17 if svc.protocol == "udp" else 6, svc.helper)
        rules.append(Rule(ServicePrefix(svc.service_id), Action.DEMUX, backend, svc.priority, svc.weight,
                          service=svc.key))
    return rules


class TableOwner:
    def __init__(self, table: ServiceTable, rules: list[Rule]):
        self.table = table
        self.rules: list[Rule] = []
        self.live_routers: set | None = None    # None: not known yet (every router counts)
        self.down: set[str] = set()             # services whose backend is down
        self.drained: set[str] = set()
        self._installed: dict[Rule, object] = {}     # rule -> its Target in the table
        for entry in list(table.entries()):          # we write the table from now on
            table.remove(entry.prefix)
        self.set_rules(rules)

    # --- inputs ------------------------------------------------------------------------
    def set_rules(self, rules: list[Rule]) -> None:
        """The config's rules (at start and on reload); health and drain state stay."""
        for rule in self.rules:
            if rule.affinity is not None:
                self.table.set_affinity(rule.prefix, None)
        for rule in rules:
            if rule.affinity is not None:
                self.table.set_affinity(rule.prefix, rule.affinity)
        self.rules = list(rules)
        keys = set(self.services())
        self.down &= keys                        # forget state of services no longer configured
        self.drained &= keys
        self._write()

    def set_live_routers(self, live) -> tuple[list, list]:
        """Router health: the live routers' addresses. Returns the routers that left
        and joined the default rule."""
        before = self.routers_in_rule()
        self.live_routers = set(live)
        self._write()
        after = self.routers_in_rule()
        return [a for a in before if a not in after], [a for a in after if a not in before]

    def set_health(self, service: str, up: bool | None) -> None:
        """A service's backend is up, down, or not known yet (``None``: kept in)."""
        (self.down.discard if up is not False else self.down.add)(service)
        self._write()

    def set_drained(self, service: str, drained: bool) -> None:
        (self.drained.add if drained else self.drained.discard)(service)
        self._write()

    # --- views ---------------------------------------------------------------------------
    def services(self) -> dict[str, Rule]:
        """A server's configured services by key ("name:port")."""
        return {r.service: r for r in self.rules if r.service is not None}

    def routers(self) -> list[str]:
        return [r.target for r in self.rules if r.router]

    def routers_in_rule(self) -> list[str]:
        return [r.target for r in self.wanted() if r.router]

    def in_table(self, service: str) -> bool:
        return any(r.service == service for r in self._installed)

    def wanted(self) -> list[Rule]:
        routers = self.routers()
        live = set(routers) if self.live_routers is None else self.live_routers & set(routers)
        if not live:
            live = set(routers)                  # none live: sending somewhere beats nowhere
        return [r for r in self.rules
                if not (r.router and r.target not in live)
                and not (r.service is not None and (r.service in self.down or r.service in self.drained))]

    # --- the one write -------------------------------------------------------------------
    def _write(self) -> None:
        want = self.wanted()
        wanted = set(want)
        for rule in [r for r in self._installed if r not in wanted]:
            del self._installed[rule]
            # ServiceTable removes by (prefix, target): any other target it took too is
            # added back below
            self.table.remove(rule.prefix, rule.target)
        present = {id(t) for e in self.table.entries() for t in e.targets}
        for rule in want:
            target = self._installed.get(rule)
            if target is None or id(target) not in present:
                self._installed[rule] = self.table.add(rule.prefix, rule.action, rule.target,
                                                       rule.priority, rule.weight)
