"""UDP services by name: the resolver's ``udp_ports`` reach the client gateway in the
mappings file, and a datagram to a name's virtual address:port opens a UDP flow with
no ``[[service]]`` entry in the gateway's config."""
import json
import socket

import pytest

from dns_resolver.allocator import Allocator
from dns_resolver.config import ConfigError, load as load_dns
from dns_resolver.store import MappingsFile
from gateway.config import load as load_gateway
from gateway.daemon import build_translator, virtual_services
from gateway.virtual_map import VirtualMap, udp_service_id_for
from sal import icmp, wire
from sal.ip import IPv4, aton
from sal.serviceid import service_id_for
from tests.unit.test_udp_flows import CLIENT, udp_packet

NOW = 1_700_000_000.0
DNS_TOML = """
[[zone]]
name = "svc.example"

[[zone.service]]
name = "dns"
udp_ports = [53, 5353]

[[service]]
name = "tftp.svc.example"
udp_ports = 69

[[service]]
name = "web.svc.example"
ports = [80]
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- the resolver's config ------------------------------------------------------------

def test_udp_ports_in_the_resolver_config(tmp_path):
    cfg = load_dns(write(tmp_path, "dns.toml", DNS_TOML))
    by_name = {s.name: s for s in cfg.services}
    assert by_name["dns.svc.example"].udp_ports == (53, 5353)
    assert by_name["tftp.svc.example"].udp_ports == (69,)
    assert by_name["web.svc.example"].udp_ports == ()          # TCP only, as before


@pytest.mark.parametrize("value, message", [
    ("[0]", "from 1 to 65535"),
    ("[53, 70000]", "from 1 to 65535"),
    ('"53"', "udp_ports must be a list of port numbers"),
    ("[53, 53]", "listed twice in udp_ports"),
    ("true", "udp_ports must be a list of port numbers"),
])
def test_bad_udp_ports_are_refused_with_file_and_line(tmp_path, value, message):
    path = write(tmp_path, "dns.toml", f'[[zone]]\nname = "svc.example"\n\n[[zone.service]]\nname = "dns"\n'
                                       f"udp_ports = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_dns(path)
    assert str(info.value).startswith(f"{path}:6: "), str(info.value)
    assert message in str(info.value)


# --- the mappings file ----------------------------------------------------------------

def test_the_mappings_file_carries_the_udp_ports(tmp_path):
    path = tmp_path / "mappings.json"
    a = Allocator(store=MappingsFile(str(path)), udp_ports={"dns.svc.example": (53,), "web.svc.example": ()})
    dns, web = a.allocate("dns.svc.example", NOW), a.allocate("web.svc.example", NOW)
    records = {r["name"]: r for r in json.loads(path.read_text())["mappings"]}
    assert records["dns.svc.example"]["udp_ports"] == [53] and records["dns.svc.example"]["address"] == dns.address
    assert "udp_ports" not in records["web.svc.example"] and records["web.svc.example"]["address"] == web.address


def test_a_stored_mapping_follows_the_configs_udp_ports_at_load(tmp_path):
    """The config changed between two runs of the resolver: the file says so at once
    (same address), not only at the next allocation."""
    path = tmp_path / "mappings.json"
    first = Allocator(store=MappingsFile(str(path)))
    address = first.allocate("dns.svc.example", NOW).address
    assert "udp_ports" not in json.loads(path.read_text())["mappings"][0]
    again = Allocator(store=MappingsFile(str(path)), udp_ports={"dns.svc.example": (53,)})
    assert again.load(NOW + 10) == 1
    (rec,) = json.loads(path.read_text())["mappings"]
    assert (rec["address"], rec["udp_ports"]) == (address, [53])
    dropped = Allocator(store=MappingsFile(str(path)))              # udp_ports removed again
    dropped.load(NOW + 20)
    assert "udp_ports" not in json.loads(path.read_text())["mappings"][0]


# --- the client gateway's map ---------------------------------------------------------

def test_the_gateway_carries_udp_only_to_a_mappings_udp_ports(tmp_path):
    path = tmp_path / "mappings.json"
    a = Allocator(store=MappingsFile(str(path)), udp_ports={"dns.svc.example": (53,)})
    dns = socket.inet_aton(a.allocate("dns.svc.example", NOW).address)
    web = socket.inet_aton(a.allocate("web.svc.example", NOW).address)
    vmap = VirtualMap({}, str(path))
    assert vmap.udp(dns, 53) == udp_service_id_for("dns.svc.example", 53)
    assert vmap.udp(dns, 53) != service_id_for("dns.svc.example", 53)          # the UDP one
    assert vmap.udp(dns, 54) is None and vmap.udp(web, 53) is None
    assert vmap(dns, 53) == service_id_for("dns.svc.example", 53)              # TCP: every port
    assert vmap(web, 8080) == service_id_for("web.svc.example", 8080)


def test_the_udp_id_by_name_is_the_configs(tmp_path):
    """What a ``protocol = "udp"`` [[service]] gets (and so what the server gateway and
    the routers know the service by) is what a mapping gives."""
    cfg = load_gateway(write(tmp_path, "client.toml", """
[gateway]
[[service]]
name = "dns.svc.example"
address = "198.18.0.53"
port = 53
protocol = "udp"
[[route]]
prefix = "default"
next_hop = "198.19.2.2"
"""), "client")
    assert cfg.services[0].service_id == udp_service_id_for("dns.svc.example", 53)
    tcp, udp = virtual_services(cfg)
    assert tcp == {} and udp == {(aton("198.18.0.53"), 53): cfg.services[0].service_id}


def test_bad_udp_ports_in_the_file_keep_the_last_good_map(tmp_path):
    path = tmp_path / "mappings.json"
    addr = socket.inet_aton("198.18.0.11")
    path.write_text(json.dumps({"mappings": [{"address": "198.18.0.11", "name": "dns.svc.example",
                                              "udp_ports": [53]}]}))
    vmap = VirtualMap({}, str(path), clock=lambda: 0.0)
    path.write_text(json.dumps({"mappings": [{"address": "198.18.0.11", "name": "dns.svc.example",
                                              "udp_ports": ["53"]}]}))
    assert not vmap.reload()
    assert vmap.udp(addr, 53) == udp_service_id_for("dns.svc.example", 53)


def test_a_datagram_to_a_name_opens_a_udp_flow_with_a_mapping_alone(tmp_path):
    """The client gateway's config has no [[service]]: only the mappings file and a route."""
    mappings = tmp_path / "mappings.json"
    a = Allocator(store=MappingsFile(str(mappings)), udp_ports={"dns.svc.example": (53,)})
    vip = a.allocate("dns.svc.example", NOW).address
    cfg = load_gateway(write(tmp_path, "client.toml", f"""
[gateway]
sal_address = "198.19.2.1"
mappings = "{mappings}"
[[route]]
prefix = "default"
next_hop = "198.19.2.2"
"""), "client")
    client = build_translator(cfg, lambda host: ("198.19.2.1", "sal0"), {"sal0": 1500})
    assert client.from_legacy_udp(udp_packet(CLIENT, 40000, vip, 53, b"query"), 0.0) is None
    (syn,) = client.outbox
    ip = IPv4(syn)
    hdr, _ = wire.decode(syn, ip.ihl)
    assert hdr.protocol == 17 and hdr.service.service_id == udp_service_id_for("dns.svc.example", 53)
    client.outbox.clear()
    # another port of the name: refused at once (ICMP port unreachable), no flow
    assert client.from_legacy_udp(udp_packet(CLIENT, 40001, vip, 54, b"query"), 0.0) is None
    (refusal,) = client.outbox
    ip = IPv4(refusal)
    assert ip.protocol == 1 and refusal[ip.ihl] == icmp.DEST_UNREACH and refusal[ip.ihl + 1] == icmp.PORT_UNREACH
    assert len(client.flows) == 1 and client.stats["dropped_udp_not_carried"] == 1


def test_a_reload_keeps_tcp_and_udp_services_apart(tmp_path):
    """SIGHUP: a UDP [[service]] added to the config is carried over UDP (and only UDP)."""
    from gateway.daemon import Gateway
    from tests.unit import gateway_fakes as fakes
    path = tmp_path / "client.toml"
    base = f"""[gateway]
sal_address = "198.19.2.1"
control_socket = "{tmp_path}/client.sock"
state_dir = "{tmp_path}"

[[service]]
name = "web.svc.example"
address = "198.18.0.10"
port = 80

[[route]]
prefix = "default"
next_hop = "198.19.2.2"
"""
    path.write_text(base)
    reactor = fakes.Reactor()
    net = fakes.Net({"198.19.2.1": "eth0"}, [("198.19.2.0/24", "198.19.2.1", "eth0")], {"eth0"})
    gw = Gateway(load_gateway(str(path), "client"), reactor, fakes.adapters(net, reactor))
    gw.start()
    try:
        t = gw.translator
        assert t.resolve_udp(aton("198.18.0.53"), 53) is None
        path.write_text(base + '\n[[service]]\nname = "dns.svc.example"\naddress = "198.18.0.53"\nport = 53\n'
                               'protocol = "udp"\n')
        gw.reload()
        assert t.resolve_udp(aton("198.18.0.53"), 53) == udp_service_id_for("dns.svc.example", 53)
        assert t.resolve(aton("198.18.0.53"), 53) is None               # not a TCP service
        assert t.resolve(aton("198.18.0.10"), 80) == service_id_for("web.svc.example", 80)
    finally:
        gw.stop()
