"""Reclaiming addresses: the daemon asks the gateway's control socket first, and
reclaims nothing when it cannot ask."""
import time

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from dns_resolver import gateway_link
from dns_resolver.config import parse
from dns_resolver.daemon import DnsDaemon
from gateway.adapters.control import ControlFactory


def make_daemon(gateway_control="/run/serval/test-client.sock"):
    data = {"zone": [{"name": "svc.example", "ttl": 5, "service": [{"name": "web"}, {"name": "api"}]}],
            "upstream": {"servers": []},
            "virtual": {"reclaim_after": 10, **({"gateway_control": gateway_control} if gateway_control else {})}}
    d = DnsDaemon(parse(data, "test.toml"), MemoryReactorClock())
    old = time.time() - 100
    web = d.allocator.allocate("web.svc.example", old)
    api = d.allocator.allocate("api.svc.example", old)
    return d, web, api


def test_reclaims_idle_addresses_without_live_flows(monkeypatch):
    d, web, api = make_daemon()
    asked = []

    def fake(reactor, path, timeout=2.0):
        asked.append(path)
        return defer.succeed({web.address})

    monkeypatch.setattr(gateway_link, "virtual_in_use", fake)
    d.sweep()
    assert asked == ["/run/serval/test-client.sock"]
    assert d.allocator.lookup("web.svc.example") is web          # a live flow uses it
    assert d.allocator.lookup("api.svc.example") is None


def test_nothing_is_reclaimed_when_the_gateway_cannot_be_asked(monkeypatch):
    d, web, api = make_daemon()
    monkeypatch.setattr(gateway_link, "virtual_in_use",
                        lambda *a, **k: defer.fail(gateway_link.GatewayUnreachable("no such file")))
    d.sweep()
    assert d.allocator.lookup("web.svc.example") is web and d.allocator.lookup("api.svc.example") is api
    assert not d.sweeping


def test_nothing_is_reclaimed_without_a_gateway_socket(monkeypatch):
    d, web, api = make_daemon(gateway_control=None)
    monkeypatch.setattr(gateway_link, "virtual_in_use", lambda *a, **k: pytest.fail("asked"))
    d.sweep()
    assert len(d.allocator.by_name) == 2


def test_recent_answers_are_not_even_asked_about(monkeypatch):
    d, web, api = make_daemon()
    d.allocator.answered(web, time.time())
    d.allocator.answered(api, time.time())
    monkeypatch.setattr(gateway_link, "virtual_in_use", lambda *a, **k: pytest.fail("asked"))
    assert d.sweep() is None


def test_urgent_sweep_uses_the_ttl_not_reclaim_after(monkeypatch):
    d, web, api = make_daemon()
    now = time.time()
    d.allocator.answered(web, now - 7)          # older than the ttl (5), younger than reclaim_after (10)
    d.allocator.answered(api, now - 1)
    d.allocator.exhausted = True
    monkeypatch.setattr(gateway_link, "virtual_in_use", lambda *a, **k: defer.succeed(set()))
    d._urgent_sweep()
    assert d.allocator.lookup("web.svc.example") is None and d.allocator.lookup("api.svc.example") is api


def test_virtual_in_use_speaks_the_gateway_control_protocol():
    """Our client against the gateway's own control protocol (in memory)."""
    reactor = MemoryReactorClock()
    results = []
    gateway_link.virtual_in_use(reactor, "/run/x.sock").addBoth(results.append)
    path, factory, timeout, _ = reactor.unixClients[0]
    assert path == "/run/x.sock"
    server = ControlFactory({"virtual_in_use": lambda: ["198.18.1.1", "198.18.2.2"]}).buildProtocol(None)
    client = factory.buildProtocol(None)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
    pump.flush()
    assert results == [{"198.18.1.1", "198.18.2.2"}]


def test_virtual_in_use_times_out():
    reactor = MemoryReactorClock()
    failures = []
    gateway_link.virtual_in_use(reactor, "/run/x.sock", timeout=2).addErrback(failures.append)
    reactor.advance(2)
    assert failures and failures[0].check(gateway_link.GatewayUnreachable)


def test_unknown_command_reply_is_unreachable():
    reactor = MemoryReactorClock()
    failures = []
    gateway_link.virtual_in_use(reactor, "/run/x.sock").addErrback(failures.append)
    _, factory, _, _ = reactor.unixClients[0]
    server = ControlFactory({"stats": dict}).buildProtocol(None)          # an old gateway
    client = factory.buildProtocol(None)
    iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client)).flush()
    assert failures and "unknown command" in failures[0].getErrorMessage()


