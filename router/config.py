"""Router configuration: a TOML file, checked completely before anything starts.

    [router]                 instance, address, queue, registration_port, control_socket, ...
    [[key]]                  id, key | key_file, names (shell patterns it may register)
    [[rule]]                 service | prefix, action (forward|drop|delay), next_hop, priority, weight
    [[service]]              service | prefix, affinity ("none"|"client"), affinity_timeout

See deploy/router.toml for every key with its default.
"""
import ipaddress
from dataclasses import dataclass, field

from sal import registration as reg
from sal.affinity import from_config as affinity_from
from sal.serviceid import ServiceIDError, ServicePrefix, service_id_for
from sal.service_table import Action
from serval.config_schema import ConfigError, Locator, Table, choice, integer, ipv4, read, tables
from serval.metrics import parse_config as parse_metrics

from .core import SAL_UDP_PORT, RouterOptions


RouterConfigError = ConfigError      # its name here before the three daemons shared one
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class RuleConfig:
    prefix: ServicePrefix
    action: Action
    next_hop: str | None = None
    priority: int = 1
    weight: int = 1
    name: str = ""


@dataclass
class RouterConfig:
    path: str
    instance: str = "router"
    address: str | None = None            # SYNs to this address are forwarded (default: any local)
    queue: int = 2
    registration_port: int = reg.DEFAULT_PORT
    sal_udp_port: int = SAL_UDP_PORT
    control_socket: str = "/run/serval/router.sock"
    state_dir: str = "/run/serval"
    log_level: str = "info"
    metrics: tuple | None = None          # (host, port): serve Prometheus metrics there (default: off)
    queue_bypass: bool = True
    options: RouterOptions = field(default_factory=RouterOptions)
    keys: list = field(default_factory=list)
    rules: list = field(default_factory=list)
    affinities: list = field(default_factory=list)     # (ServicePrefix, Affinity, label)
    # (address, port): the names view the resolver polls ([liveness] in dns.toml), over
    # TCP; read-only and unauthenticated, so on an internal address (default: off)
    names_view: tuple | None = None


_ROUTER_KEYS = {"instance", "address", "queue", "registration_port", "sal_udp_port", "control_socket",
                "state_dir", "log_level", "queue_bypass", "affinity", "repeated_syn_window", "delay_hold",
                "warmup", "min_hold", "max_hold", "replay_window", "max_held", "metrics", "metrics_public",
                "icmp_rate", "icmp_burst", "names_view"}


def load(path: str) -> RouterConfig:
    data, loc = read(path)
    return parse(data, path, loc)


def parse(data: dict, path: str, loc: Locator | None = None) -> RouterConfig:
    loc = loc or Locator("")

    def fail_at(where: tuple, message: str):
        """``where``: ("rule", 0, "next_hop") is said "[rule 1]" before the message."""
        label = f"{where[0]} {where[1] + 1}" if len(where) > 1 and isinstance(where[1], int) else where[0]
        raise ConfigError(path, loc.line(*where), f"[{label}] {message}")

    def fail(where: str, message: str):
        fail_at((where,), message)

    def at(table: str, i: int):
        """``fail(message, key=None)`` for element ``i`` of [[table]]."""
        return lambda message, key=None: fail_at((table, i) + ((key,) if key else ()), message)

    unknown = set(data) - {"router", "key", "rule", "service"}
    if unknown:
        fail(sorted(unknown)[0], "unknown section")
    top = Table(data.get("router", {}), ("router",), fail_at)
    top.only(_ROUTER_KEYS)
    cfg = RouterConfig(path)
    cfg.instance = top.str("instance", cfg.instance)
    cfg.address = top.ipv4("address")
    cfg.queue = top.int("queue", cfg.queue, 0, 65535)
    cfg.registration_port = top.int("registration_port", cfg.registration_port, 1, 65535)
    cfg.sal_udp_port = top.int("sal_udp_port", cfg.sal_udp_port, 1, 65535)
    cfg.control_socket = top.str("control_socket", f"/run/serval/{cfg.instance}.sock")
    cfg.state_dir = top.str("state_dir", cfg.state_dir)
    cfg.log_level = choice(str(top.get("log_level", "info")).lower(), top.failer("log_level"), "log_level", LOG_LEVELS)
    cfg.queue_bypass = top.bool("queue_bypass", True)
    cfg.metrics = parse_metrics(top.values, top.fail)
    cfg.names_view = top.address_port("names_view")
    opts = cfg.options
    if "affinity" in top.values and "repeated_syn_window" in top.values:
        top.fail("affinity", "'affinity' is the old name of 'repeated_syn_window': give one")
    # (the option) -> RouterOptions field
    for name, attr in (("repeated_syn_window", "affinity"), ("affinity", "affinity"), ("delay_hold", "delay_hold"),
                       ("warmup", "warmup"), ("min_hold", "min_hold"), ("max_hold", "max_hold"),
                       ("replay_window", "replay_window")):
        if name in top.values:
            setattr(opts, attr, top.seconds(name, None))
    opts.icmp_rate = top.number("icmp_rate", opts.icmp_rate, 0)
    opts.max_held = top.int("max_held", opts.max_held, 0, 1 << 20)
    opts.icmp_burst = top.int("icmp_burst", opts.icmp_burst, 0, 1 << 20)
    opts.udp_port = cfg.sal_udp_port
    if cfg.address:
        opts.address = ipaddress.IPv4Address(cfg.address).packed
    for i, k in enumerate(tables(data, "key", lambda m: fail("key", m))):
        cfg.keys.append(key_from(k, lambda m, i=i: fail_at(("key", i), m)))
    if not cfg.keys:
        fail("key", "no [[key]]: a router accepts only authenticated registrations")
    for i, r in enumerate(tables(data, "rule", lambda m: fail("rule", m))):
        cfg.rules.append(_rule(r, at("rule", i)))
    seen = {}
    for i, svc in enumerate(tables(data, "service", lambda m: fail("service", m))):
        prefix, affinity, label = _service(svc, at("service", i))
        if prefix in seen:
            fail_at(("service", i), f"{label or prefix} is already configured in [[service]] {seen[prefix]}")
        seen[prefix] = i + 1
        cfg.affinities.append((prefix, affinity, label))
    return cfg


def key_from(table: dict, fail) -> reg.Key:
    """A [[key]] (or a gateway's [routing] key): id, key or key_file, names."""
    key_id = str(table.get("id", table.get("key_id", "deployment")))
    if ("key" in table) == ("key_file" in table):
        fail("give exactly one of 'key' (hex) or 'key_file'")
    try:
        if "key_file" in table:
            with open(table["key_file"]) as f:
                text = f.read()
        else:
            text = str(table["key"])
        secret = reg.parse_key(text)
    except OSError as exc:
        fail(f"cannot read key_file: {exc.strerror}")
    except ValueError as exc:
        fail(str(exc))
    names = table.get("names", ["*"])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        fail("names must be a list of service name patterns")
    return reg.Key(key_id, secret, tuple(names))


def _service(svc: dict, fail) -> tuple:
    """A [[service]]: per-service policy (client affinity) by name, name:port or prefix.
    ``fail(message, key=None)`` raises, at the key's line."""
    for k in svc:
        if k not in {"service", "prefix", "affinity", "affinity_timeout"}:
            fail(f"unknown key {k!r}", k)
    prefix, label = _prefix(svc, fail, "a [[service]]")
    return prefix, affinity_from(svc, lambda m: fail(m, "affinity")), label


def _rule(rule: dict, fail) -> RuleConfig:
    for k in rule:
        if k not in {"service", "prefix", "action", "next_hop", "priority", "weight"}:
            fail(f"unknown key {k!r}", k)
    prefix, label = _prefix(rule, fail, "a rule")
    try:
        action = Action(rule.get("action", "forward"))
    except ValueError:
        fail("action must be forward, drop or delay", "action")
    if action == Action.DEMUX:
        fail("a router has no local listeners: action must be forward, drop or delay", "action")
    next_hop = None
    if action == Action.FORWARD:
        if "next_hop" not in rule:
            fail("a forward rule needs a 'next_hop'")
        next_hop = ipv4(rule["next_hop"], lambda m: fail(m, "next_hop"))
    return RuleConfig(prefix, action, next_hop,
                      integer(rule.get("priority", 1), lambda m: fail(m, "priority"), 0, 1 << 16, "priority"),
                      integer(rule.get("weight", 1), lambda m: fail(m, "weight"), 1, 1 << 16, "weight"), label)


def _prefix(table: dict, fail, what: str) -> tuple:
    """(ServicePrefix, label) of a table naming a 'service' (name: every port, its 224-bit
    prefix; name:port: that serviceID) or a serviceID 'prefix' ("default": /0)."""
    if ("service" in table) == ("prefix" in table):
        fail(f"{what} names either a 'service' (name or name:port) or a serviceID 'prefix'")
    try:
        if "service" in table:
            text = str(table["service"])
            name, _, port = text.rpartition(":")
            if port.isdigit() and name:
                return ServicePrefix(service_id_for(name, int(port))), text
            return ServicePrefix(service_id_for(text), 224), text
        text = str(table["prefix"])
        return (ServicePrefix(bytes(32), 0) if text == "default" else ServicePrefix.parse(text)), ""
    except ServiceIDError as exc:
        fail(str(exc), "service" if "service" in table else "prefix")
