"""Metrics and logs of the real daemons: each serves /metrics on 127.0.0.1:9464 inside its
namespace, scraped with curl while the test does something whose effect it knows: a
transfer, a move of the client gateway, junk sent at a gateway, a server gateway and a
router killed, DNS queries. Pages are read with prometheus_client's parsers (the text
format, and OpenMetrics where the scraper asks for it as Prometheus does). The routed
daemons also log in JSON (--log-json)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from lab.gateways import METRICS_PORT, RunningGateways
from lab.routed import REPO, Knobs, RoutedDeployment, run_client, start_backend
from lab.topologies import gateway_pair, routed_replicas
from lab.topology import Lab
from serval import metrics as m
from tests.integration.helpers import make_file, sha256_file, start_http
from tests.integration.test_mobility import download, replace_address, wait_size

SIZE = 16 * 1024 * 1024
JUNK_PY = r'''
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 144)     # SAL over IP, but nonsense
for i in range(int(sys.argv[2])):
    s.sendto(bytes(8) if i % 2 else os.urandom(40), (sys.argv[1], 0))
'''


def scrape(host, port: int = METRICS_PORT) -> dict:
    r = host.run(["curl", "-sS", "--fail", "-m", "5", "-D", "-", f"http://127.0.0.1:{port}/metrics"])
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    assert "content-type: text/plain; version=0.0.4" in head.lower(), head
    return m.parse(body)


def dropped(samples: dict) -> dict:
    return {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == "serval_gateway_dropped_packets_total"}


def test_gateway_pair_transfer_move_and_junk(lab, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    pair = gateway_pair(lab, server_route_back=False)
    for gw in (pair.cgw, pair.sgw):
        gw.sysctl("net.ipv4.conf.all.promote_secondaries", 1)     # replacing an address keeps the subnet
    gws = RunningGateways(pair, metrics=True).start()
    try:
        start_http(pair.server, www)
        src = make_file(www, "16MB.bin", SIZE)
        out = tmp_path / "got.bin"
        dl = download(pair, "16MB.bin", out, rate="12M")
        wait_size(out, 4 * 1024 * 1024)
        during = m.parse(gws.scrape("client"))
        assert m.value(during, "serval_gateway_flows", state="established") >= 1
        assert m.value(during, "serval_gateway_translated_bytes_total", direction="from_sal") >= 4 * 1024 * 1024
        replace_address(pair.cgw, pair.cgw_sal_if, pair.cgw_sal, "198.19.2.11")
        _, err = dl.communicate(timeout=60)
        assert dl.returncode == 0, err
        assert sha256_file(out) == sha256_file(src)
        time.sleep(1.2)                       # the observer's next look: the migration line

        before = m.total(scrape(pair.cgw), "serval_gateway_dropped_packets_total")
        pair.sgw.run([sys.executable, "-c", JUNK_PY, "198.19.2.11", "20"])
        c, s = scrape(pair.cgw), scrape(pair.sgw)
        stats = gws.stats("client")

        # what the test did, as the metrics say it
        assert m.value(c, "serval_gateway_info", role="client", instance="client", carriage="ip") == 1
        assert m.value(c, "serval_gateway_translated_bytes_total", direction="from_sal") >= SIZE
        assert m.value(s, "serval_gateway_translated_bytes_total", direction="to_sal") >= SIZE
        assert m.value(c, "serval_gateway_translated_packets_total", direction="from_sal") == \
            stats["from_sal"] + stats.get("fastpath_from_sal", 0)     # Python's and the kernel's
        assert m.value(c, "serval_gateway_flows_opened_total") == 1
        assert m.value(c, "serval_gateway_handshake_seconds_count") == 1
        assert m.value(s, "serval_gateway_handshake_seconds_count") == 1
        moves = {k: v for k, v in stats.items() if "migration" in k or "challenge" in k or "rebind" in k}
        assert m.value(c, "serval_gateway_migrations_completed_total") == 1, (moves, gws.log("client")[-3000:])
        assert m.value(c, "serval_gateway_migration_seconds_count") == 1
        assert m.value(c, "serval_gateway_migration_seconds_bucket", le="+Inf") == 1
        assert m.value(s, "serval_gateway_peer_migrations_completed_total") == 1
        assert m.value(c, "serval_gateway_flows_ended_total", reason="reset") == 0
        drops = dropped(c)
        assert m.total(c, "serval_gateway_dropped_packets_total") - before == 20, drops
        assert drops == {k[len("dropped_"):]: v for k, v in stats.items() if k.startswith("dropped_")}
        for queue, purpose in ((0, "bulk"), (1000, "control")):
            assert m.value(c, "serval_gateway_nfqueue_queued_total", queue=queue, purpose=purpose) > 0
            assert m.value(c, "serval_gateway_nfqueue_waiting", queue=queue, purpose=purpose) is not None
        assert c[("# TYPE", "serval_gateway_migration_seconds")] == "histogram"
        assert "migrations: 1 completed in the last 1 s" in gws.log("client")
        assert "peer moved: 1 flow(s) now follow the peer's new address" in gws.log("server")
        assert pair.cgw.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             f"http://127.0.0.1:{METRICS_PORT}/nothing"]).stdout == "404"
    finally:
        assert gws.stop() == {"client": 0, "server": 0}


class Observed(RoutedDeployment):
    """The routed deployment with metrics on in every config, every daemon logging JSON."""

    def _config(self, name, key_file):
        text = super()._config(name, key_file)
        line = f'metrics = "127.0.0.1:{METRICS_PORT}"\n'
        return text.replace("[router]\n", "[router]\n" + line, 1).replace("[gateway]\n", "[gateway]\n" + line, 1)

    def launch(self, name: str) -> None:
        argv = ["router", "--config"] if name.startswith("r") else \
            ["gateway", "client" if name == "cgw" else "server", "--config"]
        log = open(self.dir / f"{name}.log", "a")
        self.procs[name] = self.hosts[name].popen(
            [sys.executable, "-m", "serval", *argv, str(self.configs[name]), "--log-json"],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})

    def scrape(self, name: str) -> dict:
        return scrape(self.hosts[name])

    def events(self, name: str) -> list[dict]:
        lines = (self.dir / f"{name}.log").read_text().splitlines()
        out = [json.loads(line) for line in lines]       # every line is one JSON object
        for obj in out:
            assert {"time", "level", "logger", "message", "event"} <= set(obj), obj
        return out


def test_routed_metrics_through_a_gateway_and_a_router_failure(requires_netns):
    with Lab() as lab:
        topo = routed_replicas(lab)
        d = Observed(topo, Knobs())
        for i in range(2):
            start_backend(topo.servers[i], f"srv{i}")
        try:
            d.start()
            d.wait_registered(2)
            d.wait_for(lambda: all(r["health"] == "live" for r in d.ctl("cgw", "services")), 5, "routers live")
            counts = run_client(topo.client, "split", 200, 16, 3.0)["counts"]
            assert sum(counts.values()) == counts.get("srv0", 0) + counts.get("srv1", 0) == 200, counts

            routers = {r: d.scrape(r) for r in ("r0", "r1")}
            assert sum(m.value(s, "serval_router_syns_forwarded_total") for s in routers.values()) >= 200
            for s in routers.values():
                assert m.value(s, "serval_router_registrations") == 2
                assert m.value(s, "serval_router_instances", service="web.svc.example:80") == 2
                assert m.value(s, "serval_router_registration_events_total", event="new") == 2
                assert m.value(s, "serval_router_dropped_packets_total", reason="not_a_syn", default=0) == 0
                assert m.value(s, "serval_router_nfqueue_queued_total", queue=2, purpose="syn") > 0
            cgw = d.scrape("cgw")
            assert m.value(cgw, "serval_gateway_flows_opened_total") == 200
            assert m.value(cgw, "serval_gateway_handshake_seconds_count") == 200
            assert m.value(cgw, "serval_gateway_router_up", router=f"{topo.router_addr(0)}:54326") == 1
            sgw0 = d.scrape("sgw0")
            assert m.value(sgw0, "serval_gateway_registrations_sent_total", type="register") > 2
            assert m.value(sgw0, "serval_gateway_registration_acks_total", status="applied") > 2
            assert m.value(sgw0, "serval_gateway_registration_acks_total", status="refused") == 0
            assert m.value(sgw0, "serval_gateway_router_acknowledged", router=f"{topo.router_addr(1)}:54326") == 1
            assert m.value(sgw0, "serval_gateway_service_state", service="web.svc.example:80", state="registered") == 1
            assert m.value(sgw0, "serval_gateway_backend_up", backend=f"{topo.server_addr(0)}:8080") == 1

            # a server gateway dies: its registrations expire at both routers
            d.kill("sgw0")
            d.wait_registered(1)
            time.sleep(1.2)                   # the routers' observers look once a second
            s = d.scrape("r1")
            assert m.value(s, "serval_router_registration_events_total", event="expired") == 1
            assert m.value(s, "serval_router_instances", service="web.svc.example:80") == 1
            ended = [e for e in d.events("r1") if e["event"] == "registration_ended"]
            assert [(e["sender"], e["reason"], e["level"]) for e in ended] == \
                [(f"{d.tag}-sgw0", "expired", "warning")], ended
            assert {e["event"] for e in d.events("r1")} >= {"started", "registered", "metrics_listening"}

            # a router dies: the client gateway's probes say so
            d.kill("r0")
            d.wait_for(lambda: m.value(d.scrape("cgw"), "serval_gateway_router_up",
                                       router=f"{topo.router_addr(0)}:54326") == 0, 5, "r0 down in the metrics")
            # the log line follows the metric; on a loaded machine another router may flap
            # afterwards, so look for r0's line among them
            def r0_down_logged():
                return any(e["event"] == "router_health" and e["down"] == [topo.router_addr(0)]
                           for e in d.events("cgw"))
            d.wait_for(r0_down_logged, 5, "r0 down in the log")
            assert set(d.stop_all().values()) == {0}
        finally:
            for name in list(d.procs):
                d.kill(name)


def test_resolver_metrics_and_json_logs(lab, tmp_path):
    host = lab.add_host("dns")
    config = tmp_path / "dns.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:53"]\nmetrics = "127.0.0.1:9466"\n\n'
                      '[upstream]\nservers = []\n\n[[zone]]\nname = "svc.example"\n[[zone.service]]\nname = "web"\n')
    log = tmp_path / "dns.log"
    with open(log, "w") as out:
        proc = host.popen([sys.executable, "-m", "serval", "dns", "--config", str(config), "--log-json"],
                          stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 10
    while host.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:9466/metrics"], check=False).returncode:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    for name in ("web.svc.example", "web.svc.example", "nope.svc.example", "elsewhere.example"):
        host.run(["dig", "+short", "+tries=1", "+time=1", "@127.0.0.1", name], check=False)
    s = scrape(host, 9466)
    assert m.value(s, "serval_dns_queries_total") == 4
    assert m.value(s, "process_resident_memory_bytes") > 0                # the library's process collector
    om = host.run(["curl", "-sS", "--fail", "-m", "5", "-H", "Accept: application/openmetrics-text;version=1.0.0",
                   "http://127.0.0.1:9466/metrics"]).stdout
    (queries,) = [f for f in openmetrics_families(om) if f.name == "serval_dns_queries"]
    assert queries.type == "counter" and queries.samples[0].value == 4
    assert m.value(s, "serval_dns_query_results_total", result="zone") == 3
    assert m.value(s, "serval_dns_query_results_total", result="servfail") == 1     # no upstreams
    assert m.value(s, "serval_dns_mappings") == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert all({"time", "level", "logger", "message", "event"} <= set(o) for o in lines)
    allocated = [o for o in lines if o["event"] == "allocated"]
    assert [(o["name"], o["level"]) for o in allocated] == [("web.svc.example", "info")]
    assert lines[-1]["event"] == "stopped"


@pytest.fixture(autouse=True)
def _needs_curl():
    import shutil
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
