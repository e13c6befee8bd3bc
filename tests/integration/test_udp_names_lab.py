"""A UDP service by name, for real: the resolver's mapping alone carries it.

    client --- cgw [serval dns 198.19.1.1, client gateway] === sgw --- server (dnsmasq :5300)

The resolver's config says ``udp_ports = [53]`` for dns.svc.example; the client gateway
has no ``[[service]]`` at all, only the mappings file and a default route. An unmodified
``dig @dns.svc.example`` on the client resolves the server's name through our resolver
(glibc, /etc/resolv.conf) and sends its queries over UDP to the virtual address: every
one answered by dnsmasq behind the server gateway. Another port of the name is not
carried: refused at once.
"""
import json
import shutil

import pytest

from dns_resolver.lab import MappedGateways, RunningResolver, dig, resolver_config
from lab.topologies import gateway_pair
from tests.integration.test_udp_flows_lab import ANSWER, DNS_PORT, start_dns

RESOLVER = "198.19.1.1"
NAME = "dns.svc.example"
QUERIES = 50

pytestmark = pytest.mark.skipif(not (shutil.which("dnsmasq") and shutil.which("dig")),
                                reason="needs dnsmasq and dig")


@pytest.fixture
def by_name(lab, tmp_path):
    pair = gateway_pair(lab)
    mappings = str(tmp_path / "mappings.json")
    config = resolver_config(listen=[RESOLVER], allow=["198.19.1.0/24"], zones={"svc.example": []},
                             upstreams=[], mappings=mappings,
                             extra=f'\n[[service]]\nname = "{NAME}"\nudp_ports = [53]\n')
    resolver = RunningResolver(pair.cgw, config, str(tmp_path)).start()
    start_dns(pair)
    gateways = MappedGateways(pair, mappings, [], str(tmp_path))
    server = gateways.configs["server"]
    server.write_text(server.read_text() + f'\n[[service]]\nname = "{NAME}"\nport = 53\nprotocol = "udp"\n'
                                           f'backend = "{pair.server_addr}:{DNS_PORT}"\n')
    assert "[[service]]" not in gateways.configs["client"].read_text()      # the mapping alone
    gateways.start()
    pair.client.write_etc("resolv.conf", f"nameserver {RESOLVER}\noptions timeout:2 attempts:2\n")
    yield pair, gateways, mappings
    assert resolver.stop() == 0, resolver.log()
    assert gateways.stop() == {"client": 0, "server": 0}, (gateways.log("client"), gateways.log("server"))


def test_dig_at_a_udp_service_by_name(by_name, tmp_path):
    pair, gateways, mappings = by_name
    address = dig(pair.client, RESOLVER, NAME).values()
    assert len(address) == 1, address
    with open(mappings) as f:
        (entry,) = json.load(f)["mappings"]
    assert (entry["name"], entry["address"], entry["udp_ports"]) == (NAME, address[0], [53])
    # dig resolves its server's name itself (getaddrinfo: our resolver), then asks over UDP
    batch = tmp_path / "queries"
    batch.write_text("".join(f"q{i}.test.example A\n" for i in range(QUERIES)))
    r = pair.client.run(["dig", f"@{NAME}", "+short", "+tries=2", "+time=3", "-f", str(batch)],
                        check=False, timeout=120)
    assert r.stdout.split().count(ANSWER) == QUERIES, (r.stdout[-1000:], r.stderr[-1000:], gateways.log("client"))
    stats = gateways.ctl("client", "stats")
    assert stats["udp_flows_opened"] >= 1 and stats.get("dropped_udp_not_carried", 0) == 0, stats
    assert gateways.ctl("server", "stats")["udp_flows_opened"] == stats["udp_flows_opened"]
    # a port the name does not list for UDP: refused at once (ICMP port unreachable)
    r = pair.client.run(["dig", f"@{NAME}", "-p", "54", "+tries=1", "+time=10", "x.test.example"],
                        check=False, timeout=60)
    assert "connection refused" in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert gateways.ctl("client", "stats")["dropped_udp_not_carried"] == 1
