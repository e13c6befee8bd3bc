"""The configs shipped in deploy/ load and run.

* deploy/compose/ and deploy/home-router/ (no Docker, no root): every file the compose
  services and the systemd units name exists, and each is accepted by the daemon that
  reads it, with the addresses the compose networks give.
* deploy/client.toml, server.toml, router.toml and dns.toml, the README's first
  deployment: `--check` accepts each, they agree with each other (one key, one mappings
  file, the router's address, the resolver's zone), and, in namespaces with the
  examples' own addresses, the four daemons start from the files as they are, an
  unmodified client loads a page by name through them, and a clean stop leaves each
  host's rules, routes, qdiscs and sysctls as they were.
"""
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import ruleset, wait_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def with_key(path: Path, tmp_path: Path) -> Path:
    """A copy of ``path`` whose key_file points at a fresh key (the real one is made at
    deployment time: keygen service, or the operator)."""
    key = tmp_path / "deployment.key"
    key.write_text(secrets.token_hex(32) + "\n")
    text = re.sub(r'key_file = "[^"]*"', f'key_file = "{key}"', path.read_text())
    out = tmp_path / path.name
    out.write_text(text)
    return out


def test_compose_mounts_every_config_it_names():
    text = COMPOSE.read_text()
    named = set(re.findall(r"/etc/serval/([\w.-]+\.(?:toml|py))", text))
    assert named >= {"router.toml", "client-gateway.toml", "server-gateway-1.toml",
                     "server-gateway-2.toml", "resolver.toml", "healthcheck.py"}
    for name in named:
        assert (REPO / "deploy" / "compose" / name).is_file(), name
    # fixed subnets, all inside 198.19.0.0/16; fixed addresses inside them
    subnets = [ipaddress.ip_network(s) for s in re.findall(r"subnet: ([\d./]+)", text)]
    assert subnets and all(s.subnet_of(ipaddress.ip_network("198.19.0.0/16")) for s in subnets)
    for addr in re.findall(r"ipv4_address: ([\d.]+)", text):
        assert any(ipaddress.ip_address(addr) in s for s in subnets), addr
    assert not re.search(r"^\s*privileged:", text, re.MULTILINE)            # capabilities, not privileged


def test_compose_configs_load(tmp_path):
    from dns_resolver.config import load as load_dns
    from gateway.config import load as load_gateway
    from router.config import load as load_router

    d = REPO / "deploy" / "compose"
    router = load_router(str(with_key(d / "router.toml", tmp_path)))
    client = load_gateway(str(with_key(d / "client-gateway.toml", tmp_path)), "client")
    assert client.mappings and client.intercept_local
    assert [h for h, _ in client.routing.routers] == [router.address]
    senders = set()
    for i in (1, 2):
        server = load_gateway(str(with_key(d / f"server-gateway-{i}.toml", tmp_path)), "server")
        (svc,) = server.services
        assert svc.backend[0] == server.sal_address      # a sidecar: the server's own address
        senders.add(server.routing.sender)
    assert len(senders) == 2                               # unique per gateway
    dns = load_dns(str(d / "resolver.toml"))
    assert dns.mappings == client.mappings
    assert dns.gateway_control == client.control_socket


@pytest.mark.parametrize("name", ["client.toml", "dns.toml"])
def test_home_router_configs_load(name):
    d = REPO / "deploy" / "home-router"
    if name == "dns.toml":
        from dns_resolver.config import load
        cfg = load(str(d / name))
        assert cfg.mappings
    else:
        from gateway.config import load
        cfg = load(str(d / name), "client")
        assert cfg.intercept_forwarded and cfg.mappings


@pytest.mark.parametrize("unit", ["serval-client-gateway.service", "serval-dns.service"])
def test_systemd_units_verify(unit):
    """systemd-analyze finds nothing wrong but the program, not installed here."""
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (Debian: systemd)")
    r = subprocess.run(["systemd-analyze", "verify", str(REPO / "deploy" / "home-router" / unit)],
                       capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in (r.stdout + r.stderr).splitlines()
                  if line.strip() and "/opt/serval/bin/serval is not executable" not in line]
    assert not complaints, complaints


def test_own_server_image_is_a_one_line_edit(tmp_path):
    """The README's edit: `<<: *demo-server` becomes `image: ...`, and both replicas run
    that image, with nothing of the stand-in left (no build, no command, no user)."""
    import shutil
    import subprocess

    if shutil.which("docker-compose") is None:
        pytest.skip("needs docker-compose (Debian: docker-compose)")
    text = COMPOSE.read_text()
    lines = [line for line in text.splitlines() if line.strip().startswith("<<: *demo-server")]
    assert len(lines) == 1, lines
    edited = tmp_path / "docker-compose.yml"
    edited.write_text(text.replace(lines[0], "  image: registry.example/team/server:1.2"))
    r = subprocess.run(["docker-compose", "-f", str(edited), "--project-directory", str(REPO), "config"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    for name in ("web-1", "web-2"):
        block = re.search(rf"^  {name}:\n((?:    .*\n|      .*\n)+)", r.stdout, re.MULTILINE).group(1)
        assert "image: registry.example/team/server:1.2" in block
        assert "build:" not in block and "command:" not in block and "user:" not in block
        assert "accept_local" in block                     # the sidecar's sysctls stay


# --- the README's first deployment: deploy/{client,server,router,dns}.toml ---------------
DEPLOY = REPO / "deploy"
EXAMPLES = {"client.toml": ["gateway", "client"], "server.toml": ["gateway", "server"],
            "router.toml": ["router"], "dns.toml": ["dns"]}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_passes_check(name, tmp_path):
    """`serval ... --check` as a user runs it; only key_file is pointed at a key made
    here (the examples name /etc/serval/deployment.key, made at deployment time)."""
    path = with_key(DEPLOY / name, tmp_path)
    r = subprocess.run([sys.executable, "-m", "serval", *EXAMPLES[name], "--config", str(path), "--check"],
                       capture_output=True, text=True, timeout=60, cwd=str(REPO), check=False)
    assert r.returncode == 0, r.stderr
    assert f"{path}: ok" in r.stdout


def test_examples_describe_one_deployment(tmp_path):
    """The four examples fit together: a user who changes nothing but the addresses
    gets a working routed set-up."""
    from dns_resolver.config import load as load_dns
    from gateway.config import load as load_gateway
    from router.config import load as load_router
    from sal.service_table import Action

    key_files = {name: re.search(r'^key_file = "([^"]+)"', (DEPLOY / name).read_text(), re.MULTILINE).group(1)
                 for name in ("client.toml", "server.toml", "router.toml")}
    assert len(set(key_files.values())) == 1, key_files                   # one deployment key
    router = load_router(str(with_key(DEPLOY / "router.toml", tmp_path)))
    client = load_gateway(str(with_key(DEPLOY / "client.toml", tmp_path)), "client")
    server = load_gateway(str(with_key(DEPLOY / "server.toml", tmp_path)), "server")
    dns = load_dns(str(DEPLOY / "dns.toml"))
    # the client: names from the resolver, SYNs to the router, nothing static
    assert client.mappings == dns.mappings and client.control_socket == dns.gateway_control
    assert client.virtual_network == dns.virtual_network and not client.services
    assert [(h, p) for h, p in client.routing.routers] == [(router.address, router.registration_port)]
    assert [(r.action, r.next_hop) for r in client.rules] == [(Action.FORWARD, router.address)]
    # the server: registers with that router what the resolver names
    assert [(h, p) for h, p in server.routing.routers] == [(router.address, router.registration_port)]
    assert server.queue != client.queue and server.control_socket != client.control_socket
    zone_services = {svc.name: svc.ports for svc in dns.services}
    for svc in server.services:
        assert svc.port in zone_services[svc.name], (svc.name, svc.port)


def host_state(host) -> dict:
    """What a gateway or router may change on its host and must put back on a clean stop."""
    def run(*argv):
        return host.run(list(argv), check=False).stdout
    links = [line.split(":")[1].strip().split("@")[0] for line in run("ip", "-o", "link", "show").splitlines()]
    return {"rules": ruleset(host), "routes": run("ip", "-4", "route", "show", "table", "all"),
            "policy": run("ip", "-4", "rule", "show"), "qdiscs": run("tc", "qdisc", "show"),
            "sysctls": run("sh", "-c", "grep -H . /proc/sys/net/ipv4/ip_forward "
                           "/proc/sys/net/ipv4/conf/*/rp_filter /proc/sys/net/ipv4/conf/*/accept_local"),
            "offloads": {ifname: run("ethtool", "-k", ifname) for ifname in links}}


# Each daemon sees the examples' paths: /etc/serval (the key), /run/serval (control
# sockets, flow snapshots) and /var/lib/serval (the mappings file) are directories of
# this test, bound over those paths in a private mount namespace of the daemon alone.
PRIVATE_DIRS = ('mount --bind "$1" /etc/serval && mount --bind "$2" /run/serval && '
                'mount --bind "$3" /var/lib/serval && shift 3 && exec "$@"')


@pytest.mark.integration
def test_examples_run_a_first_deployment(lab, tmp_path):
    """The examples unchanged on hosts with their addresses (routed_replicas' first
    replica and router): client gateway and resolver on cgw, router on r0, server gateway
    on sgw0 with the web server beside it; a client host that uses the resolver."""
    from lab.topologies import routed_replicas
    from serval.ctl import request as ctl_request

    topo = routed_replicas(lab, replicas=1, routers=1)
    cgw, r0, sgw = topo.cgw, topo.routers[0], topo.sgws[0]
    client_text = (DEPLOY / "client.toml").read_text()
    server_text = (DEPLOY / "server.toml").read_text()
    router_text = (DEPLOY / "router.toml").read_text()
    # the examples' addresses are the lab's: nothing to rewrite
    for text in (client_text, server_text):
        assert f'routers = ["{topo.router_addr(0)}"]' in text
    assert f'address = "{topo.router_addr(0)}"' in router_text
    backend = re.search(r'^backend = "([\d.]+):(\d+)"', server_text, re.MULTILINE)
    assert backend.group(1) == topo.sgw_sal(0)

    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from an unmodified server\n")
    web = sgw.popen([sys.executable, "-m", "http.server", backend.group(2), "--bind", backend.group(1),
                     "-d", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(sgw, backend.group(1), int(backend.group(2)))
    topo.client.write_etc("resolv.conf", f"nameserver {topo.cgw_lan}\noptions timeout:2 attempts:2\n")

    made = [d for d in ("/etc/serval", "/run/serval", "/var/lib/serval") if not os.path.isdir(d)]
    for d in made:
        os.makedirs(d)
    # the README's steps: one key for the deployment, each host's configs in /etc/serval
    key = secrets.token_hex(32) + "\n"
    dirs = {}
    for where, names in (("a", ("client.toml", "dns.toml")), ("b", ("router.toml",)), ("c", ("server.toml",))):
        dirs[where] = [tmp_path / where / sub for sub in ("etc", "run", "lib")]
        for d in dirs[where]:
            d.mkdir(parents=True)
        etc = dirs[where][0]
        (etc / "deployment.key").write_text(key)
        (etc / "deployment.key").chmod(0o600)
        for name in names:
            (etc / name).write_bytes((DEPLOY / name).read_bytes())
    before = {h.name: host_state(h) for h in (cgw, r0, sgw)}
    procs, logs = {}, {}

    def start(name, host, where, argv):
        logs[name] = tmp_path / f"{name}.log"
        procs[name] = host.popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_DIRS, "sh",
                                  *map(str, dirs[where]), sys.executable, "-m", "serval", *argv],
                                 cwd=str(REPO), stdout=open(logs[name], "w"), stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})

    def log(name):
        return logs[name].read_text()[-3000:]

    def ctl(where, sock, cmd):
        reply = ctl_request(str(dirs[where][1] / sock), cmd)
        assert reply.get("ok"), reply
        return reply["result"]

    def wait_for(check, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log(name)}"
            try:
                if check():
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + \
                "\n".join(f"--- {n}\n{log(n)}" for n in procs)
            time.sleep(0.05)

    try:
        start("router", r0, "b", ["router", "--config", "/etc/serval/router.toml"])
        start("server", sgw, "c", ["gateway", "server", "--config", "/etc/serval/server.toml"])
        start("client", cgw, "a", ["gateway", "client", "--config", "/etc/serval/client.toml"])
        start("dns", cgw, "a", ["dns", "--config", "/etc/serval/dns.toml"])
        wait_for(lambda: any(row["name"] == "web.svc.example" and row["instances"] == 1
                             for row in ctl("b", "router.sock", "names")), "the server gateway's registration")
        wait_for(lambda: all(row.get("health") == "live" for row in ctl("a", "client.sock", "services")),
                 "the router live at the client gateway")
        answer = topo.client.run(["dig", "+short", "web.svc.example"], check=False).stdout.split()
        assert answer and ipaddress.ip_address(answer[0]) in ipaddress.ip_network("198.18.0.0/16"), answer
        page = topo.client.run(["curl", "-sS", "--max-time", "10", "http://web.svc.example/"], check=False)
        assert page.stdout == "hello from an unmodified server\n", (page.stderr, log("client"))
        assert ctl("a", "client.sock", "stats")["flows_opened"] == 1
        # a clean stop (SIGTERM): every daemon exits 0 and its host is as it was
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(30) for name, proc in procs.items()}
        assert codes == dict.fromkeys(procs, 0), {n: log(n) for n in procs}
        for h in (cgw, r0, sgw):
            after = host_state(h)
            for what, value in before[h.name].items():
                assert after[what] == value, f"{h.name}: {what} not as before the start"
    finally:
        for proc in [*procs.values(), web]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for d in reversed(made):
            try:
                os.rmdir(d)
            except OSError:
                pass
