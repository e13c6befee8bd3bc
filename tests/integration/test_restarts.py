"""Restarts during live traffic: SIGHUP reloads, SIGTERM drains, kill -9 resumes."""
import os
import signal
import subprocess
import sys
import time

from lab.gateways import REPO, VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import make_file, ruleset, sha256_file, start_http


def build(lab, tmp_path, client_extra=""):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    pair = gateway_pair(lab, server_route_back=False)
    before = {h.name: ruleset(h) for h in (pair.cgw, pair.sgw)}
    gws = RunningGateways(pair, client_extra=client_extra).start()
    start_http(pair.server, www)
    return pair, gws, before, www


def download(pair, out, rate="10M", name="30MB.bin"):
    return pair.client.popen(["curl", "-sS", "--fail", "-m", "120", "--limit-rate", rate, "-o", str(out),
                              f"http://{VIRTUAL_ADDR}/{name}"], stderr=subprocess.PIPE, text=True)


def wait_size(path, size, timeout=30):
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size >= size):
        assert time.monotonic() < deadline, f"{path} stuck"
        time.sleep(0.02)


def curl(pair, url, timeout=10):
    return pair.client.run(["curl", "-sS", "--fail", "-m", str(timeout), url], check=False, timeout=timeout + 5)


def finish(pair, gws, before):
    assert gws.stop() == {"client": 0, "server": 0}
    for h in (pair.cgw, pair.sgw):
        assert ruleset(h) == before[h.name]


def test_sighup_reloads_without_dropping_flows(lab, tmp_path):
    pair, gws, before, www = build(lab, tmp_path)
    src = make_file(www, "30MB.bin", 30 * 1024 * 1024)
    out = tmp_path / "got.bin"
    dl = download(pair, out)
    wait_size(out, 3 * 1024 * 1024)
    # a second virtual address for the same service, added to the running gateway
    cfg = gws.configs["client"]
    text = cfg.read_text()
    cfg.write_text(text + '\n[[service]]\nname = "web.svc.example"\naddress = "198.18.0.20"\nport = 80\n')
    gws.signal("client", signal.SIGHUP)
    deadline = time.monotonic() + 5
    while curl(pair, "http://198.18.0.20/", timeout=2).returncode and time.monotonic() < deadline:
        time.sleep(0.2)
    assert curl(pair, "http://198.18.0.20/").stdout == "hello\n"
    # a broken config is refused and the gateway keeps serving
    cfg.write_text(text + "\n[gateway\n")
    gws.signal("client", signal.SIGHUP)
    time.sleep(0.5)
    assert "reload refused" in gws.log("client")
    assert curl(pair, f"http://{VIRTUAL_ADDR}/").stdout == "hello\n"
    cfg.write_text(text)
    _, err = dl.communicate(timeout=120)
    assert dl.returncode == 0, err
    assert sha256_file(out) == sha256_file(src)
    finish(pair, gws, before)


def test_sigterm_drains_then_removes_every_rule(lab, tmp_path):
    pair, gws, before, www = build(lab, tmp_path)
    src = make_file(www, "20MB.bin", 20 * 1024 * 1024)
    out = tmp_path / "got.bin"
    dl = download(pair, out, rate="10M", name="20MB.bin")           # ~2 s
    wait_size(out, 4 * 1024 * 1024)
    gws.signal("client", signal.SIGTERM)
    time.sleep(0.3)
    r = curl(pair, f"http://{VIRTUAL_ADDR}/", timeout=3)                  # refused at once
    assert r.returncode == 7, r.stderr           # curl: could not connect (a RST, not a time-out)
    _, err = dl.communicate(timeout=60)                                   # the live one finishes
    assert dl.returncode == 0, err
    assert sha256_file(out) == sha256_file(src)
    assert gws.procs["client"].wait(15) == 0
    assert "draining" in gws.log("client")
    assert ruleset(pair.cgw) == before[pair.cgw.name]
    finish(pair, gws, before)


def test_kill_9_then_restart_resumes_live_flows(lab, tmp_path):
    pair, gws, before, www = build(lab, tmp_path)
    src = make_file(www, "30MB.bin", 30 * 1024 * 1024)
    out = tmp_path / "got.bin"
    dl = download(pair, out)
    wait_size(out, 5 * 1024 * 1024)
    time.sleep(1.2)                           # a snapshot is written every second
    gws.signal("client", signal.SIGKILL)
    gws.procs["client"].wait(5)
    gws.launch("client")                      # cleans up the dead run's rules, resumes its flows
    assert "resumed 1 established flow" in gws.log("client")
    _, err = dl.communicate(timeout=120)
    assert dl.returncode == 0, err
    assert sha256_file(out) == sha256_file(src)
    assert curl(pair, f"http://{VIRTUAL_ADDR}/").stdout == "hello\n"
    finish(pair, gws, before)                  # the restarted run's rules go too: as before start


def test_a_second_copy_of_a_running_gateway_refuses_and_changes_nothing(lab, tmp_path):
    pair, gws, before, www = build(lab, tmp_path)
    running = ruleset(pair.cgw)
    second = pair.cgw.run([sys.executable, "-m", "serval", "gateway", "client", "--config",
                           str(gws.configs["client"])], check=False, timeout=30, cwd=str(REPO),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert second.returncode == 1
    assert "already answers" in second.stdout + second.stderr
    assert ruleset(pair.cgw) == running                    # the running one's rules stay
    assert curl(pair, f"http://{VIRTUAL_ADDR}/").stdout == "hello\n"
    finish(pair, gws, before)


def test_a_steady_flow_older_than_the_resume_window_is_resumed(lab, tmp_path):
    """The snapshot of an unchanged flow table stays current: a flow that has been
    steady longer than resume_window still resumes after a kill -9."""
    pair, gws, before, www = build(lab, tmp_path)
    cfg = gws.configs["client"]
    cfg.write_text(cfg.read_text().replace("[gateway]\n", "[gateway]\nresume_window = 2\n", 1))
    gws.stop()
    gws.start()
    src = make_file(www, "30MB.bin", 30 * 1024 * 1024)
    out = tmp_path / "got.bin"
    dl = download(pair, out, rate="6M")
    wait_size(out, 2 * 1024 * 1024)
    time.sleep(3.5)                      # steady: nothing opened or closed for > resume_window
    gws.signal("client", signal.SIGKILL)
    gws.procs["client"].wait(5)
    gws.launch("client")
    assert "resumed 1 established flow" in gws.log("client"), gws.log("client")
    _, err = dl.communicate(timeout=120)
    assert dl.returncode == 0, err
    assert sha256_file(out) == sha256_file(src)
    finish(pair, gws, before)


def wait_snapshot(since: float, instance: str, timeout=10.0):
    """Until the gateway has written a flow snapshot with a live flow after ``since``."""
    import glob
    import json
    deadline = time.monotonic() + timeout
    while True:
        for path in glob.glob(f"/run/serval/{instance}.net*.flows.json"):
            try:
                if os.path.getmtime(path) > since and json.load(open(path)).get("flows"):
                    return
            except (OSError, ValueError):
                pass
        assert time.monotonic() < deadline, "no flow snapshot written"
        time.sleep(0.05)


def test_the_server_gateway_killed_for_12_s_mid_download_fails_closed_and_resumes(lab, tmp_path):
    """With every packet in Python (fast path off), the backend's packets meet no daemon
    while it is down: they are dropped (its TCP resends), never answered by the server
    gateway's own TCP with a RST; the restart resumes the flow, however long it has
    been steady, within the resume window."""
    pair, gws, before, www = build(lab, tmp_path)
    gws.stop()
    for path in gws.configs.values():
        path.write_text(path.read_text().replace("[gateway]\n", '[gateway]\nfast_path = "off"\n', 1))
    gws.start()
    src = make_file(www, "30MB.bin", 30 * 1024 * 1024)
    out = tmp_path / "got.bin"
    started = time.time()
    dl = download(pair, out, rate="3M")
    wait_size(out, 2 * 1024 * 1024)
    wait_snapshot(started, "server")
    gws.signal("server", signal.SIGKILL)
    gws.procs["server"].wait(5)
    down_at = out.stat().st_size
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:        # the outage: the download must not die in it
        assert dl.poll() is None, dl.communicate()[1]
        time.sleep(0.2)
    gws.launch("server")
    assert "resumed 1 established flow" in gws.log("server"), gws.log("server")
    _, err = dl.communicate(timeout=150)
    assert dl.returncode == 0, err
    assert out.stat().st_size > down_at
    assert sha256_file(out) == sha256_file(src)
    finish(pair, gws, before)


def test_after_kill_9_the_gateway_hosts_own_processes_still_reach_services(lab, tmp_path):
    """The route to the virtual range that a crashed run added is removed by the next
    start's clean-up, and added again (it was planned while the stale one still stood)."""
    pair, gws, before, www = build(lab, tmp_path)
    url = f"http://{VIRTUAL_ADDR}/"
    assert pair.cgw.run(["curl", "-sS", "--fail", "-m", "10", url], check=False).stdout == "hello\n"
    gws.signal("client", signal.SIGKILL)
    gws.procs["client"].wait(5)
    gws.launch("client")
    r = pair.cgw.run(["curl", "-sS", "--fail", "-m", "10", url], check=False)
    assert r.stdout == "hello\n", r.stderr
    finish(pair, gws, before)
