"""Gateway config: good files load, bad ones are refused naming the line at fault."""
import json
import socket
import textwrap

import pytest

from gateway.config import ConfigError, load
from gateway.virtual_map import VirtualMap
from sal.serviceid import service_id_for

CLIENT = """
[gateway]
queue = 3
carriage = "udp"

[[service]]
name = "web.svc.example"
address = "198.18.0.10"
port = 80

[[route]]
service = "web.svc.example"
next_hop = "198.19.2.2"
weight = 2
"""


def write(tmp_path, text, name="gw.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_client_config_loads(tmp_path):
    cfg = load(write(tmp_path, CLIENT), "client")
    assert (cfg.queue, cfg.carriage) == (3, "udp")
    assert (cfg.control_queue, cfg.new_flow_queue) == (1003, 2003)     # the defaults follow queue
    (svc,) = cfg.services
    assert svc.service_id == service_id_for("web.svc.example", 80)
    (rule,) = cfg.rules
    assert rule.prefix.bits == 224 and rule.weight == 2 and rule.next_hop == "198.19.2.2"


@pytest.mark.parametrize("text, role, line, words", [
    ("[gateway]\nqueue = \n", "client", 2, "not valid TOML"),
    (CLIENT.replace("queue = 3", "queue = 3\nqeueu = 4"), "client", 4, "unknown key 'qeueu'"),
    (CLIENT.replace('address = "198.18.0.10"', 'address = "198.18.0.300"'), "client", 8, "not an IPv4 address"),
    (CLIENT.replace('service = "web.svc.example"\nnext_hop', 'service = "nope"\nnext_hop'), "client", 12, "no [[service]] named 'nope'"),
    (CLIENT.replace('carriage = "udp"', 'carriage = "tcp"'), "client", 4, "carriage must be"),
    ('[[service]]\nname = "web"\nport = 80\nbackend = "198.19.3.2"\n', "server", 4, "backend must be host:port"),
    ('[[service]]\nname = "web"\nport = 80\n', "server", 1, "needs its 'backend'"),
    ("[gateway]\nqueue = 1\n", "server", 1, "no [[service]] configured"),
    ("[timeouts]\nidle = -1\n", "server", 2, "positive number"),
    (CLIENT.replace("queue = 3", "queue = 3\nnew_flow_queue = 3"), "client", 4, "new_flow_queue must differ"),
    (CLIENT.replace("queue = 3", "queue = 3\ncontrol_queue = 7\nnew_flow_queue = 7"), "client", 5,
     "new_flow_queue must differ"),
])
def test_bad_config_names_the_line(tmp_path, text, role, line, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path, role)
    assert f"{path}:{line}:" in str(err.value) and words in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "absent.toml"), "client")


def test_default_route_and_mappings_file_only(tmp_path):
    cfg = load(write(tmp_path, """
        [gateway]
        mappings = "/run/serval/mappings.json"
        [[route]]
        prefix = "default"
        next_hop = "198.19.2.2"
        """), "client")
    assert cfg.services == [] and cfg.rules[0].prefix.bits == 0


def test_virtual_map_follows_the_mappings_file(tmp_path):
    path = tmp_path / "mappings.json"
    fixed = {(socket.inet_aton("198.18.0.10"), 80): b"\1" * 32}
    vmap = VirtualMap(fixed, str(path))
    addr = socket.inet_aton("198.18.0.11")
    assert vmap(socket.inet_aton("198.18.0.10"), 80) == b"\1" * 32
    assert vmap(addr, 80) is None                       # no file yet
    path.write_text(json.dumps({"version": 1, "mappings": [{"address": "198.18.0.11", "name": "db.svc.example"}]}))
    assert vmap(addr, 5432) == service_id_for("db.svc.example", 5432)
    assert vmap(addr, 80) == service_id_for("db.svc.example", 80)
    path.write_text("{broken")                          # a bad write keeps the last good map
    assert vmap(socket.inet_aton("198.18.0.12"), 80) is None
    assert vmap(addr, 80) == service_id_for("db.svc.example", 80)


def test_virtual_map_sees_a_reassigned_address_within_a_second(tmp_path):
    path = tmp_path / "mappings.json"
    addr = socket.inet_aton("198.18.0.11")
    now = [0.0]
    path.write_text(json.dumps({"version": 1, "mappings": [{"address": "198.18.0.11", "name": "old.svc.example"}]}))
    vmap = VirtualMap({}, str(path), clock=lambda: now[0])
    assert vmap(addr, 80) == service_id_for("old.svc.example", 80)
    path.write_text(json.dumps({"version": 1, "mappings": [{"address": "198.18.0.11", "name": "new.svc.example"},
                                                           {"address": "198.18.0.12", "name": "x.svc.example"}]}))
    now[0] = 0.5                                        # known address: no look at the file yet
    assert vmap(addr, 80) == service_id_for("old.svc.example", 80)
    now[0] = 1.6
    assert vmap(addr, 80) == service_id_for("new.svc.example", 80)


def test_limits_section(tmp_path):
    cfg = load(write(tmp_path, CLIENT + "\n[limits]\nmax_half_open = 50\n"), "client")
    assert cfg.limits.max_half_open == 50 and cfg.limits.max_flows == 262_144
    with pytest.raises(ConfigError, match="unknown limit"):
        load(write(tmp_path, CLIENT + "\n[limits]\nmax_cats = 5\n"), "client")


def test_a_service_id_written_as_a_toml_integer_is_the_reference_decimal_form(tmp_path):
    from gateway.config import ConfigError, load
    path = tmp_path / "server.toml"
    path.write_text('[gateway]\n[[service]]\nname = "echo"\nport = 7\nservice_id = 16385\nbackend = "198.19.3.2:7"\n')
    cfg = load(str(path), "server")
    assert cfg.services[0].service_id == (16385).to_bytes(4, "big") + bytes(28)
    path.write_text('[gateway]\n[[service]]\nname = "echo"\nport = 7\nservice_id = 1.5\nbackend = "198.19.3.2:7"\n')
    with pytest.raises(ConfigError, match=r"server.toml:5: service_id"):
        load(str(path), "server")


def test_ctl_drain_cancel_takes_the_service_after_the_flag():
    from serval.cli import main
    for argv in (["ctl", "drain", "--cancel", "web.svc.example"], ["ctl", "drain", "web.svc.example", "--cancel"]):
        assert main(argv + ["--socket", "/nonexistent/x.sock"]) == 2     # parsed; the socket is absent
    with pytest.raises(SystemExit):
        main(["ctl", "stats", "one", "two", "--socket", "/nonexistent/x.sock"])


@pytest.mark.parametrize("role,body,where,says", [
    ("client", '[[service]]\nname = "a"\naddress = "198.18.0.1"\nport = 80\n'
               '[[service]]\nname = "b"\naddress = "198.18.0.1"\nport = 80\n', 7, "configured twice"),
    ("client", '[[service]]\nname = "a"\naddress = "10.9.9.9"\nport = 80\n', 5, "outside virtual_network"),
    ("server", '[[service]]\nname = "a"\nport = 80\nbackend = "198.19.3.2:8080"\n'
               '[[service]]\nname = "a"\nport = 80\nbackend = "198.19.3.2:8080"\n', 7, "configured twice"),
])
def test_ambiguous_or_unreachable_services_are_refused_with_the_line(tmp_path, role, body, where, says):
    path = tmp_path / f"{role}.toml"
    route = '[[route]]\nprefix = "default"\nnext_hop = "198.19.2.2"\n' if role == "client" else ""
    path.write_text("[gateway]\n\n" + body + route)
    with pytest.raises(ConfigError, match=rf"{role}.toml:{where}: .*{says}"):
        load(str(path), role)
