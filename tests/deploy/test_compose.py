"""docker-compose.yml for real: build, up, a page by name from the legacy client, a
replica stopped and restarted, `down -v` leaving nothing behind.

Needs a Docker engine and docker-compose, root, and a few minutes the first time (a base
image made by debootstrap, the image built); so it runs only when asked:

    make test-compose                 # or SERVAL_TEST_COMPOSE=1 pytest tests/deploy

CI always asks (.ci/run). Asked for but impossible (no engine, no docker-compose): fail,
never skip, so a CI run cannot pass without having run it.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = "serval-compose-test"
NAME = "web.svc.example"
ASKED = os.environ.get("SERVAL_TEST_COMPOSE") == "1"

pytestmark = [pytest.mark.skipif(not ASKED, reason="the compose deployment test runs with "
                                 "`make test-compose` (SERVAL_TEST_COMPOSE=1); it needs Docker"),
              pytest.mark.timeout(900)]


def docker_bin() -> str:
    return os.environ.get("DOCKER") or shutil.which("docker") or "docker"


def compose(*args, check=True, timeout=300, quiet=False) -> subprocess.CompletedProcess:
    argv = ["docker-compose", "--ansi", "never", "-p", PROJECT, "-f", str(REPO / "docker-compose.yml"),
            "--project-directory", str(REPO), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    if check and r.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def docker(*args, check=True, timeout=60) -> subprocess.CompletedProcess:
    r = subprocess.run([docker_bin(), *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r


def leftovers() -> dict:
    """What the project still has: containers, networks, volumes (by compose's label)."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {kind: docker(*cmd, "--filter", label, "-q").stdout.split()
            for kind, cmd in (("containers", ("ps", "-a")), ("networks", ("network", "ls")),
                              ("volumes", ("volume", "ls")))}


def states() -> dict:
    """service -> (state, health) of every container of the project."""
    ids = compose("ps", "-q").stdout.split()
    out = {}
    for info in json.loads(docker("inspect", *ids).stdout) if ids else []:
        service = info["Config"]["Labels"]["com.docker.compose.service"]
        out[service] = (info["State"]["Status"], (info["State"].get("Health") or {}).get("Status"))
    return out


def wait_healthy(services=None, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = states()
        waiting = {s: v for s, v in now.items()
                   if (services is None or s in services) and s != "keygen" and
                   (v[0] != "running" or v[1] not in (None, "healthy"))}
        if not waiting and (services is None or set(services) <= set(now)):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not healthy after {timeout:.0f} s: {waiting}\n"
                                 f"{compose('logs', '--tail=30', check=False).stdout[-6000:]}")
        time.sleep(1)


def fetch(timeout=10) -> subprocess.CompletedProcess:
    """The legacy client: plain curl, by name."""
    return compose("exec", "-T", "client", "curl", "-sS", "--fail", "-m", str(timeout),
                   f"http://{NAME}/", check=False, timeout=timeout + 30)


def ctl(service: str, sock: str, what: str) -> list | dict:
    r = compose("exec", "-T", service, "serval", "ctl", "--socket", sock, "--json", what)
    return json.loads(r.stdout)


def router_instances() -> int:
    rows = ctl("router", "/run/serval/router.sock", "names")
    return sum(r["instances"] for r in rows if r["name"] == NAME)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)
    return value


@pytest.fixture(scope="module")
def deployment():
    if os.geteuid() != 0:
        pytest.fail("the compose test needs root (it may install and start a Docker engine)")
    t0 = time.monotonic()
    # Docker engine, debian:bookworm-slim made locally, wheels: each cached after the first run
    prep = subprocess.run([str(REPO / "deploy" / "build-base-image.sh")], text=True, capture_output=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert shutil.which("docker-compose"), "docker-compose is missing"
    t_prep = time.monotonic()
    compose("down", "-v", "--remove-orphans", check=False)      # a crashed earlier run
    compose("build", timeout=900)
    t_build = time.monotonic()
    try:
        compose("up", "-d")
        wait_healthy()
        t_up = time.monotonic()
        print(f"\ncompose timings: engine+base+wheels {t_prep - t0:.1f} s, build {t_build - t_prep:.1f} s, "
              f"up until healthy {t_up - t_build:.1f} s")
        yield
    finally:
        logs = compose("logs", "--tail=40", check=False).stdout
        down = compose("down", "-v", "--remove-orphans", "-t", "10", check=False)
        left = leftovers()
        print(f"compose down -v: {time.monotonic() - t0:.1f} s since the start")
        assert down.returncode == 0, down.stderr
        assert not any(left.values()), f"left behind: {left}\n{logs[-4000:]}"


def test_page_by_name_from_the_legacy_client(deployment):
    r = compose("exec", "-T", "client", "getent", "hosts", NAME, check=False)
    assert r.returncode == 0, r.stderr
    address = r.stdout.split()[0]
    assert address.startswith("198.18."), r.stdout
    answers = set()
    for _ in range(20):
        r = fetch()
        assert r.returncode == 0, (r.stderr, compose("logs", "--tail=20", "client-gateway", check=False).stdout)
        answers.add(r.stdout.strip())
    # late binding through the router: both replicas answer
    assert answers == {"hello from web-1", "hello from web-2"}, answers
    assert router_instances() == 2
    stats = ctl("client-gateway", "/run/serval-ctl/client.sock", "stats")
    assert stats.get("flows_established", 0) >= 20, stats
    # the replies came through the kernel's fast path (sidecars: SAL in at tc ingress)
    assert stats["fastpath"] == "on" and stats["fastpath_from_sal"] > 0, stats
    for replica in ("server-gateway-1", "server-gateway-2"):
        assert ctl(replica, "/run/serval/server.sock", "stats")["fastpath"] == "on"


def test_what_serval_ctl_shows(deployment):
    rows = ctl("server-gateway-1", "/run/serval/server.sock", "services")
    assert [(r["service"], r["health"], r["state"]) for r in rows] == [(f"{NAME}:80", "up", "registered")]
    hops = ctl("client-gateway", "/run/serval-ctl/client.sock", "services")
    assert [h["health"] for h in hops] == ["live"], hops
    text = compose("exec", "-T", "router", "serval", "ctl", "--socket", "/run/serval/router.sock", "names").stdout
    assert NAME in text


def test_allocations_survive_a_resolver_restart(deployment):
    def mapping():
        r = compose("exec", "-T", "resolver", "cat", "/var/lib/serval/mappings.json")
        return {m["name"]: m for m in json.loads(r.stdout)["mappings"]}.get(NAME)

    assert fetch().returncode == 0
    before = mapping()
    assert before is not None
    compose("restart", "resolver")
    wait_healthy(["resolver"], timeout=60)
    after = mapping()
    assert (after["address"], after["allocated"]) == (before["address"], before["allocated"])
    assert fetch().returncode == 0


def test_one_replica_stopped_new_requests_still_succeed(deployment):
    assert fetch().returncode == 0
    compose("stop", "web-1")
    stopped = time.monotonic()
    results = [fetch() for _ in range(10)]
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    assert {r.stdout.strip() for r in results} == {"hello from web-2"}
    print(f"10 requests with web-1 stopped: {time.monotonic() - stopped:.1f} s")
    wait_for(lambda: router_instances() == 1, 10, "the router to forget web-1")
    # back: `up -d` starts web-1, and its sidecar joins web-1's new namespace
    compose("up", "-d")
    wait_healthy(timeout=60)
    wait_for(lambda: router_instances() == 2, 20, "web-1 registered again")
    answers = {fetch().stdout.strip() for _ in range(20)}
    assert answers == {"hello from web-1", "hello from web-2"}, answers


def test_a_crashed_replica_is_restarted_and_its_sidecar_follows(deployment):
    """restart: unless-stopped brings web-2 back in a new network namespace; the sidecar's
    healthcheck notices that its own namespace lost its interface, stops it, and its
    restart policy starts it again in web-2's new namespace."""
    def restarts(service):
        (cid,) = compose("ps", "-q", service).stdout.split()
        return int(docker("inspect", "-f", "{{.RestartCount}}", cid).stdout)

    web, sidecar = restarts("web-2"), restarts("server-gateway-2")
    compose("exec", "-T", "web-2", "sh", "-c", "kill 1")             # the server's PID 1 (docker-init) exits
    wait_for(lambda: restarts("web-2") > web, 30, "web-2 restarted")
    wait_for(lambda: restarts("server-gateway-2") > sidecar, 30, "its sidecar restarted")
    wait_healthy(timeout=60)
    wait_for(lambda: router_instances() == 2, 20, "web-2 registered again")
    answers = {fetch().stdout.strip() for _ in range(20)}
    assert answers == {"hello from web-1", "hello from web-2"}, answers


def test_a_restarted_client_gateway_takes_its_client_along(deployment):
    """The legacy client shares the client gateway's namespace; a restarted gateway has a
    new one, and the client's healthcheck (plain sh) restarts the client into it."""
    assert fetch().returncode == 0
    compose("restart", "client-gateway")
    wait_for(lambda: fetch(timeout=3).returncode == 0, 30, "the client to reach the service again")
    wait_healthy(timeout=60)
    assert fetch().stdout.strip() in ("hello from web-1", "hello from web-2")
