"""Gateway configuration: a TOML file, checked completely before anything starts.

Every mistake is reported as ``ConfigError`` naming the file and the line at fault, so
a bad config is refused at start instead of half-applied.
"""
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field

from sal.affinity import from_config as affinity_from
from sal.serviceid import ServiceIDError, ServicePrefix, parse_service_id, service_id_for
from sal.service_table import Action
from serval.metrics import parse_config as parse_metrics

from .routing_config import parse as parse_routing
from .translate.base import Timeouts
from .translate.limits import Limits

DEFAULT_VIRTUAL_NETWORK = "198.18.0.0/16"


class ConfigError(ValueError):
    def __init__(self, path: str, line: int | None, message: str):
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


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
    control_queue: int = 0             # SAL control packets and SYNs (default: queue + 1000)
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
    # past this host's routing and netfilter (no NAT or filter rules apply to them)
    fast_path_redirect: bool = False


_GATEWAY_KEYS = {
    "instance", "queue", "carriage", "sal_address", "virtual_network", "intercept_local",
    "intercept_forwarded", "client_address", "port_range", "mtu", "queue_bypass",
    "control_socket", "state_dir", "log_level", "mappings", "control_queue", "drain_timeout",
    "resume_window", "fast_path", "bpffs", "fast_path_redirect",
}
_GATEWAY_KEYS |= {"metrics", "metrics_public"}     # "host:port" (loopback unless metrics_public)
_GATEWAY_KEYS |= {"source_addresses", "backend_time_wait", "accept_broadcast_syn"}   # server gateway


class _Locator:
    """Finds the line of a key in the raw text, for error messages."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def line(self, table: str, index: int | None, key: str | None) -> int | None:
        header = re.compile(r"^\s*\[\[\s*%s\s*\]\]" % re.escape(table) if index is not None
                            else r"^\s*\[\s*%s\s*\]" % re.escape(table))
        seen, start = -1, None
        for n, text in enumerate(self.lines, 1):
            if header.match(text):
                seen += 1
                if index is None or seen == index:
                    start = n
                    break
        if start is None:
            return None
        if key is None:
            return start
        keyre = re.compile(r"^\s*%s\s*=" % re.escape(key))
        for n in range(start + 1, len(self.lines) + 1):
            text = self.lines[n - 1]
            if text.lstrip().startswith("["):
                break
            if keyre.match(text):
                return n
        return start


def line_of(path: str, table: str, key: str | None = None, index: int | None = None) -> int | None:
    """The line of ``key`` in ``[table]`` of the file at ``path``, for a check made
    after loading (against this host's links, say); None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _Locator(f.read()).line(table, index, key)
    except OSError:
        return None


def load(path: str, role: str) -> GatewayConfig:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    text = raw.decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(path, int(m.group(1)) if m else None, f"not valid TOML: {exc}") from None
    return parse(data, path, role, _Locator(text))


def parse(data: dict, path: str, role: str, loc: _Locator | None = None) -> GatewayConfig:
    loc = loc or _Locator("")

    def fail(table, index, key, message):
        raise ConfigError(path, loc.line(table, index, key), message)

    unknown = set(data) - {"gateway", "timeouts", "service", "route", "routing", "mobility", "limits"}
    if unknown:
        fail(sorted(unknown)[0], None, None, f"unknown section [{sorted(unknown)[0]}]")
    gw = data.get("gateway", {})
    for key in gw:
        if key not in _GATEWAY_KEYS:
            fail("gateway", None, key, f"unknown key {key!r} in [gateway]")
    cfg = GatewayConfig(role=role, path=path, instance=str(gw.get("instance", role)),
                        queue=_int(gw.get("queue", 0 if role == "client" else 1), 0, 65535,
                                   lambda m: fail("gateway", None, "queue", m)))
    cfg.control_queue = _int(gw.get("control_queue", (cfg.queue + 1000) % 65536), 0, 65535,
                             lambda m: fail("gateway", None, "control_queue", m))
    if cfg.control_queue == cfg.queue:
        fail("gateway", None, "control_queue", "control_queue must differ from queue")
    cfg.carriage = gw.get("carriage", "ip")
    if cfg.carriage not in ("ip", "udp"):
        fail("gateway", None, "carriage", f"carriage must be 'ip' or 'udp', not {cfg.carriage!r}")
    if "sal_address" in gw:
        cfg.sal_address = _ipv4(gw["sal_address"], lambda m: fail("gateway", None, "sal_address", m))
    try:
        cfg.virtual_network = str(ipaddress.IPv4Network(gw.get("virtual_network", DEFAULT_VIRTUAL_NETWORK)))
    except ValueError as exc:
        fail("gateway", None, "virtual_network", f"virtual_network: {exc}")
    for key in ("intercept_local", "intercept_forwarded", "queue_bypass", "fast_path_redirect"):
        if key in gw:
            if not isinstance(gw[key], bool):
                fail("gateway", None, key, f"{key} must be true or false")
            setattr(cfg, key, gw[key])
    cfg.client_address = gw.get("client_address", "gateway")
    if cfg.client_address not in ("gateway", "peer"):
        fail("gateway", None, "client_address", "client_address must be 'gateway' or 'peer'")
    if "port_range" in gw:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", str(gw["port_range"]))
        if not m or not 1024 <= int(m.group(1)) <= int(m.group(2)) <= 65535:
            fail("gateway", None, "port_range", "port_range must look like '1024-32767' (1024..65535)")
        cfg.port_range = (int(m.group(1)), int(m.group(2)))
    _server_keys(cfg, gw, lambda key, message: fail("gateway", None, key, message))
    cfg.mtu = gw.get("mtu", "auto")
    if cfg.mtu != "auto":
        cfg.mtu = _int(cfg.mtu, 576, 65535, lambda m: fail("gateway", None, "mtu", f"mtu: 'auto' or {m}"))
    cfg.control_socket = str(gw.get("control_socket", f"/run/serval/{cfg.instance}.sock"))
    cfg.state_dir = str(gw.get("state_dir", "/run/serval"))
    for key in ("drain_timeout", "resume_window"):
        if key in gw:
            if not isinstance(gw[key], (int, float)) or isinstance(gw[key], bool) or gw[key] < 0:
                fail("gateway", None, key, f"{key} must be a number of seconds (0 or more)")
            setattr(cfg, key, float(gw[key]))
    if "mappings" in gw:
        cfg.mappings = str(gw["mappings"])
    cfg.fast_path = gw.get("fast_path", "auto")
    if cfg.fast_path not in ("auto", "on", "off"):
        fail("gateway", None, "fast_path", f"fast_path must be 'auto', 'on' or 'off', not {cfg.fast_path!r}")
    cfg.bpffs = str(gw.get("bpffs", "/sys/fs/bpf"))
    cfg.log_level = str(gw.get("log_level", "info")).lower()
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        fail("gateway", None, "log_level", "log_level must be debug, info, warning or error")
    cfg.metrics = parse_metrics(gw, lambda key, message: fail("gateway", None, key, message))
    timeouts = data.get("timeouts", {})
    for key, value in timeouts.items():
        if not hasattr(cfg.timeouts, key):
            fail("timeouts", None, key,
                 f"unknown timeout {key!r} (idle, handshake, linger, reset_linger, keepalive, udp_idle)")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
                or (value == 0 and key != "keepalive"):
            fail("timeouts", None, key, f"timeout {key} must be a positive number of seconds"
                 + (" (0: off)" if key == "keepalive" else ""))
        setattr(cfg.timeouts, key, float(value))
    seen, protocols = {}, {}
    for i, svc in enumerate(_table_list(data, "service", fail)):
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
    for i, rule in enumerate(_table_list(data, "route", fail)):
        cfg.rules.append(_rule(rule, cfg.services, lambda k, m, i=i: fail("route", i, k, m)))
    # a client gets a default rule to each of its routers
    if role == "server":
        # a server gateway sees a whole client gateway (many legacy hosts) as one source
        cfg.limits.max_flows_per_source = 65_536
    for key, value in data.get("limits", {}).items():
        if not hasattr(cfg.limits, key):
            fail("limits", None, key, f"unknown limit {key!r} ({', '.join(vars(Limits()))})")
        setattr(cfg.limits, key, _int(value, 1, 1 << 24, lambda m: fail("limits", None, key, f"{key}: {m}")))
    mobility = data.get("mobility", {})
    for key, value in mobility.items():
        if key != "return_to_preferred":
            fail("mobility", None, key, f"unknown key {key!r} in [mobility] (return_to_preferred)")
        if not isinstance(value, bool):
            fail("mobility", None, key, "return_to_preferred must be true or false")
        cfg.return_to_preferred = value
    cfg.routing = parse_routing(data.get("routing"), cfg, lambda k, m: fail("routing", None, k, m))
    if not cfg.services and not (role == "client" and cfg.mappings):
        fail("gateway", None, None, "no [[service]] configured (nor a resolver 'mappings' file): "
             "the gateway would have nothing to do")
    if role == "client" and not cfg.rules:
        fail("gateway", None, None, "no [[route]] configured: a client gateway needs a next hop")
    return cfg


def _server_keys(cfg: GatewayConfig, gw: dict, fail) -> None:
    """A server gateway's source addresses toward backends, their TIME_WAIT, broadcast SYNs."""
    if "source_addresses" in gw:
        given = gw["source_addresses"]
        if cfg.role != "server":
            fail("source_addresses", "source_addresses is for a server gateway (its addresses toward backends)")
        if not isinstance(given, list) or not given:
            fail("source_addresses", "source_addresses is a list of our IPv4 addresses facing the backends")
        cfg.source_addresses = [_ipv4(a, lambda m: fail("source_addresses", m)) for a in given]
        if len(set(cfg.source_addresses)) != len(cfg.source_addresses):
            fail("source_addresses", "an address is listed twice in source_addresses")
    if "backend_time_wait" in gw:
        value = gw["backend_time_wait"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 600:
            fail("backend_time_wait", "backend_time_wait is the backends' TIME_WAIT in seconds (0 to 600)")
        cfg.backend_time_wait = float(value)
    if "accept_broadcast_syn" in gw:
        if not isinstance(gw["accept_broadcast_syn"], bool):
            fail("accept_broadcast_syn", "accept_broadcast_syn must be true or false")
        cfg.accept_broadcast_syn = gw["accept_broadcast_syn"]


def _table_list(data, name, fail):
    items = data.get(name, [])
    if not isinstance(items, list):
        fail(name, None, None, f"write [[{name}]] (an array of tables), not [{name}]")
    return items


def _service(svc: dict, role: str, fail) -> ServiceConfig:
    allowed = {"name", "port", "service_id", "address", "backend", "weight", "priority", "protocol"}
    for key in svc:
        if key not in allowed:
            fail(key, f"unknown key {key!r} in [[service]]")
    name = svc.get("name")
    if not isinstance(name, str) or not name:
        fail("name", "every [[service]] needs a name")
    port = _int(svc.get("port", 0), 0, 65535, lambda m: fail("port", m))
    try:
        given = svc.get("service_id")
        if isinstance(given, bool) or not isinstance(given, (str, int, type(None))):
            fail("service_id", "service_id is a string (64 hex digits or name:port) or a number")
        # a bare TOML integer is the reference's small-decimal form (16385)
        sid = parse_service_id(str(given)) if given is not None else service_id_for(name, port)
    except ServiceIDError as exc:
        fail("service_id", str(exc))
    out = ServiceConfig(name, port, sid, weight=_int(svc.get("weight", 1), 1, 1 << 16, lambda m: fail("weight", m)),
                        priority=_int(svc.get("priority", 1), 0, 1 << 16, lambda m: fail("priority", m)))
    out.protocol = svc.get("protocol", "tcp")
    if out.protocol not in ("tcp", "udp"):
        fail("protocol", f"service {name}: protocol must be \"tcp\" or \"udp\", not {out.protocol!r}")
    if out.protocol == "udp" and given is None:
        # one name:port may be both (DNS): the derived UDP ID differs from the TCP one in
        # the word before the port (the protocol), under the same name prefix (routes)
        out.service_id = sid[:28] + (17).to_bytes(2, "big") + sid[30:]
    if role == "client":
        if "address" not in svc:
            fail(None, f"service {name}: a client gateway needs its virtual 'address'")
        out.address = _ipv4(svc["address"], lambda m: fail("address", m))
        if port == 0:
            fail("port", f"service {name}: a client gateway needs the service 'port'")
    else:
        if "backend" not in svc:
            fail(None, f"service {name}: a server gateway needs its 'backend' (host:port)")
        host, _, bport = str(svc["backend"]).rpartition(":")
        if not bport.isdigit() or not 0 < int(bport) < 65536:
            fail("backend", f"backend must be host:port, not {svc['backend']!r}")
        out.backend = (_ipv4(host, lambda m: fail("backend", m)), int(bport))
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
        next_hop = _ipv4(rule["next_hop"], lambda m: fail("next_hop", m))
    return RuleConfig(prefix, action, next_hop,
                      _int(rule.get("priority", 1), 0, 1 << 16, lambda m: fail("priority", m)),
                      _int(rule.get("weight", 1), 1, 1 << 16, lambda m: fail("weight", m)),
                      affinity_from(rule, lambda m: fail("affinity", m)))


def _int(value, low, high, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        fail(f"expected a whole number from {low} to {high}, got {value!r}")
    return value


def _ipv4(value, fail) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        fail(f"not an IPv4 address: {value!r}")
