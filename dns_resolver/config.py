"""Resolver configuration: a TOML file, checked completely before anything starts.

Every mistake is a :class:`ConfigError` naming the file and line at fault. See
``deploy/dns.toml`` for a commented example and docs/resolver.md for the meaning of
each key.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field

from serval.metrics import parse_config as parse_metrics

from .names import Service, normalize

DEFAULT_VIRTUAL_NETWORK = "198.18.0.0/16"
NAMES_VIEW_PORT = 54327      # a router's names view (TCP), beside its registrations (UDP 54326)
_NAME_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class ConfigError(ValueError):
    def __init__(self, path: str, line: int | None, message: str):
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


@dataclass
class ZoneConfig:
    name: str
    ttl: int = 30
    negative_ttl: int = 60
    routed: bool = True          # its names are served through the routers: [liveness] applies
    services: list = field(default_factory=list)


@dataclass
class DnsConfig:
    path: str
    listen: list = field(default_factory=lambda: [("127.0.0.1", 53)])
    allow: list = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_udp_size: int = 1232
    tcp_timeout: float = 10.0
    tcp_connections: int = 128
    log_level: str = "info"
    metrics: tuple | None = None                       # (host, port): Prometheus metrics (default: off)
    rate: float = 2000.0
    burst: float = 4000.0
    slip: int = 1
    rate_clients: int = 10000
    upstreams: list = field(default_factory=list)      # [(host, port)]
    upstreams_configured: bool = False                 # servers given (even empty: no forwarding)
    resolv_conf: str = "/etc/resolv.conf"
    timeout: float = 1.5
    retry_down_after: float = 30.0
    upstream_udp_size: int = 1232
    cache_size: int = 10000
    min_ttl: int = 0
    max_ttl: int = 86400
    max_negative_ttl: int = 3600
    virtual_network: str = DEFAULT_VIRTUAL_NETWORK
    exclude: list = field(default_factory=list)
    mappings: str | None = None
    gateway_control: str | None = None
    reclaim_after: float = 3600.0
    reclaim_interval: float = 60.0
    flush_interval: float = 30.0
    liveness_routers: list = field(default_factory=list)   # [(host, port)]: each router's names view
    liveness_interval: float = 1.0
    liveness_timeout: float = 1.0
    liveness_stale_after: float = 3.0
    down_ttl: int = 5
    zones: list = field(default_factory=list)

    @property
    def services(self) -> list:
        return [svc for zone in self.zones for svc in zone.services]


class Locator:
    """Finds the line of a table or key in TOML text, for error messages. Paths look
    like ``("zone", 0, "service", 1, "name")`` (array tables carry their index)."""

    _key = re.compile(r'^\s*("[^"]*"|[A-Za-z0-9_-]+)\s*=')

    def __init__(self, text: str):
        self.lines: dict[tuple, int] = {}
        latest: dict[tuple, int] = {}
        counts: dict[tuple, int] = {}
        path: tuple = ()

        def resolve(parts):
            out: tuple = ()
            for part in parts:
                out = out + ((part, latest[(out, part)]) if (out, part) in latest else (part,))
            return out

        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if line.startswith("[["):
                parts = [p.strip().strip('"') for p in line[2:line.find("]]")].split(".")]
                parent = resolve(parts[:-1])
                index = counts.get((parent, parts[-1]), 0)
                counts[(parent, parts[-1])] = index + 1
                latest[(parent, parts[-1])] = index
                path = parent + (parts[-1], index)
                self.lines.setdefault(path, n)
            elif line.startswith("["):
                path = resolve([p.strip().strip('"') for p in line[1:line.find("]")].split(".")])
                self.lines.setdefault(path, n)
            else:
                m = self._key.match(raw)
                if m:
                    self.lines.setdefault(path + (m.group(1).strip('"'),), n)

    def line(self, *path) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def load(path: str) -> DnsConfig:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(path, int(m.group(1)) if m else None, f"not valid TOML: {exc}") from None
    return parse(data, path, Locator(text))


SECTIONS = {
    "server": {"listen", "port", "allow", "max_udp_size", "tcp_timeout", "tcp_connections", "log_level",
               "metrics", "metrics_public"},
    "rate_limit": {"rate", "burst", "slip", "clients"},
    "upstream": {"servers", "resolv_conf", "timeout", "retry_down_after", "udp_size"},
    "cache": {"size", "min_ttl", "max_ttl", "max_negative_ttl"},
    "virtual": {"network", "exclude", "mappings", "gateway_control", "reclaim_after",
                "reclaim_interval", "flush_interval"},
    "liveness": {"routers", "interval", "timeout", "stale_after", "down_ttl"},
}


def parse(data: dict, path: str, loc: Locator | None = None) -> DnsConfig:
    loc = loc or Locator("")

    def fail(where: tuple, message: str):
        raise ConfigError(path, loc.line(*where), message)

    cfg = DnsConfig(path=path)
    for name in data:
        if name not in SECTIONS and name not in ("zone", "service"):
            fail((name,), f"unknown section [{name}] (known: {', '.join([*SECTIONS, 'zone', 'service'])})")
    for name, keys in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            fail((name,), f"[{name}] must be a table")
        for key in table:
            if key not in keys:
                fail((name, key), f"unknown key {key!r} in [{name}] (known: {', '.join(sorted(keys))})")

    # [server]
    server = data.get("server", {})
    port = _int(server.get("port", 53), 1, 65535, lambda m: fail(("server", "port"), m))
    if "listen" in server:
        listen = server["listen"]
        if isinstance(listen, str):
            listen = [listen]
        if not isinstance(listen, list) or not listen:
            fail(("server", "listen"), "listen must be a list of addresses (\"198.19.1.1\", \"127.0.0.1:5353\")")
        cfg.listen = [_host_port(x, port, lambda m: fail(("server", "listen"), m)) for x in listen]
    else:
        cfg.listen = [("127.0.0.1", port)]
    if "allow" in server:
        cfg.allow = _networks(server["allow"], lambda m: fail(("server", "allow"), m))
    cfg.max_udp_size = _int(server.get("max_udp_size", 1232), 512, 65535, lambda m: fail(("server", "max_udp_size"), m))
    cfg.tcp_timeout = _num(server.get("tcp_timeout", 10), 0.1, 3600, lambda m: fail(("server", "tcp_timeout"), m))
    cfg.tcp_connections = _int(server.get("tcp_connections", 128), 1, 100000,
                               lambda m: fail(("server", "tcp_connections"), m))
    cfg.log_level = str(server.get("log_level", "info")).lower()
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        fail(("server", "log_level"), "log_level must be debug, info, warning or error")
    cfg.metrics = parse_metrics(server, lambda key, message: fail(("server", key), message))

    # [rate_limit]
    rl = data.get("rate_limit", {})
    cfg.rate = _num(rl.get("rate", 2000), 0, 1e9, lambda m: fail(("rate_limit", "rate"), m))
    cfg.burst = _num(rl.get("burst", max(1.0, 2 * cfg.rate)), 1, 1e9, lambda m: fail(("rate_limit", "burst"), m))
    cfg.slip = _int(rl.get("slip", 1), 0, 100, lambda m: fail(("rate_limit", "slip"), m))
    cfg.rate_clients = _int(rl.get("clients", 10000), 1, 10_000_000, lambda m: fail(("rate_limit", "clients"), m))

    # [upstream]
    up = data.get("upstream", {})
    cfg.resolv_conf = str(up.get("resolv_conf", "/etc/resolv.conf"))
    if "servers" in up:
        servers = up["servers"]
        if not isinstance(servers, list):
            fail(("upstream", "servers"), "servers must be a list of addresses")
        cfg.upstreams = [_host_port(x, 53, lambda m: fail(("upstream", "servers"), m)) for x in servers]
        cfg.upstreams_configured = True
    cfg.timeout = _num(up.get("timeout", 1.5), 0.05, 60, lambda m: fail(("upstream", "timeout"), m))
    cfg.retry_down_after = _num(up.get("retry_down_after", 30), 0, 86400,
                                lambda m: fail(("upstream", "retry_down_after"), m))
    cfg.upstream_udp_size = _int(up.get("udp_size", 1232), 512, 65535, lambda m: fail(("upstream", "udp_size"), m))

    # [cache]
    cache = data.get("cache", {})
    cfg.cache_size = _int(cache.get("size", 10000), 0, 10_000_000, lambda m: fail(("cache", "size"), m))
    cfg.min_ttl = _int(cache.get("min_ttl", 0), 0, 86400, lambda m: fail(("cache", "min_ttl"), m))
    cfg.max_ttl = _int(cache.get("max_ttl", 86400), 0, 7 * 86400, lambda m: fail(("cache", "max_ttl"), m))
    cfg.max_negative_ttl = _int(cache.get("max_negative_ttl", 3600), 0, 86400,
                                lambda m: fail(("cache", "max_negative_ttl"), m))
    if cfg.min_ttl > cfg.max_ttl:
        fail(("cache", "min_ttl"), "min_ttl is above max_ttl")

    # [virtual]
    virtual = data.get("virtual", {})
    try:
        cfg.virtual_network = str(ipaddress.IPv4Network(str(virtual.get("network", DEFAULT_VIRTUAL_NETWORK))))
    except ValueError as exc:
        fail(("virtual", "network"), f"network: {exc}")
    cfg.exclude = _networks(virtual.get("exclude", []), lambda m: fail(("virtual", "exclude"), m))
    if "mappings" in virtual:
        cfg.mappings = str(virtual["mappings"])
    if "gateway_control" in virtual:
        cfg.gateway_control = str(virtual["gateway_control"])
    cfg.reclaim_after = _num(virtual.get("reclaim_after", 3600), 0, 365 * 86400,
                             lambda m: fail(("virtual", "reclaim_after"), m))
    cfg.reclaim_interval = _num(virtual.get("reclaim_interval", 60), 0.05, 86400,
                                lambda m: fail(("virtual", "reclaim_interval"), m))
    cfg.flush_interval = _num(virtual.get("flush_interval", 30), 0.05, 86400,
                              lambda m: fail(("virtual", "flush_interval"), m))

    # [liveness]
    live = data.get("liveness", {})
    routers = live.get("routers", [])
    if not isinstance(routers, list):
        fail(("liveness", "routers"), "routers must be a list of \"address:port\" (each router's names view)")
    cfg.liveness_routers = [_host_port(x, NAMES_VIEW_PORT, lambda m: fail(("liveness", "routers"), m)) for x in routers]
    if len(set(cfg.liveness_routers)) != len(cfg.liveness_routers):
        fail(("liveness", "routers"), "a router is listed twice")
    cfg.liveness_interval = _num(live.get("interval", 1), 0.05, 3600, lambda m: fail(("liveness", "interval"), m))
    cfg.liveness_timeout = _num(live.get("timeout", min(1.0, cfg.liveness_interval)), 0.05, 60,
                                lambda m: fail(("liveness", "timeout"), m))
    cfg.liveness_stale_after = _num(live.get("stale_after", 3 * cfg.liveness_interval), 0.05, 86400,
                                    lambda m: fail(("liveness", "stale_after"), m))
    if cfg.liveness_stale_after < cfg.liveness_interval:
        fail(("liveness", "stale_after"), f"stale_after ({cfg.liveness_stale_after:g} s) is below interval "
             f"({cfg.liveness_interval:g} s): every view would be stale before the next poll")
    cfg.down_ttl = _int(live.get("down_ttl", 5), 0, 3600, lambda m: fail(("liveness", "down_ttl"), m))

    # [[zone]] and [[zone.service]], [[service]]
    zones = data.get("zone", [])
    if not isinstance(zones, list):
        fail(("zone",), "write [[zone]] (an array of tables), not [zone]")
    origins: list[tuple] = []       # (service, where it was written)
    for i, z in enumerate(zones):
        cfg.zones.append(_zone(z, i, fail))
        origins += [(svc, ("zone", i, "service", j)) for j, svc in enumerate(cfg.zones[-1].services)]
    names = [z.name for z in cfg.zones]
    if len(set(names)) != len(names):
        fail(("zone",), "a zone is listed twice")
    services = data.get("service", [])
    if not isinstance(services, list):
        fail(("service",), "write [[service]] (an array of tables), not [service]")
    for i, svc in enumerate(services):
        where = ("service", i)
        service = _service(svc, None, lambda k, m: fail(where + ((k,) if k else ()), m))
        zone = _zone_of(service.name, cfg.zones)
        if zone is None:
            fail(where + ("name",), f"service {service.name} is under no [[zone]] "
                 f"(zones: {', '.join(names) or 'none'})")
        zone.services.append(service)
        origins.append((service, where))
    for zi, zone in enumerate(cfg.zones):
        if cfg.reclaim_after < zone.ttl:
            fail(("virtual", "reclaim_after"), f"reclaim_after ({cfg.reclaim_after:g} s) is below zone "
                 f"{zone.name}'s ttl ({zone.ttl} s): an address must outlive its answers")
    network = ipaddress.IPv4Network(cfg.virtual_network)
    seen_names, seen_addresses = set(), {}
    for svc, where in origins:
        if svc.name in seen_names:
            fail(where + ("name",), f"service {svc.name} is listed twice")
        seen_names.add(svc.name)
        if svc.address:
            if ipaddress.IPv4Address(svc.address) not in network:
                fail(where + ("address",), f"service {svc.name}: address {svc.address} is outside the "
                     f"virtual network {network}")
            if svc.address in seen_addresses:
                fail(where + ("address",), f"address {svc.address} is pinned for both "
                     f"{seen_addresses[svc.address]} and {svc.name}")
            seen_addresses[svc.address] = svc.name
    return cfg


def _zone(z, i: int, fail) -> ZoneConfig:
    where = ("zone", i)
    if not isinstance(z, dict):
        fail(where, "a [[zone]] must be a table")
    for key in z:
        if key not in ("name", "ttl", "negative_ttl", "routed", "service"):
            fail(where + (key,), f"unknown key {key!r} in [[zone]] (name, ttl, negative_ttl, routed, "
                 f"[[zone.service]])")
    if not isinstance(z.get("routed", True), bool):
        fail(where + ("routed",), "routed must be true or false")
    if not isinstance(z.get("name"), str):
        fail(where, "every [[zone]] needs a name, like \"svc.example\"")
    name = normalize(z["name"])
    if not _valid_name(name):
        fail(where + ("name",), f"not a valid zone name: {z['name']!r}")
    zone = ZoneConfig(name,
                      ttl=_int(z.get("ttl", 30), 0, 86400, lambda m: fail(where + ("ttl",), m)),
                      negative_ttl=_int(z.get("negative_ttl", 60), 0, 86400,
                                        lambda m: fail(where + ("negative_ttl",), m)),
                      routed=z.get("routed", True))
    services = z.get("service", [])
    if not isinstance(services, list):
        fail(where, "write [[zone.service]] (an array of tables)")
    for j, svc in enumerate(services):
        swhere = where + ("service", j)
        zone.services.append(_service(svc, name, lambda k, m: fail(swhere + ((k,) if k else ()), m)))
    return zone


def _service(svc, zone: str | None, fail) -> Service:
    if not isinstance(svc, dict):
        fail(None, "a service must be a table")
    for key in svc:
        if key not in ("name", "ports", "address"):
            fail(key, f"unknown key {key!r} in a service (name, ports, address)")
    raw = svc.get("name")
    if not isinstance(raw, str) or not raw.strip(". "):
        fail("name", "every service needs a name")
    name = normalize(raw)
    if zone is not None:
        if raw.strip().endswith("."):          # absolute: must lie in the zone
            if not (name == zone or name.endswith("." + zone)):
                fail("name", f"{raw!r} is not under zone {zone}")
        elif not name.endswith("." + zone):
            name = f"{name}.{zone}"
    if not _valid_name(name):
        fail("name", f"not a valid service name: {raw!r} (letters, digits, '-' and '_' per label)")
    ports = svc.get("ports", [])
    if isinstance(ports, int):
        ports = [ports]
    if not isinstance(ports, list):
        fail("ports", "ports must be a list of port numbers")
    ports = tuple(_int(p, 1, 65535, lambda m: fail("ports", m)) for p in ports)
    address = None
    if "address" in svc:
        try:
            address = str(ipaddress.IPv4Address(str(svc["address"])))
        except ValueError:
            fail("address", f"not an IPv4 address: {svc['address']!r}")
    return Service(name, ports, address)


def _zone_of(name: str, zones: list) -> ZoneConfig | None:
    best = None
    for zone in zones:
        if name.endswith("." + zone.name) and (best is None or len(zone.name) > len(best.name)):
            best = zone
    return best


def _valid_name(name: str) -> bool:
    return bool(name) and len(name) <= 253 and all(_NAME_LABEL.match(label) for label in name.split("."))


def _host_port(value, default_port: int, fail) -> tuple[str, int]:
    text = str(value).strip()
    host, port = text, default_port
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), int(m.group(2)) if m.group(2) else default_port
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit():
            fail(f"bad port in {text!r}")
        port = int(p)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        fail(f"not an IP address: {text!r} (write \"198.19.1.1\", \"198.19.1.1:5353\" or \"[::1]:53\")")
    if not 0 < port < 65536:
        fail(f"port out of range in {text!r}")
    return host, port


def _networks(value, fail) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        fail("expected a list of networks like \"198.19.1.0/24\"")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            fail(f"not a network: {item!r}")
    return out


def _int(value, low, high, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        fail(f"expected a whole number from {low} to {high}, got {value!r}")
    return value


def _num(value, low, high, fail) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        fail(f"expected a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def resolv_conf_servers(path: str, exclude=()) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf, minus ``exclude`` (our own listen
    addresses: forwarding to ourselves would loop)."""
    out = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                host = str(ipaddress.ip_address(fields[1].split("%", 1)[0]))
            except ValueError:
                continue
            if (host, 53) not in exclude and (host, 53) not in out:
                out.append((host, 53))
    return out
