"""``kind = "dns"`` in a server gateway's [routing.health] (or a service's own table):
a UDP service on any port is checked with real DNS queries; ``"none"`` keeps one on
port 53 passive; a "dns" that would check no UDP service is refused at start with the
file and line."""
import pytest

from gateway.config import ConfigError, load
from gateway.health import kind_for
from tests.unit.test_udp_health import DNS, SYSLOG, answer, probes, start, state


@pytest.mark.parametrize("configured, protocol, ports, kind", [
    ("dns", "udp", [5353, 5300], "dns"),      # said so: any port
    ("none", "udp", [53, 53], "none"),        # passive, though on DNS's port
    ("tcp", "udp", [53, 5300], "dns"),        # the default: port 53 decides
    ("tcp", "udp", [514, 514], "none"),
    ("dns", "tcp", [53, 53], "tcp"),          # the TCP service of the name keeps its connect
])
def test_the_configured_kind_decides_for_a_udp_service(configured, protocol, ports, kind):
    assert kind_for(configured, protocol, ports) == kind


def test_a_services_own_kind_dns_probes_a_udp_service_on_any_port(tmp_path):
    gw, reactor = start(tmp_path, extra='[routing.health."syslog.svc.example"]\nkind = "dns"\n')
    try:
        checks = gw.routing.checks
        assert (checks[DNS].kind, checks[SYSLOG].kind) == ("dns", "dns")
        assert state(gw, "syslog.svc.example:514/udp") == "checking"         # not offered before an answer
        for _ in range(3):
            reactor.advance(0.01)
        to_syslog = [(p, q) for p, q in probes(reactor) if p.peer == ("198.19.3.2", 514)]
        assert len(to_syslog) == 1
        answer(*to_syslog[0])
        assert checks[SYSLOG].state == "up" and state(gw, "syslog.svc.example:514/udp") == "registered"
    finally:
        gw.stop()


def test_kind_none_keeps_a_dns_service_passive(tmp_path):
    gw, reactor = start(tmp_path, extra='[routing.health."dns.svc.example"]\nkind = "none"\n')
    try:
        assert gw.routing.checks[DNS].kind == "none"
        reactor.advance(0.05)
        assert not [p for p, _ in probes(reactor) if p.peer == ("198.19.3.2", 5300)]
        assert state(gw, "dns.svc.example:53/udp") == "registered"          # offered at once
    finally:
        gw.stop()


SERVER = """[gateway]
sal_address = "198.19.2.2"

[[service]]
name = "web.svc.example"
port = 80
backend = "198.19.3.2:8080"

[[service]]
name = "dns.svc.example"
port = 5353
protocol = "udp"
backend = "198.19.3.2:5300"

[routing]
routers = ["198.19.20.1"]
key = "{key}"
[routing.health]
interval = 1
"""


TCP_ONLY = SERVER.replace('[[service]]\nname = "dns.svc.example"\nport = 5353\nprotocol = "udp"\n'
                          'backend = "198.19.3.2:5300"\n\n', "")


@pytest.mark.parametrize("text, line, words", [
    (SERVER + '[routing.health."web.svc.example"]\nkind = "dns"\n', 21,
     'health."web.svc.example".kind = "dns" probes a UDP service with DNS queries, and web.svc.example has no'),
    (TCP_ONLY + 'kind = "dns"\n', 14,
     'health.kind = "dns" probes UDP services with DNS queries, and no [[service]] here has protocol = "udp"'),
    (SERVER + '[routing.health."dns.svc.example"]\nkind = "passive"\n', 21, "kind must be one of 'tcp', 'dns', 'none'"),
])
def test_a_kind_that_does_not_fit_is_refused_with_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "server.toml"
    path.write_text(text.format(key="ab" * 32))
    with pytest.raises(ConfigError) as info:
        load(str(path), "server")
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    assert words in str(info.value)


def test_kind_dns_for_the_udp_service_of_a_name_is_accepted(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text((SERVER + '[routing.health."dns.svc.example"]\nkind = "dns"\n').format(key="ab" * 32))
    cfg = load(str(path), "server")
    assert cfg.routing.health.for_service("dns.svc.example").kind == "dns"
    assert cfg.routing.health.for_service("web.svc.example").kind == "tcp"
