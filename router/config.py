"""Router configuration: a TOML file, checked completely before anything starts.

    [router]                 instance, address, queue, registration_port, control_socket, ...
    [[key]]                  id, key | key_file, names (shell patterns it may register)
    [[rule]]                 service | prefix, action (forward|drop|delay), next_hop, priority, weight
    [[service]]              service | prefix, affinity ("none"|"client"), affinity_timeout

See deploy/router.toml for every key with its default.
"""
import ipaddress
import tomllib
from dataclasses import dataclass, field

from sal import registration as reg
from sal.affinity import from_config as affinity_from
from sal.serviceid import ServiceIDError, ServicePrefix, service_id_for
from sal.service_table import Action
from serval.metrics import parse_config as parse_metrics

from .core import SAL_UDP_PORT, RouterOptions


class RouterConfigError(ValueError):
    pass


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
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise RouterConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RouterConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, path)


def parse(data: dict, path: str) -> RouterConfig:
    def fail(where: str, message: str):
        raise RouterConfigError(f"{path}: [{where}] {message}")

    unknown = set(data) - {"router", "key", "rule", "service"}
    if unknown:
        fail(sorted(unknown)[0], "unknown section")
    top = data.get("router", {})
    for k in top:
        if k not in _ROUTER_KEYS:
            fail("router", f"unknown key {k!r}")
    cfg = RouterConfig(path)
    cfg.instance = str(top.get("instance", cfg.instance))
    if "address" in top:
        cfg.address = _ipv4(top["address"], lambda m: fail("router", m))
    cfg.queue = _int(top, "queue", cfg.queue, 0, 65535, fail)
    cfg.registration_port = _int(top, "registration_port", cfg.registration_port, 1, 65535, fail)
    cfg.sal_udp_port = _int(top, "sal_udp_port", cfg.sal_udp_port, 1, 65535, fail)
    cfg.control_socket = str(top.get("control_socket", f"/run/serval/{cfg.instance}.sock"))
    cfg.state_dir = str(top.get("state_dir", cfg.state_dir))
    cfg.log_level = str(top.get("log_level", "info")).lower()
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        fail("router", "log_level must be debug, info, warning or error")
    cfg.queue_bypass = bool(top.get("queue_bypass", True))
    cfg.metrics = parse_metrics(top, lambda key, message: fail("router", message))
    if "names_view" in top:
        host, _, port = str(top["names_view"]).rpartition(":")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            fail("router", 'names_view must look like "198.19.20.1:54327"')
        cfg.names_view = (_ipv4(host, lambda m: fail("router", m)), int(port))
    opts = cfg.options
    if "affinity" in top and "repeated_syn_window" in top:
        fail("router", "'affinity' is the old name of 'repeated_syn_window': give one")
    # (the option) -> RouterOptions field
    for name, attr in (("repeated_syn_window", "affinity"), ("affinity", "affinity"), ("delay_hold", "delay_hold"),
                       ("warmup", "warmup"), ("min_hold", "min_hold"), ("max_hold", "max_hold"),
                       ("replay_window", "replay_window"), ("icmp_rate", "icmp_rate")):
        if name in top:
            value = top[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                fail("router", f"{name} must be a number >= 0")
            setattr(opts, attr, float(value))
    opts.max_held = _int(top, "max_held", opts.max_held, 0, 1 << 20, fail)
    opts.icmp_burst = _int(top, "icmp_burst", opts.icmp_burst, 0, 1 << 20, fail)
    opts.udp_port = cfg.sal_udp_port
    if cfg.address:
        opts.address = ipaddress.IPv4Address(cfg.address).packed
    for i, k in enumerate(_list(data, "key", fail)):
        cfg.keys.append(key_from(k, lambda m, i=i: fail(f"key {i + 1}", m)))
    if not cfg.keys:
        fail("key", "no [[key]]: a router accepts only authenticated registrations")
    for i, r in enumerate(_list(data, "rule", fail)):
        cfg.rules.append(_rule(r, lambda m, i=i: fail(f"rule {i + 1}", m)))
    seen = {}
    for i, svc in enumerate(_list(data, "service", fail)):
        prefix, affinity, label = _service(svc, lambda m, i=i: fail(f"service {i + 1}", m))
        if prefix in seen:
            fail(f"service {i + 1}", f"{label or prefix} is already configured in [[service]] {seen[prefix]}")
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
    """A [[service]]: per-service policy (client affinity) by name, name:port or prefix."""
    for k in svc:
        if k not in {"service", "prefix", "affinity", "affinity_timeout"}:
            fail(f"unknown key {k!r}")
    prefix, label = _prefix(svc, fail, "a [[service]]")
    return prefix, affinity_from(svc, fail), label


def _rule(rule: dict, fail) -> RuleConfig:
    for k in rule:
        if k not in {"service", "prefix", "action", "next_hop", "priority", "weight"}:
            fail(f"unknown key {k!r}")
    prefix, label = _prefix(rule, fail, "a rule")
    try:
        action = Action(rule.get("action", "forward"))
    except ValueError:
        fail("action must be forward, drop or delay")
    if action == Action.DEMUX:
        fail("a router has no local listeners: action must be forward, drop or delay")
    next_hop = None
    if action == Action.FORWARD:
        if "next_hop" not in rule:
            fail("a forward rule needs a 'next_hop'")
        next_hop = _ipv4(rule["next_hop"], fail)
    return RuleConfig(prefix, action, next_hop, _int(rule, "priority", 1, 0, 1 << 16, lambda w, m: fail(m)),
                      _int(rule, "weight", 1, 1, 1 << 16, lambda w, m: fail(m)), label)


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
        fail(str(exc))


def _list(data, name, fail):
    items = data.get(name, [])
    if not isinstance(items, list):
        fail(name, f"write [[{name}]] (an array of tables)")
    return items


def _int(table, key, default, low, high, fail):
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        fail("router", f"{key} must be a whole number from {low} to {high}, not {value!r}")
    return value


def _ipv4(value, fail) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        fail(f"not an IPv4 address: {value!r}")
