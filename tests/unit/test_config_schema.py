"""The shared config schema: each reader's accepted and refused values, the line each
refusal names, and the shipped configs loaded by the daemons that read them."""
import math
import re
import secrets
from pathlib import Path

import pytest

from serval import config_schema as schema
from serval.config_schema import ConfigError, Locator, Table

REPO = Path(__file__).resolve().parents[2]


class Refused(Exception):
    pass


def fail(message):
    raise Refused(message)


def refusal(reader, value, *args, **kw) -> str:
    with pytest.raises(Refused) as err:
        reader(value, fail, *args, **kw)
    return str(err.value)


# --- readers -----------------------------------------------------------------------------
def test_integer():
    assert schema.integer(0, fail, 0, 65535) == 0 and schema.integer(65535, fail, 0, 65535) == 65535
    for bad in (-1, 65536, 1.0, "80", True):
        assert refusal(schema.integer, bad, 0, 65535) == f"expected a whole number from 0 to 65535, got {bad!r}"
    assert refusal(schema.integer, 0, 1, 9, name="port") == "port: expected a whole number from 1 to 9, got 0"


def test_number():
    assert schema.number(1, fail, 0.05, 60) == 1.0 and isinstance(schema.number(1, fail, 0, 2), float)
    assert schema.number(1e12, fail, 0) == 1e12
    for bad in (0.01, 61, "fast", False):
        assert refusal(schema.number, bad, 0.05, 60) == f"expected a number from 0.05 to 60, got {bad!r}"
    assert refusal(schema.number, -1, 0, name="rate") == "rate: expected a number of 0 or more, got -1"


def test_seconds():
    assert schema.seconds(0, fail, "linger") == 0.0 and schema.seconds(2.5, fail, "idle", positive=True) == 2.5
    assert refusal(schema.seconds, 0, "idle", positive=True) == "idle must be a positive number of seconds"
    assert refusal(schema.seconds, -1, "drain") == "drain must be a number of seconds (0 or more)"
    assert refusal(schema.seconds, 601, "tw", high=600) == "tw must be a number of seconds from 0 to 600"
    for bad in ("5s", True, math.nan):
        assert "must be" in refusal(schema.seconds, bad, "idle", positive=True)


def test_boolean_and_choice():
    assert schema.boolean(False, fail, "x") is False
    assert refusal(schema.boolean, "yes", "routed") == "routed must be true or false"
    assert refusal(schema.boolean, 1, "routed") == "routed must be true or false"
    assert schema.choice("udp", fail, "carriage", ("ip", "udp")) == "udp"
    assert refusal(schema.choice, "tcp", "carriage", ("ip", "udp")) == "carriage must be \"ip\" or \"udp\", not 'tcp'"
    assert refusal(schema.choice, 17, "p", ("a", "b", "c")) == 'p must be "a", "b" or "c", not 17'
    assert refusal(schema.choice, ["ip"], "carriage", ("ip", "udp")).startswith("carriage must be")


def test_ipv4_and_networks():
    assert schema.ipv4("198.19.3.2", fail) == "198.19.3.2"
    for bad in ("198.19.3.300", "::1", "host", 5):
        assert refusal(schema.ipv4, bad) == f"not an IPv4 address: {bad!r}"
    assert schema.ipv4_network("198.18.0.0/16", fail, "network") == "198.18.0.0/16"
    assert refusal(schema.ipv4_network, "198.18.0.1/16", "network").startswith("network: 198.18.0.1/16 has host bits")
    assert schema.networks("198.19.1.7/24", fail) == ["198.19.1.0/24"]
    assert schema.networks(["::1/128", "10.0.0.0/8"], fail) == ["::1/128", "10.0.0.0/8"]
    assert refusal(schema.networks, ["198.19.1.0/33"]) == "not a network: '198.19.1.0/33'"
    assert refusal(schema.networks, 5).startswith("expected a list of networks")


def test_address_port():
    ap = schema.address_port
    assert ap("198.19.3.2:8080", fail, "backend") == ("198.19.3.2", 8080)
    host_port = """backend must be host:port, like "198.19.3.2:8080", not """
    assert refusal(ap, "198.19.3.2", "backend") == host_port + "'198.19.3.2'"
    assert refusal(ap, "198.19.3.2:http", "backend") == host_port + "'198.19.3.2:http'"
    assert refusal(ap, "198.19.3.2:0", "backend") == "port out of range in '198.19.3.2:0'"
    assert refusal(ap, "web:80", "backend") == "not an IPv4 address: 'web:80'"
    assert ap("198.19.20.1", fail, "routers", default_port=54326) == ("198.19.20.1", 54326)
    assert refusal(ap, "198.19.20.1:x", "routers", default_port=1) == "bad port in '198.19.20.1:x'"
    assert refusal(ap, "::1", "listen", default_port=53) == "not an IPv4 address: '::1'"
    v6 = dict(default_port=53, ipv6=True)
    assert ap("::1", fail, "listen", **v6) == ("::1", 53) and ap("[::1]:5353", fail, "l", **v6) == ("::1", 5353)
    assert ap("127.0.0.1:5353", fail, "listen", **v6) == ("127.0.0.1", 5353)
    assert refusal(ap, "nowhere", "listen", **v6).startswith("not an IP address: 'nowhere' (write")
    assert refusal(ap, "[::1]:70000", "listen", **v6) == "port out of range in '[::1]:70000'"


def test_listing():
    read = lambda item: schema.ipv4(item, fail)
    assert schema.listing(["198.19.3.1"], fail, read, "a list") == ["198.19.3.1"]
    assert schema.listing("198.19.3.1", fail, read, "a list", one=True) == ["198.19.3.1"]
    assert refusal(schema.listing, "198.19.3.1", read, "a list of addresses") == "a list of addresses"
    assert refusal(schema.listing, [], read, "not empty", empty=False) == "not empty"
    assert refusal(schema.listing, ["198.19.3.1"] * 2, read, "x", unique="listed twice") == "listed twice"
    assert refusal(schema.listing, ["198.19.3.1", "x"], read, "x") == "not an IPv4 address: 'x'"


# --- lines -------------------------------------------------------------------------------
TEXT = """\
top = 1
[gateway]
queue = 3
"quoted" = 4

[[service]]
name = "a"
[[service]]
name = "b"
[routing.health."ssh.svc.example"]
kind = "none"
[[zone]]
[[zone.service]]
[[zone]]
[[zone.service]]
[[zone.service]]
name = "c"
"""


def test_locator_finds_tables_keys_and_array_elements():
    loc = Locator(TEXT)
    assert loc.line("top") == 1 and loc.line("gateway") == 2 and loc.line("gateway", "queue") == 3
    assert loc.line("gateway", "quoted") == 4
    assert loc.line("gateway", "absent") == 2                       # the table, for a key not written
    assert loc.line("service", 0, "name") == 7 and loc.line("service", 1) == 8 and loc.line("service", 1, "x") == 8
    assert loc.line("routing", "health", "ssh.svc.example", "kind") == 11
    assert loc.line("zone", 1, "service", 1, "name") == 17 and loc.line("zone", 0, "service", 0) == 13
    assert loc.line("nowhere") is None and Locator("").line("gateway") is None


def test_table_names_the_line_of_the_key_at_fault():
    loc = Locator(TEXT)

    def fail_at(where, message):
        raise ConfigError("gw.toml", loc.line(*where), message)

    gw = Table({"queue": 70000, "quoted": "x", "bogus": 1}, ("gateway",), fail_at)
    with pytest.raises(ConfigError, match=r"^gw\.toml:3: queue: expected a whole number from 0 to 65535"):
        gw.int("queue", 0, 0, 65535)
    assert gw.int("other", 7, 0, 65535) == 7 and gw.str("absent") is None and gw.str("quoted") == "x"
    with pytest.raises(ConfigError, match=r"^gw\.toml:4: quoted must be true or false"):
        gw.bool("quoted", True)
    with pytest.raises(ConfigError, match=r"^gw\.toml:2: unknown key 'bogus' in \[gateway\]$"):
        gw.only({"queue", "quoted"}, " in [gateway]")
    for bad in ({}, [{"name": "a"}, 5]):
        with pytest.raises(ConfigError, match=r"^gw\.toml: write \[\[service\]\]"):
            schema.tables({"service": bad}, "service", lambda m: fail_at(("nowhere",), m))
    with pytest.raises(ConfigError, match=r"^gw\.toml:2: \[gateway\] must be a table"):
        Table(5, ("gateway",), fail_at)


def test_a_section_that_is_not_a_table_is_refused_not_a_crash(tmp_path):
    from dns_resolver.config import load as load_dns
    from gateway.config import load as load_gateway
    from router.config import load as load_router
    path = tmp_path / "x.toml"
    client, server = (lambda p: load_gateway(p, "client")), (lambda p: load_gateway(p, "server"))
    for text, loader in (("gateway = 5\n", client), ("timeouts = 5\n", server), ("service = [1]\n", server),
                         ("routing = [1]\n", server),
                         ("router = 5\n", load_router), ("server = 5\n", load_dns)):
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: "):
            loader(str(path))


def test_read_names_the_line_of_bad_toml_and_an_unreadable_file(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[a]\nb = 1\nc = \n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: not valid TOML"):
        schema.read(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        schema.read(str(tmp_path / "absent.toml"))
    path.write_text("[a]\nb = 1\n")
    data, loc = schema.read(str(path))
    assert data == {"a": {"b": 1}} and loc.line("a", "b") == 2 and schema.line_of(str(path), "a") == 1


def test_the_three_daemons_share_one_error_type():
    from dns_resolver.config import ConfigError as DnsError
    from gateway.config import ConfigError as GatewayError
    from router.config import RouterConfigError
    assert DnsError is GatewayError is RouterConfigError is ConfigError


ROUTED_SERVER = """\
[gateway]
sal_address = "198.19.30.1"
[[service]]
name = "ssh.svc.example"
port = 22
backend = "198.19.3.3:22"
[routing]
routers = ["198.19.20.1"]
key = "{key}"
[routing.health]
interval = 5
[routing.health."ssh.svc.example"]
eject_time = 60
kind = "none"
"""


@pytest.mark.parametrize("change, line, words", [
    (("interval = 5", "interval = 0"), 11, "[routing] health.interval must be a positive number of seconds"),
    (('kind = "none"', 'kind = "http"'), 14, "[routing] health.\"ssh.svc.example\".kind must be one of"),
    (('routers = ["198.19.20.1"]', 'routers = ["198.19.20.1:0"]'), 8, "[routing] port out of range"),
])
def test_gateway_routing_errors_name_the_line_in_the_subtable(tmp_path, change, line, words):
    """[routing.health] and a service's own table are found by their own header now
    (they were reported at the [routing] line)."""
    from gateway.config import load
    path = tmp_path / "server.toml"
    path.write_text(ROUTED_SERVER.format(key="ab" * 32).replace(*change))
    with pytest.raises(ConfigError) as err:
        load(str(path), "server")
    assert str(err.value).startswith(f"{path}:{line}: {words}"), str(err.value)
    path.write_text(ROUTED_SERVER.format(key="ab" * 32))
    assert load(str(path), "server").routing.health.for_service("ssh.svc.example").kind == "none"


# --- every shipped config loads ----------------------------------------------------------
def shipped() -> list[tuple[str, str]]:
    """(config, reader) for each TOML file in deploy/: the reader is named by the file
    (its role), so a new file is read by the loader it is meant for or the test fails."""
    out = []
    for path in sorted((REPO / "deploy").rglob("*.toml")):
        name = path.name
        reader = ("dns" if name in ("dns.toml", "resolver.toml") else "router" if name == "router.toml"
                  else "server" if name.startswith("server") else "client" if name.startswith("client") else "?")
        out.append((str(path.relative_to(REPO)), reader))
    return out


@pytest.mark.parametrize("name, reader", shipped())
def test_every_shipped_config_loads(name, reader, tmp_path):
    from dns_resolver.config import load as load_dns
    from gateway.config import load as load_gateway
    from router.config import load as load_router

    assert reader != "?", f"{name}: which daemon reads it? (name it client*, server*, router or dns)"
    text = (REPO / name).read_text()
    key = tmp_path / "deployment.key"              # made at deployment time: a fresh one here
    key.write_text(secrets.token_hex(32) + "\n")
    path = tmp_path / Path(name).name
    path.write_text(re.sub(r'key_file = "[^"]*"', f'key_file = "{key}"', text))
    cfg = (load_dns(str(path)) if reader == "dns" else load_router(str(path)) if reader == "router"
           else load_gateway(str(path), reader))
    assert cfg.path == str(path)


def test_the_shipped_configs_include_each_deployment():
    names = {name for name, _ in shipped()}
    assert {"deploy/client.toml", "deploy/server.toml", "deploy/router.toml", "deploy/dns.toml",
            "deploy/compose/client-gateway.toml", "deploy/compose/server-gateway-1.toml",
            "deploy/compose/router.toml", "deploy/compose/resolver.toml",
            "deploy/home-router/client.toml", "deploy/home-router/dns.toml"} <= names


def test_router_errors_name_the_line_and_the_table(tmp_path):
    """The router said only ``path: [rule 2] ...``; on the shared locator it names the line."""
    from router.config import RouterConfigError, load
    path = tmp_path / "router.toml"
    key = "[[key]]\nkey = \"" + "11" * 32 + "\"\n"
    for body, line, words in (
            ('[router]\nqueue = 70000\n', 2, "[router] queue: expected a whole number from 0 to 65535"),
            ('[router]\nqueue_bypass = "yes"\n', 2, "[router] queue_bypass must be true or false"),
            ('[router]\nnames_view = "198.19.20.1"\n', 2, "[router] names_view must be host:port"),
            ('[[rule]]\nprefix = "default"\nnext_hop = "198.19.50.1"\n[[rule]]\nservice = "x"\n'
             'next_hop = "nope"\n', 6, "[rule 2] not an IPv4 address: 'nope'"),
            ('[[service]]\nservice = "w"\naffinity = "sticky"\n', 3, "[service 1] affinity must be")):
        path.write_text(body + key)
        with pytest.raises(RouterConfigError) as err:
            load(str(path))
        assert str(err.value).startswith(f"{path}:{line}: {words}"), str(err.value)


def _paths(data, above=()):
    """Every key and list index in a loaded TOML document, as a path."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        yield above + (k,)
        yield from _paths(v, above + (k,))


@pytest.mark.parametrize("name", ["client.toml", "server.toml", "router.toml", "dns.toml"])
def test_a_wrong_value_anywhere_is_refused_never_a_crash(name):
    """Each value of a shipped config replaced, one at a time, by a value of another type
    or out of range: the loader refuses with ConfigError (or accepts), never raises
    anything else (a TypeError is a start that says nothing useful)."""
    import copy
    import random
    import tomllib

    from dns_resolver.config import parse as parse_dns
    from gateway.config import parse as parse_gateway
    from router.config import parse as parse_router
    parse = {"client.toml": lambda d: parse_gateway(d, "c.toml", "client"),
             "server.toml": lambda d: parse_gateway(d, "s.toml", "server"),
             "router.toml": lambda d: parse_router(d, "r.toml"), "dns.toml": lambda d: parse_dns(d, "d.toml")}[name]
    base = tomllib.loads((REPO / "deploy" / name).read_text())
    for table in [base, *base.get("key", [])]:           # the key itself, not a file made at deployment
        if table.pop("key_file", None) is not None:
            table["key"] = "ab" * 32
    if "routing" in base:
        base["routing"].pop("key_file", None)
        base["routing"]["key"] = "ab" * 32
    parse(copy.deepcopy(base))                           # the file as shipped loads
    wrong = [0, -1, 1.5, True, "x", "", [], ["x"], {}, {"a": 1}, 70000, "198.19.1.1:99999", [1], math.nan]
    rng = random.Random(13)
    for path in list(_paths(base)):
        for value in rng.sample(wrong, 5):
            data = copy.deepcopy(base)
            table = data
            for k in path[:-1]:
                table = table[k]
            table[path[-1]] = value
            try:
                parse(data)
            except ConfigError:
                pass
