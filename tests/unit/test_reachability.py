"""An unroutable next hop, router or backend said in words: refused at start with the
config line (a whole gateway in memory, on tests/unit/gateway_fakes.py), and failed
sends counted each time and said once a minute per address and reason."""
import errno
import textwrap
from collections import Counter

import pytest

from gateway.config import ConfigError, load
from gateway.daemon import Gateway
from gateway.reachability import SendFailures
from tests.unit import gateway_fakes as fakes

SERVER = """
[gateway]
instance = "sgw-test"
queue = 9
sal_address = "198.19.30.1"
control_socket = "{dir}/server.sock"
state_dir = "{dir}"

[[service]]
name = "web.svc.example"
port = 80
backend = "198.19.3.2:8080"

[[service]]
name = "db.svc.example"
port = 5432
backend = "10.77.0.5:5432"
"""

CLIENT = """
[gateway]
instance = "cgw-test"
queue = 7
control_socket = "{dir}/client.sock"
state_dir = "{dir}"

[[service]]
name = "web.svc.example"
address = "198.18.0.10"
port = 80

[[route]]
prefix = "default"
next_hop = "198.19.20.1"
"""


def server_net():
    return fakes.Net({"198.19.30.1": "eth0", "198.19.3.1": "back0"},
                     [("198.19.0.0/16", "198.19.30.1", "eth0"), ("198.19.3.0/24", "198.19.3.1", "back0")],
                     {"eth0", "back0"})


def start(tmp_path, template, role, net):
    path = tmp_path / "gw.toml"
    path.write_text(textwrap.dedent(template.format(dir=tmp_path)))
    reactor = fakes.Reactor()
    gw = Gateway(load(str(path), role), reactor, fakes.adapters(net, reactor))
    return gw, path


def line_number(path, text):
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_an_unroutable_backend_is_refused_at_start_with_its_line(tmp_path):
    gw, path = start(tmp_path, SERVER, "server", server_net())
    with pytest.raises(ConfigError) as err:
        gw.start()
    message = str(err.value)
    assert message.startswith(f"{path}:{line_number(path, '10.77.0.5:5432')}: ")
    assert "backend 10.77.0.5:5432 of service db.svc.example:5432 is unreachable" in message
    assert "no route" in message and "ip route get 10.77.0.5" in message
    assert gw.interception is None          # nothing installed


def test_an_unroutable_next_hop_is_refused_at_start_with_its_line(tmp_path):
    net = fakes.Net({"10.1.1.1": "eth0"}, [("10.1.0.0/16", "10.1.1.1", "eth0")], {"eth0"})
    gw, path = start(tmp_path, CLIENT, "client", net)
    with pytest.raises(ConfigError) as err:
        gw.start()
    message = str(err.value)
    assert message.startswith(f"{path}:{line_number(path, 'next_hop =')}: ")
    assert "next hop 198.19.20.1 is unreachable" in message
    assert "set sal_address" in message and "ip route get 198.19.20.1" in message
    assert gw.interception is None


def test_a_routable_config_still_starts(tmp_path):
    gw, _ = start(tmp_path, SERVER.split("[[service]]\nname = \"db")[0], "server", server_net())
    gw.start()
    gw.stop()


def test_a_reload_that_adds_an_unroutable_backend_is_refused_with_its_line(tmp_path, caplog):
    path = tmp_path / "gw.toml"
    routable = SERVER.split("[[service]]\nname = \"db")[0]
    gw, path = start(tmp_path, routable, "server", server_net())
    gw.start()
    path.write_text(textwrap.dedent(SERVER.format(dir=tmp_path)))
    with caplog.at_level("ERROR", logger="serval"):
        gw.reload()
    (record,) = [r for r in caplog.records if "reload refused" in r.getMessage()]
    message = record.getMessage()
    assert f"{path}:{line_number(path, '10.77.0.5:5432')}: " in message
    assert "backend 10.77.0.5:5432 of service db.svc.example:5432 is unreachable" in message
    assert [s.name for s in gw.cfg.services] == ["web.svc.example"]      # the running config stays
    gw.stop()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_failed_sends_are_counted_each_time_and_said_once_a_minute():
    stats, clock = Counter(), Clock()
    said = SendFailures(stats, {"10.77.0.5": "backend 10.77.0.5:5432 of service db:5432"}.get, clock)
    first = said.failed("10.77.0.5", errno.ENETUNREACH)
    assert first.startswith("cannot send to the backend 10.77.0.5:5432 of service db:5432: "
                            "this host has no route to it (ENETUNREACH)")
    assert "ip route get 10.77.0.5" in first
    clock.now += 30
    assert said.failed("10.77.0.5", errno.ENETUNREACH) is None
    assert said.failed("10.77.0.5", errno.EHOSTUNREACH) is not None   # another reason
    assert said.failed("198.19.9.9", errno.ENETUNREACH).startswith("cannot send to the address 198.19.9.9")
    clock.now += 31
    assert said.failed("10.77.0.5", errno.ENETUNREACH) is not None
    assert stats == {"inject_failed_enetunreach": 4, "inject_failed_ehostunreach": 1}


def test_a_firewall_refusal_says_to_look_at_the_rules():
    line = SendFailures(Counter()).line("198.19.3.2", errno.EPERM)
    assert "a firewall rule on this host refuses packets to it (EPERM)" in line
    assert "iptables-save" in line
