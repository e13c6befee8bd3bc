"""Gateway configuration: a TOML file, checked completely before anything starts.

Every mistake is reported as ``ConfigError`` naming the file and the line at fault, so
a bad config is refused at start instead of half-applied.
"""
import ipaddress
import re
from dataclasses import dataclass, field

from sal.affinity import from_config as affinity_from
from sal.serviceid import ServiceIDError, ServicePrefix, parse_service_id, service_id_for
from sal.service_table import Action
from serval import config_schema as schema
from serval.config_schema import (ConfigError, Locator, Table, address_port, choice, integer, ipv4,
                                  ipv4_network, listing, read, seconds, tables)
from serval.metrics import parse_config as parse_metrics

from .routing_config import parse as parse_routing
from .translate.base import Timeouts
from .translate.limits import Limits

DEFAULT_VIRTUAL_NETWORK = "198.18.0.0/16"
LOG_LEVELS = ("debug", "info", "warning", "error")
HELPERS = ("tftp",)                    # a server's UDP service: gateway/translate/tftp.py


@dataclass
class ServiceConfig:
    name: str
    port: int
    service_id: bytes
    address: str | None = None         # client: the virtual address
    backend: tuple[str, int] | None = None   # server: legacy backend host:port
    weight: int = 1
    priority: int = 1
    protocol: str = "tcp"              # "tcp" or "udp" (carried as a SAL flow of that transport)
    helper: str = ""                   # server, UDP: an application helper ("tftp"), or none

    @property
    def key(self) -> str:
        """What the service is known by (registration, health, drain): ``name:port``,
        and ``name:port/udp`` for a UDP service (one name:port may be both)."""
        return f"{self.name}:{self.port}" + ("/udp" if self.protocol == "udp" else "")


@dataclass
class RuleConfig:
    prefix: ServicePrefix
    action: Action
    next_hop: str | None
    priority: int = 1
    weight: int = 1
    affinity: object = None        # sal.affinity.Affinity: "client" affinity among equal rules


@dataclass
class GatewayConfig:
    role: str
    path: str
    instance: str
    queue: int
    control_queue: int = 0             # SAL control packets and SYN-ACKs (default: queue + 1000)
    new_flow_queue: int = 0            # new connections' SYNs, kept short (default: control_queue + 1000)
    carriage: str = "ip"
    sal_address: str | None = None
    virtual_network: str = DEFAULT_VIRTUAL_NETWORK
    intercept_local: bool = True
    intercept_forwarded: bool = True
    client_address: str = "gateway"
    # our ports toward backends: every unprivileged port below Linux's ephemeral range
    # (32768-60999, net.ipv4.ip_local_port_range), which this host's own connections use
    port_range: tuple[int, int] = (1024, 32767)
    source_addresses: list = field(default_factory=list)   # our addresses toward backends (server)
    backend_time_wait: float = 60.0    # how long a backend holds TIME_WAIT (Linux 60 s, Windows 120 s)
    accept_broadcast_syn: bool = True  # answer a SAL SYN sent to one of our subnets' broadcast
    mtu: int | str = "auto"            # "auto": the smallest MTU of this host's links
    queue_bypass: bool = True
    control_socket: str = ""
    mappings: str | None = None        # the resolver's mappings file (client gateway)
    state_dir: str = "/run/serval"
    log_level: str = "info"
    metrics: tuple | None = None       # (host, port): serve Prometheus metrics there (default: off)
    drain_timeout: float = 5.0         # SIGTERM: seconds live flows may take to finish
    resume_window: float = 60.0        # a flow snapshot younger than this is resumed at start
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    services: list = field(default_factory=list)
    rules: list = field(default_factory=list)
    routing: object = None             # [routing]: service routers (gateway/routing_config.py)
    # [mobility] when a preferred uplink comes back, move flows back to it (else stay
    # on the working one until it fails)
    return_to_preferred: bool = True
    # established flows translated in the kernel (tc-BPF): "auto" where it loads,
    # "on" refuses to start without it, "off" keeps every packet in Python
    fast_path: str = "auto"
    bpffs: str = "/sys/fs/bpf"         # where the fast path pins its program and maps
    # the fast path hands translated packets straight to the next hop's interface,
    # past this host's routing and netfilter (no NAT or filter rules apply to them):
    # "auto" while this namespace has none but the gateways' own (fastpath/host_filters.py)
    fast_path_redirect: object = "auto"     # "auto", True or False


_GATEWAY_KEYS = {
    "instance", "queue", "carriage", "sal_address", "virtual_network", "intercept_local",
    "intercept_forwarded", "client_address", "port_range", "mtu", "queue_bypass",
    "control_socket", "state_dir", "log_level", "mappings", "control_queue", "new_flow_queue", "drain_timeout",
    "resume_window", "fast_path", "bpffs", "fast_path_redirect",
}
_GATEWAY_KEYS |= {"metrics", "metrics_public"}     # "host:port" (loopback unless metrics_public)
_GATEWAY_KEYS |= {"source_addresses", "backend_time_wait", "accept_broadcast_syn"}   # server gateway


def line_of(path: str, table: str, key: str | None = None, index: int | None = None) -> int | None:
    """The line of ``key`` in ``[table]`` (``[[table]]`` number ``index``) of the file at
    ``path``, for a check made after loading (against this host's links, say); None when
    it cannot be read."""
    return schema.line_of(path, table, *(() if index is None else (index,)), *(() if key is None else (key,)))


def load(path: str, role: str) -> GatewayConfig:
    data, loc = read(path)
    return parse(data, path, role, loc)


def parse(data: dict, path: str, role: str, loc: Locator | None = None) -> GatewayConfig:
    loc = loc or Locator("")

    def fail_at(where: tuple, message: str):
        raise ConfigError(path, loc.line(*where), message)

    def fail(table, index, key, message):
        fail_at((table,) + (() if index is None else (index,)) + (() if key is None else (key,)), message)

    unknown = set(data) - {"gateway", "timeouts", "service", "route", "routing", "mobility", "limits"}
    if unknown:
        fail(sorted(unknown)[0], None, None, f"unknown section [{sorted(unknown)[0]}]")
    gw = Table(data.get("gateway", {}), ("gateway",), fail_at)
    gw.only(_GATEWAY_KEYS, " in [gateway]")
    cfg = GatewayConfig(role=role, path=path, instance=gw.str("instance", role),
                        queue=gw.int("queue", 0 if role == "client" else 1, 0, 65535))
    cfg.control_queue = gw.int("control_queue", (cfg.queue + 1000) % 65536, 0, 65535)
    if cfg.control_queue == cfg.queue:
        gw.fail("control_queue", "control_queue must differ from queue")
    cfg.new_flow_queue = gw.int("new_flow_queue", (cfg.control_queue + 1000) % 65536, 0, 65535)
    if cfg.new_flow_queue in (cfg.queue, cfg.control_queue):
        gw.fail("new_flow_queue", "new_flow_queue must differ from queue and control_queue")
    cfg.carriage = gw.choice("carriage", "ip", ("ip", "udp"))
    cfg.sal_address = gw.ipv4("sal_address")
    cfg.virtual_network = ipv4_network(gw.get("virtual_network", DEFAULT_VIRTUAL_NETWORK),
                                       gw.failer("virtual_network"), "virtual_network")
    for key in ("intercept_local", "intercept_forwarded", "queue_bypass"):
        setattr(cfg, key, gw.bool(key, getattr(cfg, key)))
    cfg.fast_path_redirect = gw.get("fast_path_redirect", "auto")
    if not (cfg.fast_path_redirect == "auto" or isinstance(cfg.fast_path_redirect, bool)):
        gw.fail("fast_path_redirect", 'fast_path_redirect must be "auto", true or false')
    cfg.client_address = gw.choice("client_address", "gateway", ("gateway", "peer"))
    if "port_range" in gw.values:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", str(gw.get("port_range")))
        if not m or not 1024 <= int(m.group(1)) <= int(m.group(2)) <= 65535:
            gw.fail("port_range", "port_range must look like '1024-32767' (1024..65535)")
        cfg.port_range = (int(m.group(1)), int(m.group(2)))
    _server_keys(cfg, gw)
    cfg.mtu = gw.get("mtu", "auto")
    if cfg.mtu != "auto":
        cfg.mtu = integer(cfg.mtu, lambda m: gw.fail("mtu", f"mtu: 'auto' or {m}"), 576, 65535)
    cfg.control_socket = gw.str("control_socket", f"/run/serval/{cfg.instance}.sock")
    cfg.state_dir = gw.str("state_dir", "/run/serval")
    cfg.drain_timeout = gw.seconds("drain_timeout", cfg.drain_timeout)
    cfg.resume_window = gw.seconds("resume_window", cfg.resume_window)
    cfg.mappings = gw.str("mappings")
    cfg.fast_path = gw.choice("fast_path", "auto", ("auto", "on", "off"))
    cfg.bpffs = gw.str("bpffs", "/sys/fs/bpf")
    cfg.log_level = choice(str(gw.get("log_level", "info")).lower(), gw.failer("log_level"), "log_level", LOG_LEVELS)
    cfg.metrics = parse_metrics(gw.values, gw.fail)
    timeouts = Table(data.get("timeouts", {}), ("timeouts",), fail_at)
    for key in timeouts.values:
        if not hasattr(cfg.timeouts, key):
            timeouts.fail(key, f"unknown timeout {key!r} (idle, handshake, linger, reset_linger, keepalive, udp_idle)")
        off = key == "keepalive"           # the one timeout that 0 turns off
        setattr(cfg.timeouts, key, seconds(
            timeouts.get(key), lambda m: timeouts.fail(key, f"timeout {key} must be a number of seconds (0: off)"
                                                       if off else m), f"timeout {key}", positive=not off))
    seen, protocols = {}, {}
    for i, svc in enumerate(tables(data, "service", lambda m: fail("service", None, None, m))):
        parsed = _service(svc, role, lambda k, m, i=i: fail("service", i, k, m))
        # what a packet is matched on must name one service, or the later silently wins
        key = ((parsed.address, parsed.port) if role == "client" else (parsed.service_id, parsed.backend)) \
            + (parsed.protocol,)
        if key in seen:
            what = (f"virtual address %s:%d ({parsed.protocol})" % key[:2] if role == "client"
                    else f"service {parsed.name}:{parsed.port} with backend %s:%d ({parsed.protocol})"
                    % parsed.backend)
            fail("service", i, None, f"{what} is configured twice (also [[service]] number {seen[key] + 1})")
        seen[key] = i
        other = protocols.setdefault(parsed.service_id, (parsed.protocol, i))
        if role == "server" and other[0] != parsed.protocol:
            fail("service", i, "protocol", f"service {parsed.name}: its service_id is also a {other[0]} service's "
                 f"([[service]] number {other[1] + 1}); a serviceID is one transport here: give one its own "
                 "service_id, or leave both derived from the name")
        if role == "client" and ipaddress.IPv4Address(parsed.address) not in ipaddress.IPv4Network(cfg.virtual_network):
            fail("service", i, "address", f"virtual address {parsed.address} is outside virtual_network "
                 f"{cfg.virtual_network}: only that range is intercepted (move it, or widen virtual_network)")
        cfg.services.append(parsed)
    for i, rule in enumerate(tables(data, "route", lambda m: fail("route", None, None, m))):
        cfg.rules.append(_rule(rule, cfg.services, lambda k, m, i=i: fail("route", i, k, m)))
    # a client gets a default rule to each of its routers
    if role == "server":
        # a server gateway sees a whole client gateway (many legacy hosts) as one source
        cfg.limits.max_flows_per_source = 65_536
    limits = Table(data.get("limits", {}), ("limits",), fail_at)
    for key in limits.values:
        if not hasattr(cfg.limits, key):
            limits.fail(key, f"unknown limit {key!r} ({', '.join(vars(Limits()))})")
        setattr(cfg.limits, key, limits.int(key, None, 1, 1 << 24))
    mobility = Table(data.get("mobility", {}), ("mobility",), fail_at)
    mobility.only({"return_to_preferred"}, " in [mobility] (return_to_preferred)")
    cfg.return_to_preferred = mobility.bool("return_to_preferred", cfg.return_to_preferred)
    cfg.routing = parse_routing(data.get("routing"), cfg, lambda where, m: fail_at(("routing",) + where, m))
    if not cfg.services and not (role == "client" and cfg.mappings):
        fail("gateway", None, None, "no [[service]] configured (nor a resolver 'mappings' file): "
             "the gateway would have nothing to do")
    if role == "client" and not cfg.rules:
        fail("gateway", None, None, "no [[route]] configured: a client gateway needs a next hop")
    return cfg


def _server_keys(cfg: GatewayConfig, gw: Table) -> None:
    """A server gateway's source addresses toward backends, their TIME_WAIT, broadcast SYNs."""
    if "source_addresses" in gw.values:
        if cfg.role != "server":
            gw.fail("source_addresses", "source_addresses is for a server gateway (its addresses toward backends)")
        fail = gw.failer("source_addresses")
        cfg.source_addresses = listing(gw.get("source_addresses"), fail, lambda a: ipv4(a, fail),
                                       "source_addresses is a list of our IPv4 addresses facing the backends",
                                       empty=False, unique="an address is listed twice in source_addresses")
    cfg.backend_time_wait = seconds(
        gw.get("backend_time_wait", cfg.backend_time_wait),
        lambda m: gw.fail("backend_time_wait", "backend_time_wait is the backends' TIME_WAIT in seconds (0 to 600)"),
        "backend_time_wait", high=600)
    cfg.accept_broadcast_syn = gw.bool("accept_broadcast_syn", cfg.accept_broadcast_syn)


def _service(svc: dict, role: str, fail) -> ServiceConfig:
    allowed = {"name", "port", "service_id", "address", "backend", "weight", "priority", "protocol", "helper"}
    for key in svc:
        if key not in allowed:
            fail(key, f"unknown key {key!r} in [[service]]")
    name = svc.get("name")
    if not isinstance(name, str) or not name:
        fail("name", "every [[service]] needs a name")
    port = integer(svc.get("port", 0), lambda m: fail("port", m), 0, 65535, "port")
    try:
        given = svc.get("service_id")
        if isinstance(given, bool) or not isinstance(given, (str, int, type(None))):
            fail("service_id", "service_id is a string (64 hex digits or name:port) or a number")
        # a bare TOML integer is the reference's small-decimal form (16385)
        sid = parse_service_id(str(given)) if given is not None else service_id_for(name, port)
    except ServiceIDError as exc:
        fail("service_id", str(exc))
    out = ServiceConfig(name, port, sid,
                        weight=integer(svc.get("weight", 1), lambda m: fail("weight", m), 1, 1 << 16, "weight"),
                        priority=integer(svc.get("priority", 1), lambda m: fail("priority", m), 0, 1 << 16, "priority"))
    out.protocol = choice(svc.get("protocol", "tcp"), lambda m: fail("protocol", f"service {name}: {m}"), "protocol",
                          ("tcp", "udp"))
    if out.protocol == "udp" and given is None:
        # one name:port may be both (DNS): the derived UDP ID differs from the TCP one in
        # the word before the port (the protocol), under the same name prefix (routes)
        out.service_id = sid[:28] + (17).to_bytes(2, "big") + sid[30:]
    if role == "client":
        if "address" not in svc:
            fail(None, f"service {name}: a client gateway needs its virtual 'address'")
        out.address = ipv4(svc["address"], lambda m: fail("address", m))
        if port == 0:
            fail("port", f"service {name}: a client gateway needs the service 'port'")
    else:
        if "backend" not in svc:
            fail(None, f"service {name}: a server gateway needs its 'backend' (host:port)")
        out.backend = address_port(svc["backend"], lambda m: fail("backend", m), "backend")
    if "helper" in svc:
        if role != "server" or out.protocol != "udp":
            fail("helper", f"service {name}: 'helper' is for a UDP service of a server gateway")
        out.helper = choice(svc["helper"], lambda m: fail("helper", f"service {name}: {m}"), "helper", HELPERS)
    return out


def _rule(rule: dict, services: list, fail) -> RuleConfig:
    allowed = {"service", "prefix", "action", "next_hop", "priority", "weight", "affinity", "affinity_timeout"}
    for key in rule:
        if key not in allowed:
            fail(key, f"unknown key {key!r} in [[route]]")
    if ("service" in rule) == ("prefix" in rule):
        fail(None, "a [[route]] names either a 'service' (by name) or a serviceID 'prefix'")
    if "service" in rule:
        matches = [s for s in services if s.name == rule["service"]]
        if not matches:
            fail("service", f"no [[service]] named {rule['service']!r}")
        # one rule covers every port of the name (the 224-bit name prefix), or the exact ID
        sid = matches[0].service_id
        prefix = ServicePrefix(sid, 224 if all(s.service_id[:28] == sid[:28] for s in matches) else 256)
    else:
        try:
            text = str(rule["prefix"])
            prefix = ServicePrefix(bytes(32), 0) if text == "default" else ServicePrefix.parse(text)
        except ServiceIDError as exc:
            fail("prefix", str(exc))
    try:
        action = Action(rule.get("action", "forward"))
    except ValueError:
        fail("action", f"action must be one of {', '.join(a.value for a in Action)}")
    next_hop = None
    if action == Action.FORWARD:
        if "next_hop" not in rule:
            fail(None, "a forward [[route]] needs a 'next_hop' address")
        next_hop = ipv4(rule["next_hop"], lambda m: fail("next_hop", m))
    return RuleConfig(prefix, action, next_hop,
                      integer(rule.get("priority", 1), lambda m: fail("priority", m), 0, 1 << 16, "priority"),
                      integer(rule.get("weight", 1), lambda m: fail("weight", m), 1, 1 << 16, "weight"),
                      affinity_from(rule, lambda m: fail("affinity", m)))
