"""Names with no live instance: the routers' names views (sans-IO), the zone's answer,
and the poller against the routers' control protocol on Twisted's fakes."""
import pytest
from dnslib import DNSRecord
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from dns_resolver import wire
from dns_resolver.allocator import Allocator
from dns_resolver.config import parse
from dns_resolver.daemon import DnsDaemon
from dns_resolver.liveness import BadView, Liveness
from dns_resolver.names import Service, StaticNames
from dns_resolver.store import MemoryStore
from dns_resolver.zone import ServiceZone
from gateway.adapters.control import ControlFactory

R0, R1 = ("198.19.20.1", 54327), ("198.19.21.1", 54327)


def view(*names, ready=True, instances=1):
    return {"ready": ready, "names": [{"name": n, "service_id": "00" * 32, "prefix_bits": 256, "port": 80,
                                       "instances": instances} for n in names]}


# --- the view ----------------------------------------------------------------------------

def test_unknown_until_a_ready_router_is_heard():
    live = Liveness([R0], stale_after=3)
    assert live.refresh(0.0) == (None, None) and not live.down("web.svc.example")
    live.heard(R0, view("web.svc.example", ready=False), 0.0)       # warming up: its view is partial
    live.refresh(0.0)
    assert live.live is None and not live.down("api.svc.example")
    live.heard(R0, view("Web.Svc.Example."), 1.0)
    assert live.refresh(1.0) == (None, frozenset({"web.svc.example"}))
    assert live.down("api.svc.example") and not live.down("web.svc.example")


def test_union_of_fresh_routers_and_stale_views_are_forgotten():
    live = Liveness([R0, R1], stale_after=3)
    live.heard(R0, view("web.svc.example"), 0.0)
    live.heard(R1, view("api.svc.example"), 2.0)
    live.refresh(2.0)
    assert live.live == {"web.svc.example", "api.svc.example"}     # any router with an instance
    generation = live.generation
    live.failed(R0, 2.5)                                            # one lost poll changes nothing
    live.refresh(2.5)
    assert live.live == {"web.svc.example", "api.svc.example"} and live.generation == generation
    live.refresh(3.5)                                               # R0's view is 3.5 s old
    assert live.live == {"api.svc.example"} and live.generation == generation + 1
    live.refresh(5.5)
    assert live.live is None                                        # nobody knows: answer as before
    assert live.stats["router_poll_failures"] == 1 and live.stats["router_polls"] == 3


def test_zero_instances_is_down_and_bad_replies_keep_the_last_view():
    live = Liveness([R0], stale_after=3)
    live.heard(R0, view("web.svc.example", instances=0), 0.0)
    live.refresh(0.0)
    assert live.down("web.svc.example")
    for bad in ([], {"ready": "yes", "names": []}, {"ready": True, "names": [{"name": 7, "instances": 1}]},
                {"ready": True, "names": [{"name": "x", "instances": True}]}, None):
        with pytest.raises(BadView):
            live.heard(R0, bad, 1.0)
    live.refresh(1.0)
    assert live.live == frozenset() and live.stats["router_bad_replies"] == 5


# --- the zone's answer -------------------------------------------------------------------

def zone_with(liveness, down_ttl=5):
    names = StaticNames([Service("web.svc.example", (80,)), Service("api.svc.example")])
    allocator = Allocator("198.18.0.0/16", store=MemoryStore())
    return ServiceZone("svc.example", names, allocator, ttl=30, negative_ttl=60, liveness=liveness,
                       down_ttl=down_ttl), allocator


def answer(zone, name, qtype="A", now=1e9):
    q = DNSRecord.question(name, qtype)
    query = wire.parse_query(q.pack())
    return DNSRecord.parse(zone.answer(query, now).render(query, 0.0, 1232))


def test_a_name_with_no_live_instance_is_nodata_with_a_short_ttl():
    live = Liveness([R0], stale_after=3)
    zone, allocator = zone_with(live)
    assert answer(zone, "api.svc.example").rr                      # unknown: answered as before
    live.heard(R0, view("web.svc.example"), 0.0)
    live.refresh(0.0)
    for qtype in ("A", "TXT", "ANY"):
        r = answer(zone, "api.svc.example", qtype)
        assert r.header.rcode == wire.NOERROR and r.header.aa and not r.rr, qtype
        [soa] = r.auth
        assert soa.rtype == 6 and soa.ttl == 5 and soa.rdata.times[-1] == 5   # negative caching: 5 s
    assert answer(zone, "web.svc.example").rr                      # the live one still answered
    assert answer(zone, "nope.svc.example").header.rcode == wire.NXDOMAIN
    assert zone.stats["no_instance"] == 3
    # back: the memoised NODATA is dropped at once, and the same address comes back
    address = allocator.lookup("api.svc.example").address
    live.heard(R0, view("web.svc.example", "api.svc.example"), 1.0)
    live.refresh(1.0)
    r = answer(zone, "api.svc.example")
    assert [str(rr.rdata) for rr in r.rr] == [address] and r.rr[0].ttl == 30


def test_no_address_is_allocated_for_a_name_with_no_live_instance():
    live = Liveness([R0], stale_after=3)
    zone, allocator = zone_with(live)
    live.heard(R0, view(), 0.0)
    live.refresh(0.0)
    assert not answer(zone, "web.svc.example").rr and allocator.lookup("web.svc.example") is None


def test_down_ttl_never_above_the_zones_negative_ttl():
    zone, _ = zone_with(Liveness([R0], 3), down_ttl=600)
    assert zone.down_ttl == 60


# --- the daemon: polling the routers over their control protocol --------------------------

def daemon(routed=True, **liveness):
    data = {"upstream": {"servers": []}, "server": {"allow": ["198.19.1.0/24"]},
            "liveness": {"routers": ["198.19.20.1", "198.19.21.1:6000"], "interval": 1, **liveness},
            "zone": [{"name": "svc.example", "service": [{"name": "web"}, {"name": "api"}]},
                     {"name": "static.example", "routed": routed, "service": [{"name": "db"}]}]}
    return DnsDaemon(parse(data, "test.toml"), MemoryReactorClock())


def serve(reactor, answers: dict, seen: int) -> int:
    """Answer the poller's new connections as routers would: the control protocol
    (gateway/adapters/control.py) with a ``live_names`` command; ``answers`` maps
    (host, port) to a result, or to an exception for a refused connection."""
    for host, port, factory, _timeout, _bind in reactor.tcpClients[seen:]:
        result = answers[(host, port)]
        if isinstance(result, Exception):
            factory.clientConnectionFailed(None, Failure(result))
            continue
        server = ControlFactory({"live_names": lambda r=result: r}).buildProtocol(None)
        client = factory.buildProtocol(None)
        iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client)).flush()
    return len(reactor.tcpClients)


def ask(d, name, qtype="A"):
    q = DNSRecord.question(name, qtype).pack()
    [reply] = d.core.handle(q, "198.19.1.2", False, 0.0, 1e9, "c")
    return DNSRecord.parse(reply.data)


def test_the_daemon_polls_every_router_and_stops_handing_out_dead_names():
    d = daemon(routed=False)
    reactor = d.reactor
    d.poller.start()
    assert [(h, p) for h, p, *_ in reactor.tcpClients] == [("198.19.20.1", 54327), ("198.19.21.1", 6000)]
    seen = serve(reactor, {("198.19.20.1", 54327): view("web.svc.example"),
                           ("198.19.21.1", 6000): view("web.svc.example", ready=False)}, 0)
    assert ask(d, "web.svc.example").rr
    r = ask(d, "api.svc.example")
    assert not r.rr and r.auth[0].ttl == 5 and r.header.rcode == wire.NOERROR
    assert ask(d, "db.static.example").rr                 # a zone not served through the routers (routed = false)
    assert daemon(routed=True).zones[1].liveness is not None
    assert d.stats["no_instance"] == 1 and d.stats["router_polls"] == 2
    # the routers become unreachable: their views go stale, and every name is answered again
    down = {("198.19.20.1", 54327): ConnectionRefusedError(), ("198.19.21.1", 6000): ConnectionRefusedError()}
    for _ in range(4):
        reactor.advance(1)
        seen = serve(reactor, down, seen)
    assert d.liveness.live is None and ask(d, "api.svc.example").rr
    assert d.stats["router_poll_failures"] == 8
    d.stop()


def test_a_router_that_does_not_know_the_command_counts_as_not_heard():
    d = daemon()
    reactor = d.reactor
    d.poller.start()
    for host, port, factory, _timeout, _bind in reactor.tcpClients:
        server = ControlFactory({"names": list}).buildProtocol(None)      # a router without the view
        client = factory.buildProtocol(None)
        iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client)).flush()
    assert d.liveness.live is None and d.stats["router_poll_failures"] == 2
    assert ask(d, "api.svc.example").rr
    d.stop()


def test_a_router_that_does_not_answer_times_out_and_is_asked_again():
    d = daemon(timeout=0.5)
    reactor = d.reactor
    d.poller.start()
    assert len(reactor.tcpClients) == 2
    reactor.advance(0.5)                                   # no answer: both time out
    assert d.stats["router_poll_failures"] == 2 and not d.poller.in_flight
    reactor.advance(0.5)
    assert len(reactor.tcpClients) == 4                    # the next round asks again
    d.stop()


def test_liveness_config_errors_name_the_line(tmp_path):
    from dns_resolver.config import ConfigError, load
    path = tmp_path / "dns.toml"
    path.write_text('[liveness]\nrouters = ["198.19.20.1"]\ninterval = 2\nstale_after = 1\n')
    with pytest.raises(ConfigError, match=r"dns.toml:4: stale_after \(1 s\) is below interval"):
        load(str(path))
    path.write_text('[liveness]\nrouters = ["router-1"]\n')
    with pytest.raises(ConfigError, match=r"dns.toml:2: .*not an IP address"):
        load(str(path))
    path.write_text('[[zone]]\nname = "svc.example"\nrouted = "no"\n')
    with pytest.raises(ConfigError, match=r"dns.toml:3: routed must be true or false"):
        load(str(path))


def test_one_log_line_per_change(caplog):
    caplog.set_level("INFO", logger="serval.dns")
    d = daemon(routed=False)
    d.poller.start()
    routers = [("198.19.20.1", 54327), ("198.19.21.1", 6000)]
    seen = serve(d.reactor, dict.fromkeys(routers, view("web.svc.example")), 0)
    d.reactor.advance(1)
    seen = serve(d.reactor, dict.fromkeys(routers, view("web.svc.example")), seen)      # no change: no line
    d.reactor.advance(1)
    serve(d.reactor, dict.fromkeys(routers, view("api.svc.example")), seen)
    lines = [r.getMessage() for r in caplog.records if r.name == "serval.dns"]
    assert lines == ["routers' names view: 1 of 2 routed name(s) with a live instance; none for api.svc.example",
                     "api.svc.example: a live instance again",        # the first router's word: union {web, api}
                     "web.svc.example: no live instance at the routers: answering NODATA (ttl 5 s)"]
    d.stop()
