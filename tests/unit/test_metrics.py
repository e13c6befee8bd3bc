"""Metrics: the exposition (prometheus_client's, read back with its own parsers), the
config value, the HTTP resource, the kernel's queue counters, and what each daemon's
observer exposes (translators, router core and resolver core driven in memory)."""
import time
from types import SimpleNamespace

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from serval import metrics as m
from serval.metrics import Histogram
from serval.observe import DnsObserver, GatewayObserver, RouterObserver

TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
# what a Prometheus server sends: OpenMetrics first, the text format as a fallback
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def families(*fams):
    """A registry holding ``fams`` (and the process collector, as a daemon's does)."""
    return m.registry(lambda: list(fams))


# --- exposition -----------------------------------------------------------------------------
def test_page_has_help_type_and_samples_and_leaves_out_empty_families():
    packets = CounterMetricFamily("serval_x_packets_total", "Packets, by direction", labels=["direction"])
    packets.add_metric(["to_sal"], 3)
    packets.add_metric(["from_sal"], 4)
    nothing = GaugeMetricFamily("serval_x_nothing", "Left out: no samples", labels=["state"])
    page, content_type = m.render(families(packets, GaugeMetricFamily("serval_x_flows", "Flows", value=7), nothing))
    text = page.decode()
    assert content_type == TEXT_0_0_4
    assert ("# HELP serval_x_packets_total Packets, by direction\n"
            "# TYPE serval_x_packets_total counter\n"
            'serval_x_packets_total{direction="to_sal"} 3.0\n'
            'serval_x_packets_total{direction="from_sal"} 4.0\n') in text
    assert "serval_x_nothing" not in text
    s = m.parse(text)
    assert m.value(s, "serval_x_flows") == 7
    assert s[("# TYPE", "serval_x_packets")] == "counter"        # the parser names a counter without _total
    assert s[("# HELP", "serval_x_flows")] == "Flows"
    assert m.value(s, "process_resident_memory_bytes") > 0     # the library's process collector


def test_escaping_round_trips_through_the_parser():
    fam = GaugeMetricFamily("x", 'help with \\ and\nnewline', labels=["v"])
    fam.add_metric(['a"b\\c\nd'], 1.5)
    text = m.render(families(fam))[0].decode()
    assert "# HELP x help with \\\\ and\\nnewline\n" in text
    s = m.parse(text)
    assert m.value(s, "x", v='a"b\\c\nd') == 1.5
    assert s[("# HELP", "x")] == 'help with \\ and\nnewline'


def test_openmetrics_when_the_scraper_asks_for_it():
    fam = CounterMetricFamily("serval_x_packets_total", "Packets", value=3)
    page, content_type = m.render(families(fam), PROMETHEUS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert page.endswith(b"# EOF\n")
    (parsed,) = [f for f in openmetrics_families(page.decode()) if f.name == "serval_x_packets"]
    assert parsed.type == "counter" and parsed.samples[0].value == 3
    assert m.render(families(fam), "*/*")[1] == TEXT_0_0_4          # curl's Accept


def test_histogram_buckets_are_cumulative_and_end_at_inf():
    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.5, 3.0):
        h.observe(v)
    s = m.parse(m.render(families(h.family("lat_seconds", "Latency")))[0].decode())
    le = {dict(k[1])["le"]: v for k, v in s.items() if k[0] == "lat_seconds_bucket"}
    assert le == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}       # a value on a bound is in that bucket
    assert m.value(s, "lat_seconds_count") == 5
    assert m.value(s, "lat_seconds_sum") == pytest.approx(3.565)
    assert s[("# TYPE", "lat_seconds")] == "histogram"
    with pytest.raises(ValueError):
        Histogram((0.1, float("inf")))


def test_parse_refuses_what_is_not_the_format():
    for junk in ("this is not a sample line at all\n", 'a{x="1" 3\n', "a 1\na 2\n"):
        with pytest.raises(ValueError):
            m.parse(junk)
    assert m.total(m.parse('a{x="1",y="2"} 3\na{x="1",y="3"} 4\nb 1\n'), "a", x=1) == 7


# --- the config value ---------------------------------------------------------------------
def test_address_loopback_only_unless_public():
    assert m.parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert m.parse_address("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ValueError, match="metrics_public = true"):
        m.parse_address("198.19.1.1:9464")
    with pytest.raises(ValueError, match="metrics_public"):
        m.parse_address("0.0.0.0:9464")
    assert m.parse_address("0.0.0.0:9464", public=True) == ("0.0.0.0", 9464)
    for bad in ("9464", "localhost:9464", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1"):
        with pytest.raises(ValueError):
            m.parse_address(bad)


def test_each_daemon_config_takes_metrics(tmp_path):
    from dns_resolver.config import ConfigError as DnsError
    from dns_resolver.config import parse as dns_parse
    from gateway.config import ConfigError, load
    from router.config import RouterConfigError
    from router.config import parse as router_parse

    base = ('[gateway]\n{}\n[[service]]\nname = "web"\nport = 80\naddress = "198.18.0.10"\n'
            '[[route]]\nservice = "web"\nnext_hop = "198.19.2.2"\n')
    path = tmp_path / "c.toml"
    path.write_text(base.format(""))
    assert load(str(path), "client").metrics is None                       # off by default
    path.write_text(base.format('metrics = "127.0.0.1:9464"'))
    assert load(str(path), "client").metrics == ("127.0.0.1", 9464)
    path.write_text(base.format('queue = 0\nmetrics = "198.19.2.1:9464"'))
    with pytest.raises(ConfigError, match=r"c\.toml:3: .*metrics_public = true"):
        load(str(path), "client")
    path.write_text(base.format('metrics = "198.19.2.1:9464"\nmetrics_public = true'))
    assert load(str(path), "client").metrics == ("198.19.2.1", 9464)

    key = {"key": [{"id": "k", "key": "00" * 16}]}
    assert router_parse({"router": {}, **key}, "r.toml").metrics is None
    assert router_parse({"router": {"metrics": "127.0.0.1:9465"}, **key}, "r.toml").metrics == ("127.0.0.1", 9465)
    with pytest.raises(RouterConfigError, match="metrics_public"):
        router_parse({"router": {"metrics": "198.19.20.1:9465"}, **key}, "r.toml")

    assert dns_parse({}, "d.toml").metrics is None
    assert dns_parse({"server": {"metrics": "127.0.0.1:9466"}}, "d.toml").metrics == ("127.0.0.1", 9466)
    with pytest.raises(DnsError, match="metrics_public"):
        dns_parse({"server": {"metrics": "198.19.1.1:9466"}}, "d.toml")
    with pytest.raises(DnsError, match="true or false"):
        dns_parse({"server": {"metrics": "127.0.0.1:9466", "metrics_public": "yes"}}, "d.toml")


# --- HTTP -----------------------------------------------------------------------------------
def _get(resource, path: bytes, accept: str | None = None):
    from twisted.web.test.requesthelper import DummyRequest
    request = DummyRequest([p for p in path.split(b"/") if p])
    request.path = path
    if accept is not None:
        request.requestHeaders.setRawHeaders(b"accept", [accept.encode()])
    body = resource.render(request)
    return request.responseCode or 200, request.responseHeaders.getRawHeaders(b"content-type"), body


def test_resource_serves_metrics_and_survives_a_broken_collector():
    good = m.metrics_resource(families(GaugeMetricFamily("serval_test_up", "Up", value=1)))
    code, ctype, body = _get(good, b"/metrics")
    assert code == 200 and ctype == [TEXT_0_0_4.encode()]
    assert b"# HELP serval_test_up Up\n# TYPE serval_test_up gauge\nserval_test_up 1.0\n" in body
    code, ctype, body = _get(good, b"/metrics", PROMETHEUS_ACCEPT)
    assert code == 200 and ctype[0].startswith(b"application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert _get(good, b"/other")[0] == 404

    def broken():
        raise RuntimeError("bug")
    code, _, body = _get(m.metrics_resource(m.registry(broken)), b"/metrics")
    assert code == 500 and b"error" in body


def test_listen_binds_the_configured_address_and_says_when_it_cannot():
    from twisted.internet.error import CannotListenError
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    m.listen(reactor, ("127.0.0.1", 9464), families())
    port, _, _, interface = reactor.tcpServers[0]
    assert (port, interface) == (9464, "127.0.0.1")

    class Taken(MemoryReactor):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
    with pytest.raises(OSError, match=r"metrics: cannot listen on 127\.0\.0\.1:9464: .*in use"):
        m.listen(Taken(), ("127.0.0.1", 9464), families())


# --- the kernel's queue counters ------------------------------------------------------------------
def test_nfqueue_counters(tmp_path):
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text("    0  12345     3 2 65531     7     2      991  1\n"
                    " 1000  12346     0 2 65531     0     0       40  1\n")
    assert m.nfqueue_counters(str(proc)) == {
        0: {"waiting": 3, "dropped": 7, "user_dropped": 2, "id_sequence": 991},
        1000: {"waiting": 0, "dropped": 0, "user_dropped": 0, "id_sequence": 40}}
    fams = m.nfqueue_families("serval_gateway", {0: "bulk", 1000: "control", 5: "gone"}, str(proc))
    s = m.parse(m.render(families(*fams))[0].decode())
    assert m.value(s, "serval_gateway_nfqueue_dropped_total", queue=0, purpose="bulk") == 7
    assert m.value(s, "serval_gateway_nfqueue_queued_total", queue=1000, purpose="control") == 40
    assert m.value(s, "serval_gateway_nfqueue_waiting", queue=5, purpose="gone") is None
    assert m.nfqueue_counters(str(tmp_path / "absent")) == {}


# --- what the daemons expose ----------------------------------------------------------------------
def scrape(observer) -> dict:
    """The observer's page, parsed; and checked as a Prometheus server would take it: one
    family per name, each with its help text, and valid OpenMetrics too."""
    fams = observer.collect()
    names = [fam.name for fam in fams]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    page, _ = m.render(observer.registry)
    samples = m.parse(page.decode())
    assert all(text for (kind, _), text in samples.items() if kind == "# HELP")
    strict, _ = m.render(observer.registry, PROMETHEUS_ACCEPT)
    assert {f.name for f in openmetrics_families(strict.decode())} >= {f.name for f in fams if f.samples}
    return samples


def fake_gateway(translator, role):
    from tests.unit.test_translate import SID
    cfg = SimpleNamespace(role=role, instance=f"{role}-1", carriage="ip", queue=0 if role == "client" else 1,
                          control_queue=1000 if role == "client" else 1001,
                          new_flow_queue=2000 if role == "client" else 2001, metrics=None,
                          services=[SimpleNamespace(service_id=SID, name="web.svc.example")])
    return SimpleNamespace(cfg=cfg, translator=translator, stats=translator.stats, reactor=None,
                           routing=SimpleNamespace())


def test_gateway_metrics_follow_a_connection_a_move_and_junk():
    from sal.ip import aton
    from tests.unit.test_migration import CGW2, backend_data, legacy_data, take
    from tests.unit.test_translate import handshake, make_pair

    client, server = make_pair()
    cobs, sobs = GatewayObserver(fake_gateway(client, "client")), GatewayObserver(fake_gateway(server, "server"))
    now = time.monotonic()
    lport = handshake(client, server, now)
    for i in range(3):              # 3 data segments each way, 100 bytes of payload each
        server.from_sal(client.from_legacy(legacy_data(1001 + 100 * i, b"x" * 100), now), now)
        client.from_sal(server.from_backend(backend_data(lport, 5001 + 100 * i, b"y" * 100), now), now)
    client.migrate(now + 1, aton(CGW2))
    (rsyn,) = take(client)
    server.from_sal(rsyn, now + 1)
    (rsynack,) = take(server)
    client.from_sal(rsynack, now + 1.004)
    ack, = take(client)
    server.from_sal(ack, now + 1.004)
    for junk in (b"\x45" + bytes(30), b"\x46" * 60):
        client.from_sal(junk, now + 2)

    c, s = scrape(cobs), scrape(sobs)
    assert m.value(c, "serval_gateway_info", role="client", instance="client-1", carriage="ip") == 1
    assert m.value(c, "serval_gateway_translated_packets_total", direction="to_sal") == client.stats["to_sal"] >= 5
    assert m.value(c, "serval_gateway_translated_bytes_total", direction="to_sal") >= 300 + 3 * 20
    assert m.value(c, "serval_gateway_translated_bytes_total", direction="from_sal") >= 300 + 3 * 20
    assert m.value(s, "serval_gateway_translated_bytes_total", direction="to_sal") >= 300
    assert m.value(c, "serval_gateway_flows", state="established") == 1
    assert m.value(c, "serval_gateway_flows", state="syn-sent") == 0
    assert m.value(c, "serval_gateway_flows_opened_total") == 1
    assert m.value(c, "serval_gateway_flows_ended_total", reason="reset") == 0
    assert m.value(c, "serval_gateway_migrations_completed_total") == 1
    assert m.value(c, "serval_gateway_migration_seconds_count") == 1
    assert m.value(c, "serval_gateway_migration_seconds_bucket", le="0.005") == 1
    assert m.value(c, "serval_gateway_migration_seconds_bucket", le="0.0025") == 0
    assert m.value(s, "serval_gateway_peer_migrations_completed_total") == 1
    # handshake times: client SYN -> SYN-ACK, server SYN -> ACK (same instant here)
    assert m.value(c, "serval_gateway_handshake_seconds_count") == 1
    assert m.value(s, "serval_gateway_handshake_seconds_count") == 1
    drops = {dict(k[1])["reason"]: v for k, v in c.items() if k[0] == "serval_gateway_dropped_packets_total"}
    assert sum(drops.values()) == sum(v for k, v in client.stats.items() if k.startswith("dropped_")) >= 2
    assert all(r and not r.startswith("dropped") for r in drops)
    # every counter appears once: under its own name or as a leftover
    leftovers = {dict(k[1])["stat"] for k in c if k[0] == "serval_gateway_stat_total"}
    assert not leftovers & {"to_sal", "from_sal", "flows_opened", "migrations_completed"}
    assert c[("# TYPE", "serval_gateway_handshake_seconds")] == "histogram"


def test_bytes_of_a_flow_gone_between_looks_stay_counted():
    from tests.unit.test_migration import legacy_data
    from tests.unit.test_translate import handshake, make_pair

    client, server = make_pair()
    obs = GatewayObserver(fake_gateway(client, "client"))
    now = time.monotonic()
    handshake(client, server, now)
    server.from_sal(client.from_legacy(legacy_data(1001, b"x" * 500), now), now)
    first = m.value(scrape(obs), "serval_gateway_translated_bytes_total", direction="to_sal")
    assert first >= 520
    client._forget(next(iter(client.flows.values())))      # the flow goes (expired, replaced)
    after = scrape(obs)
    assert m.value(after, "serval_gateway_translated_bytes_total", direction="to_sal") == first   # never falls
    assert m.value(after, "serval_gateway_flows", state="established") == 0


def test_router_metrics():
    from router.core import RouterCore
    from sal import registration as reg
    from sal.ip import aton
    from sal.serviceid import ServicePrefix, service_id_for

    key = reg.Key("deployment", b"k" * 32)
    core = RouterCore("r0", [key], now=0.0)
    router = SimpleNamespace(core=core, reactor=None, cfg=SimpleNamespace(instance="r0", address="198.19.20.1",
                                                                         queue=2, metrics=None))
    obs = RouterObserver(router)
    signer = reg.Signer(key, "sgw0")
    record = reg.Record("web.svc.example", ServicePrefix(service_id_for("web.svc.example", 80)), 1, 1)
    wall = time.time_ns()
    data, _ = signer.message(reg.REGISTER, wall, address=aton("198.19.10.2"), records=[record], hold_ms=200)
    assert core.on_control(data, 1.0, wall) is not None
    core.on_control(data, 1.0, wall)                                   # a replay: refused
    core.on_control(b"SR" + bytes(60), 1.0, wall)                       # junk: refused
    s = scrape(obs)
    assert m.value(s, "serval_router_registrations") == 1
    assert m.value(s, "serval_router_instances", service="web.svc.example:80") == 1
    assert m.value(s, "serval_router_registration_events_total", event="new") == 1
    assert m.value(s, "serval_router_registrations_refused_total", reason="replay") == 1
    assert m.total(s, "serval_router_registrations_refused_total") == 2
    assert m.value(s, "serval_router_control_messages_total", type="register") == 1
    core.handle_timer(2.0)                                             # no refresh: expired
    s = scrape(obs)
    assert m.value(s, "serval_router_registration_events_total", event="expired") == 1
    assert m.value(s, "serval_router_registrations") == 0


def test_dns_metrics():
    stats = dict.fromkeys(("queries", "rate_limited", "dropped", "formerr", "notimp", "badvers", "refused",
                           "zone_answers", "cache_answers", "forwarded", "upstream_answers", "servfail",
                           "truncated", "coalesced"), 0)
    stats.update(queries=10, zone_answers=4, cache_answers=3, upstream_answers=2, refused=1, forwarded=2)
    class Upstream:
        down_until = 0.0

        def __str__(self):
            return "198.19.1.53:53"
    up = Upstream()
    daemon = SimpleNamespace(
        cfg=SimpleNamespace(metrics=None), reactor=SimpleNamespace(seconds=lambda: 100.0),
        core=SimpleNamespace(stats=stats, pending={}),
        forwarder=SimpleNamespace(stats={"udp_attempts": 2, "tcp_attempts": 0, "timeouts": 1}, upstreams=[up]),
        allocator=SimpleNamespace(by_name={"web.svc.example": 1}), cache={"a": 1, "b": 2})
    s = scrape(DnsObserver(daemon))
    assert m.value(s, "serval_dns_queries_total") == 10
    assert m.value(s, "serval_dns_query_results_total", result="zone") == 4
    assert m.value(s, "serval_dns_query_results_total", result="refused") == 1
    assert m.total(s, "serval_dns_query_results_total") == 10
    assert m.value(s, "serval_dns_upstream_failures_total", reason="timeout") == 1
    assert (m.value(s, "serval_dns_mappings"), m.value(s, "serval_dns_cache_entries")) == (1, 2)


def test_observer_lifecycle_timer_and_listener(caplog):
    import logging

    from twisted.internet.testing import MemoryReactorClock

    from tests.unit.test_translate import handshake, make_pair

    caplog.set_level(logging.INFO, logger="serval")
    reactor = MemoryReactorClock()
    client, server = make_pair()
    gw = fake_gateway(client, "client")
    gw.reactor, gw.cfg.metrics = reactor, ("127.0.0.1", 9464)
    obs = GatewayObserver(gw, clock=reactor.seconds)
    obs.start()
    assert [(p, i) for p, _, _, i in reactor.tcpServers] == [(9464, "127.0.0.1")]
    handshake(client, server, time.monotonic())
    reactor.advance(1.0)                     # a tick
    reactor.pump([1.0] * 60)                 # a minute: one summary
    summaries = [r.getMessage() for r in caplog.records if getattr(r, "serval_event", "") == "flows_summary"]
    assert summaries == ["flows: 1 opened in the last 60 s; 1 live"]
    obs.stop()
    assert obs.timer is None and obs.port is None and not reactor.getDelayedCalls()


def test_bytes_are_exact_once_the_translator_keeps_those_of_forgotten_flows():
    from tests.unit.test_migration import legacy_data
    from tests.unit.test_translate import handshake, make_pair

    client, server = make_pair()
    client.forgotten_bytes_out, client.forgotten_bytes_in = 1000, 2000      # the hook, as asked for
    obs = GatewayObserver(fake_gateway(client, "client"))
    now = time.monotonic()
    handshake(client, server, now)
    server.from_sal(client.from_legacy(legacy_data(1001, b"x" * 500), now), now)
    (flow,) = client.flows.values()
    s = scrape(obs)
    assert m.value(s, "serval_gateway_translated_bytes_total", direction="to_sal") == 1000 + flow.bytes_out
    assert m.value(s, "serval_gateway_translated_bytes_total", direction="from_sal") == 2000 + flow.bytes_in


def test_handshake_times_from_the_translator_once_it_keeps_them():
    from tests.unit.test_translate import make_pair

    client, _ = make_pair()
    client.handshake_times = []                                   # the hook, as asked for
    obs = GatewayObserver(fake_gateway(client, "client"))
    assert "_after_control" not in vars(client)                   # nothing wrapped then
    for seconds in (0.002, 0.03, 0.4):
        client.handshake_times.append(seconds)
        client.stats["handshakes_completed"] += 1
    del client.handshake_times[:-2]                               # trimmed as migration_times is
    s = scrape(obs)
    assert m.value(s, "serval_gateway_handshake_seconds_count") == 2      # what was still there
    assert m.value(s, "serval_gateway_handshake_seconds_sum") == pytest.approx(0.43)
