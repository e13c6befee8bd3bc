"""Resolver configuration: a TOML file, checked completely before anything starts.

Every mistake is a :class:`ConfigError` naming the file and line at fault. See
``deploy/dns.toml`` for a commented example and docs/resolver.md for the meaning of
each key.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from serval.config_schema import (ConfigError, Locator, Table, address_port, boolean, choice, integer, ipv4,
                                  ipv4_network, listing, networks, read, tables)
from serval.metrics import parse_config as parse_metrics

from .names import Service, normalize

DEFAULT_VIRTUAL_NETWORK = "198.18.0.0/16"
NAMES_VIEW_PORT = 54327      # a router's names view (TCP), beside its registrations (UDP 54326)
LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


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


def load(path: str) -> DnsConfig:
    data, loc = read(path)
    return parse(data, path, loc)


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
        Table(data.get(name, {}), (name,), fail).only(keys, f" in [{name}] (known: {', '.join(sorted(keys))})")

    # [server]
    server = Table(data.get("server", {}), ("server",), fail)
    port = server.int("port", 53, 1, 65535)
    listen = server.get("listen", "127.0.0.1")
    cfg.listen = listing(listen, server.failer("listen"), lambda x: address_port(x, server.failer("listen"), "listen",
                                                                                  port, ipv6=True),
                         "listen must be a list of addresses (\"198.19.1.1\", \"127.0.0.1:5353\")",
                         one=True, empty=False)
    if "allow" in server.values:
        cfg.allow = networks(server.get("allow"), server.failer("allow"))
    cfg.max_udp_size = server.int("max_udp_size", 1232, 512, 65535)
    cfg.tcp_timeout = server.number("tcp_timeout", 10, 0.1, 3600)
    cfg.tcp_connections = server.int("tcp_connections", 128, 1, 100000)
    cfg.log_level = choice(str(server.get("log_level", "info")).lower(), server.failer("log_level"), "log_level",
                           LOG_LEVELS)
    cfg.metrics = parse_metrics(server.values, server.fail)

    # [rate_limit]
    rl = Table(data.get("rate_limit", {}), ("rate_limit",), fail)
    cfg.rate = rl.number("rate", 2000, 0, 1e9)
    cfg.burst = rl.number("burst", max(1.0, 2 * cfg.rate), 1, 1e9)
    cfg.slip = rl.int("slip", 1, 0, 100)
    cfg.rate_clients = rl.int("clients", 10000, 1, 10_000_000)

    # [upstream]
    up = Table(data.get("upstream", {}), ("upstream",), fail)
    cfg.resolv_conf = up.str("resolv_conf", "/etc/resolv.conf")
    if "servers" in up.values:
        cfg.upstreams = listing(up.get("servers"), up.failer("servers"),
                                lambda x: address_port(x, up.failer("servers"), "servers", 53, ipv6=True),
                                "servers must be a list of addresses")
        cfg.upstreams_configured = True
    cfg.timeout = up.number("timeout", 1.5, 0.05, 60)
    cfg.retry_down_after = up.number("retry_down_after", 30, 0, 86400)
    cfg.upstream_udp_size = up.int("udp_size", 1232, 512, 65535)

    # [cache]
    cache = Table(data.get("cache", {}), ("cache",), fail)
    cfg.cache_size = cache.int("size", 10000, 0, 10_000_000)
    cfg.min_ttl = cache.int("min_ttl", 0, 0, 86400)
    cfg.max_ttl = cache.int("max_ttl", 86400, 0, 7 * 86400)
    cfg.max_negative_ttl = cache.int("max_negative_ttl", 3600, 0, 86400)
    if cfg.min_ttl > cfg.max_ttl:
        cache.fail("min_ttl", "min_ttl is above max_ttl")

    # [virtual]
    virtual = Table(data.get("virtual", {}), ("virtual",), fail)
    cfg.virtual_network = ipv4_network(virtual.get("network", DEFAULT_VIRTUAL_NETWORK), virtual.failer("network"),
                                       "network")
    cfg.exclude = networks(virtual.get("exclude", []), virtual.failer("exclude"))
    cfg.mappings = virtual.str("mappings")
    cfg.gateway_control = virtual.str("gateway_control")
    cfg.reclaim_after = virtual.number("reclaim_after", 3600, 0, 365 * 86400)
    cfg.reclaim_interval = virtual.number("reclaim_interval", 60, 0.05, 86400)
    cfg.flush_interval = virtual.number("flush_interval", 30, 0.05, 86400)

    # [liveness]
    live = Table(data.get("liveness", {}), ("liveness",), fail)
    cfg.liveness_routers = listing(
        live.get("routers", []), live.failer("routers"),
        lambda x: address_port(x, live.failer("routers"), "routers", NAMES_VIEW_PORT, ipv6=True),
        "routers must be a list of \"address:port\" (each router's names view)", unique="a router is listed twice")
    cfg.liveness_interval = live.number("interval", 1, 0.05, 3600)
    cfg.liveness_timeout = live.number("timeout", min(1.0, cfg.liveness_interval), 0.05, 60)
    cfg.liveness_stale_after = live.number("stale_after", 3 * cfg.liveness_interval, 0.05, 86400)
    if cfg.liveness_stale_after < cfg.liveness_interval:
        live.fail("stale_after", f"stale_after ({cfg.liveness_stale_after:g} s) is below interval "
                  f"({cfg.liveness_interval:g} s): every view would be stale before the next poll")
    cfg.down_ttl = live.int("down_ttl", 5, 0, 3600)

    # [[zone]] and [[zone.service]], [[service]]
    zones = tables(data, "zone", lambda m: fail(("zone",), m))
    origins: list[tuple] = []       # (service, where it was written)
    for i, z in enumerate(zones):
        cfg.zones.append(_zone(z, i, fail))
        origins += [(svc, ("zone", i, "service", j)) for j, svc in enumerate(cfg.zones[-1].services)]
    names = [z.name for z in cfg.zones]
    if len(set(names)) != len(names):
        fail(("zone",), "a zone is listed twice")
    services = tables(data, "service", lambda m: fail(("service",), m))
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
    routed = boolean(z.get("routed", True), lambda m: fail(where + ("routed",), m), "routed")
    if not isinstance(z.get("name"), str):
        fail(where, "every [[zone]] needs a name, like \"svc.example\"")
    name = normalize(z["name"])
    if not _valid_name(name):
        fail(where + ("name",), f"not a valid zone name: {z['name']!r}")
    zone = ZoneConfig(name,
                      ttl=integer(z.get("ttl", 30), lambda m: fail(where + ("ttl",), m), 0, 86400, "ttl"),
                      negative_ttl=integer(z.get("negative_ttl", 60), lambda m: fail(where + ("negative_ttl",), m),
                                           0, 86400, "negative_ttl"),
                      routed=routed)
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
        if key not in ("name", "ports", "address", "udp_ports"):
            fail(key, f"unknown key {key!r} in a service (name, ports, address, udp_ports)")
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
    ports = _ports(svc, "ports", fail)
    # UDP is carried only to the ports listed (a stray datagram to another port is
    # refused at the client gateway, never sent on as a flow); TCP to every port
    udp_ports = _ports(svc, "udp_ports", fail)
    if len(set(udp_ports)) != len(udp_ports):
        fail("udp_ports", f"service {name}: a port is listed twice in udp_ports")
    address = ipv4(svc["address"], lambda m: fail("address", m)) if "address" in svc else None
    return Service(name, ports, address, udp_ports)


def _ports(svc: dict, key: str, fail) -> tuple[int, ...]:
    ports = svc.get(key, [])
    if isinstance(ports, int) and not isinstance(ports, bool):
        ports = [ports]
    if not isinstance(ports, list):
        fail(key, f"{key} must be a list of port numbers, like [53]")
    return tuple(integer(p, lambda m: fail(key, m), 1, 65535, key) for p in ports)


def _zone_of(name: str, zones: list) -> ZoneConfig | None:
    best = None
    for zone in zones:
        if name.endswith("." + zone.name) and (best is None or len(zone.name) > len(best.name)):
            best = zone
    return best


def _valid_name(name: str) -> bool:
    return bool(name) and len(name) <= 253 and all(_NAME_LABEL.match(label) for label in name.split("."))


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
