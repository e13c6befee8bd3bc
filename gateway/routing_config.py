"""The ``[routing]`` section of a gateway config: its service routers and how it talks
to them (docs/routing.md).

    [routing]
    routers = ["198.19.20.1", "198.19.21.1:54326"]
    key_file = "/etc/serval/deployment.key"      # or key = "<hex>"; key_id = "deployment"
    refresh_interval = 0.1     # server: REGISTER this often ...
    hold_time = 0.3            # ... and routers forget us this long after the last one
    probe_interval = 0.1       # client: probe each router this often ...
    probe_misses = 3           # ... and fail over after this many go unanswered
    [routing.health]           # server: checks of each backend
    kind = "tcp"               # TCP connects (and live traffic); "none": live traffic only;
                               # "dns": DNS queries to UDP services (default: port 53's only)
    interval = 0.5
    timeout = 1.0
    rise = 2
    fall = 2
    eject_time = 30            # kind "none": a failed backend stays out this long
    [routing.health."ssh.svc.example"]    # one service's own settings (the rest as above)
    kind = "none"

A client gateway gets a default rule (prefix /0, FORWARD) to each router, so it needs
no [[route]] of its own; a server gateway registers its [[service]]s with every router.
"""
from dataclasses import dataclass, field, replace

from sal import registration as reg
from sal.serviceid import ServicePrefix
from sal.service_table import Action
from serval.config_schema import address_port, integer, listing, seconds

DEFAULT_PREFIX = ServicePrefix(bytes(32), 0)


HEALTH_KINDS = ("tcp", "dns", "none")


@dataclass
class HealthConfig:
    interval: float = 0.5
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2
    kind: str = "tcp"
    eject_time: float = 30.0
    services: dict = field(default_factory=dict)    # service name -> its own HealthConfig

    def for_service(self, name: str) -> "HealthConfig":
        return self.services.get(name, self)


@dataclass
class RoutingConfig:
    routers: list                     # (address, port)
    key: reg.Key
    sender: str
    refresh_interval: float = 0.1
    hold_time: float = 0.3
    probe_interval: float = 0.1
    probe_misses: int = 3
    health: HealthConfig = field(default_factory=HealthConfig)


_KEYS = {"routers", "key", "key_file", "key_id", "sender", "refresh_interval", "hold_time",
         "probe_interval", "probe_misses", "health"}


def parse(section: dict | None, cfg, fail) -> RoutingConfig | None:
    """``fail(where, message)`` raises (``where``: the path below [routing] of the key or
    table at fault). For a client, adds the default rule to ``cfg.rules``."""
    if section is None:
        return None
    if not isinstance(section, dict):
        fail((), "[routing] must be a table")
    from router.config import key_from
    from .config import RuleConfig

    def fail(where, message, _fail=fail):          # where: a key, or a path (a tuple)
        _fail(where if isinstance(where, tuple) else (where,), f"[routing] {message}")

    for k in section:
        if k not in _KEYS:
            fail(k, f"unknown key {k!r}")
    at = lambda where: lambda m: fail(where, m)    # noqa: E731  (a reader's fail at ``where``)
    routers = listing(section.get("routers"), at("routers"),
                      lambda r: address_port(r, at("routers"), "routers", default_port=reg.DEFAULT_PORT),
                      "routers must be a non-empty list of \"address\" or \"address:port\"", empty=False)
    out = RoutingConfig(routers,
                        key_from({k: section[k] for k in ("key", "key_file", "key_id") if k in section}, at("key")),
                        str(section.get("sender", cfg.instance)))
    for name in ("refresh_interval", "hold_time", "probe_interval"):
        if name in section:
            setattr(out, name, seconds(section[name], at(name), name, positive=True))
    if "hold_time" not in section:
        out.hold_time = 3 * out.refresh_interval
    if out.hold_time <= out.refresh_interval:
        fail("hold_time", "hold_time must be longer than refresh_interval (a lost refresh must not withdraw)")
    out.probe_misses = integer(section.get("probe_misses", 3), at("probe_misses"), 1, 100, "probe_misses")
    health = section.get("health", {})
    if not isinstance(health, dict):
        fail("health", "health must be a table")
    _health(out.health, {k: v for k, v in health.items() if not isinstance(v, dict)}, ("health",), fail)
    udp_names = {s.name for s in cfg.services if s.protocol == "udp"}
    if cfg.role == "server" and health.get("kind") == "dns" and not udp_names:
        fail(("health", "kind"), 'health.kind = "dns" probes UDP services with DNS queries, and no '
             '[[service]] here has protocol = "udp"')
    names = {s.name for s in cfg.services}
    for name, own in health.items():
        if isinstance(own, dict):
            if name not in names:
                fail(("health", name), f"[routing.health.\"{name}\"]: no [[service]] named {name!r} "
                     f"(a table in health gives one service its own checks)")
            out.health.services[name] = _health(replace(out.health, services={}), own, ("health", name), fail)
            if own.get("kind") == "dns" and name not in udp_names:
                fail(("health", name, "kind"), f'health."{name}".kind = "dns" probes a UDP service with DNS '
                     f'queries, and {name} has no [[service]] with protocol = "udp"')
    if cfg.role == "client":
        for address, _ in out.routers:
            cfg.rules.append(RuleConfig(DEFAULT_PREFIX, Action.FORWARD, address))
    return out


def _health(health: HealthConfig, section: dict, where: tuple, fail) -> HealthConfig:
    """One table of checks: [routing.health] or a service's own (``where``: its path)."""
    said = ".".join(f'"{w}"' if "." in w else w for w in where)        # health."ssh.svc.example"
    for k, v in section.items():
        at = lambda m, k=k: fail(where + (k,), m)      # noqa: E731
        if k in ("interval", "timeout", "eject_time"):
            setattr(health, k, seconds(v, at, f"{said}.{k}", positive=True))
        elif k in ("rise", "fall"):
            setattr(health, k, integer(v, at, 1, 100, f"{said}.{k}"))
        elif k == "kind":
            if v not in HEALTH_KINDS:
                at(f"{said}.kind must be one of {', '.join(map(repr, HEALTH_KINDS))}, not {v!r}")
            health.kind = v
        else:
            at(f"unknown key {k!r} in {said} (kind, interval, timeout, rise, fall, eject_time)")
    return health
