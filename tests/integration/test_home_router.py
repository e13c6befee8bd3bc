"""The home-router deployment (deploy/home-router/) in namespaces: the systemd units'
own command lines and configs on a router namespace, an unmodified LAN host behind it.

    lan 198.19.1.2 --- 198.19.1.1 router 198.19.8.2 --- 198.19.8.1 isp 198.19.9.1 --- 198.19.9.2 sgw --- server
         resolv.conf:       [serval gateway client,        [dnsmasq: the ISP's      [server     [http.server
         198.19.1.1          serval dns, dnsmasq DHCP,      resolver]                gateway]     :8080]
                             NAT on the uplink]

The router runs each unit's ExecStart (the program mapped to this checkout's
``python -m serval``, /etc/serval/X to deploy/home-router/X) in a private mount namespace
where /var/lib/serval and /run/serval are fresh directories, as systemd's StateDirectory=
and RuntimeDirectory= provide them. Its dnsmasq runs deploy/home-router/dnsmasq.conf
beside the DHCP range it had before.
"""
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dns_resolver.lab import Dnsmasq, wait_listening
from lab.topology import Lab
from serval.ctl import request as ctl_request
from tests.integration.helpers import make_file, ruleset, sha256_file, start_http

REPO = Path(__file__).resolve().parents[2]
HOME = REPO / "deploy" / "home-router"
NAME = "web.svc.example"
LAN_HOST, ROUTER_LAN = "198.19.1.2", "198.19.1.1"
UPLINK, UPLINK_NEW, ISP = "198.19.8.2", "198.19.8.12", "198.19.8.1"
SGW = "198.19.9.2"
SERVER = "198.19.3.2"
ISP_NAME, ISP_NAME_ADDR = "host.test", "198.19.99.10"

# systemd's StateDirectory= and RuntimeDirectory=, for one process tree
PRIVATE_DIRS = ('mount --bind "$1" /var/lib/serval && mount --bind "$2" /run/serval && '
                'shift 2 && exec "$@"')


def unit_command(unit: str) -> list[str]:
    """The unit's ExecStart, runnable from this checkout."""
    lines = [line.split("=", 1)[1] for line in (HOME / unit).read_text().splitlines()
             if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert Path(argv[0]).name == "serval", argv
    out = [sys.executable, "-m", "serval"]
    for arg in argv[1:]:
        if arg.startswith("/etc/serval/"):
            arg = str(HOME / arg[len("/etc/serval/"):])
            assert Path(arg).is_file(), arg
        out.append(arg)
    return out


def config_path(unit: str) -> str:
    argv = unit_command(unit)
    return argv[argv.index("--config") + 1]


def server_gateway_config(instance: str, sock: str) -> str:
    return "\n".join(["[gateway]", f'instance = "{instance}"', 'carriage = "ip"', "queue = 1",
                      f'control_socket = "{sock}"',
                      f'sal_address = "{SGW}"', "", "[[service]]", f'name = "{NAME}"', "port = 80",
                      f'backend = "{SERVER}:8080"', ""])


def dhcp_offer(host, ifname: str, timeout: float = 5.0) -> dict:
    """A DHCPDISCOVER from ``host`` on ``ifname``; the OFFER's options {code: bytes}."""
    code = f"""
import os, socket, struct, sys, time
xid = int.from_bytes(os.urandom(4), "big")
mac = bytes.fromhex(open("/sys/class/net/{ifname}/address").read().strip().replace(":", ""))
pkt = struct.pack("!BBBBIHH4s4s4s4s16s64s128sI", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4),
                  bytes(4), bytes(4), mac, b"", b"", 0x63825363)
pkt += bytes([53, 1, 1, 55, 3, 1, 3, 6, 255])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"{ifname}")
s.bind(("0.0.0.0", 68))
s.settimeout(0.5)
deadline = time.monotonic() + {timeout}
while time.monotonic() < deadline:
    s.sendto(pkt, ("255.255.255.255", 67))
    try:
        data = s.recv(2048)
    except socket.timeout:
        continue
    if len(data) > 240 and struct.unpack("!I", data[4:8])[0] == xid:
        print(data[240:].hex())
        sys.exit(0)
sys.exit(1)
"""
    r = host.run([sys.executable, "-c", code], check=False, timeout=timeout + 10)
    assert r.returncode == 0, f"no DHCP offer: {r.stderr}"
    raw, options, i = bytes.fromhex(r.stdout.strip()), {}, 0
    while i < len(raw) and raw[i] != 255:
        if raw[i] == 0:
            i += 1
            continue
        options[raw[i]] = raw[i + 2:i + 2 + raw[i + 1]]
        i += 2 + raw[i + 1]
    return options


@pytest.fixture
def home(lab: Lab, tmp_path):
    lan, router, isp, sgw, server = (lab.add_host(n) for n in ("lan", "router", "isp", "sgw", "server"))
    lan_if, router_lan_if = lab.link(lan, router, f"{LAN_HOST}/24", f"{ROUTER_LAN}/24")
    uplink_if, _ = lab.link(router, isp, f"{UPLINK}/24", f"{ISP}/24")
    lab.link(isp, sgw, "198.19.9.1/24", f"{SGW}/24")
    lab.link(sgw, server, "198.19.3.1/24", f"{SERVER}/24")
    lan.default_route(ROUTER_LAN)
    router.default_route(ISP)
    sgw.default_route("198.19.9.1")
    for h in (router, isp, sgw):
        h.sysctl("net.ipv4.ip_forward", 1)
    router.sysctl("net.ipv4.conf.all.promote_secondaries", 1)     # a new uplink address replaces the old
    # an ordinary home router: NAT on the uplink, its own resolver from the ISP; and the
    # guide's one firewall step: the gateway's SAL packets (IP protocol 144) stay out of
    # the NAT. (Without it a packet still sent from the old uplink address right after a
    # change is masqueraded to the new one, and the conntrack entry that makes sends the
    # peer's RSYN-ACK to the old address: the move fails, now and then.)
    router.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", uplink_if, "-j", "MASQUERADE"])
    router.run(["iptables", "-t", "nat", "-I", "POSTROUTING", "-o", uplink_if, "-p", "144", "-j", "RETURN"])
    router.write_etc("resolv.conf", f"nameserver {ISP}\n")
    Dnsmasq(isp, ISP, args=["--no-resolv", f"--host-record={ISP_NAME},{ISP_NAME_ADDR}"],
            log_dir=str(tmp_path)).start()
    # the LAN host: what DHCP gave it, DNS included (the router)
    lan.write_etc("resolv.conf", f"nameserver {ROUTER_LAN}\noptions timeout:2 attempts:2\n")

    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from an unmodified server\n")
    start_http(server, www)
    tag = router.ns.split("-")[0]
    sgw_sock = f"/run/serval/{tag}-hr-server.sock"
    (tmp_path / "server.toml").write_text(server_gateway_config(f"{tag}-hr-server", sgw_sock))
    sgw_proc = sgw.popen([sys.executable, "-m", "serval", "gateway", "server", "--config",
                          str(tmp_path / "server.toml")], cwd=str(REPO),
                         stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                         env={**os.environ, "PYTHONPATH": str(REPO)})

    # the router's StateDirectory and RuntimeDirectory
    state, run = tmp_path / "var-lib-serval", tmp_path / "run-serval"
    state.mkdir()
    run.mkdir(mode=0o750)
    made_mountpoint = not os.path.isdir("/var/lib/serval")
    os.makedirs("/var/lib/serval", exist_ok=True)
    os.makedirs("/run/serval", exist_ok=True)
    before = ruleset(router)
    procs, logs = {}, {}
    for unit in ("serval-client-gateway.service", "serval-dns.service"):
        logs[unit] = tmp_path / f"{unit}.log"
        procs[unit] = router.popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_DIRS,
                                    "sh", str(state), str(run), *unit_command(unit)],
                                   cwd=str(REPO), stdout=open(logs[unit], "w"), stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
    log = lambda unit: logs[unit].read_text()[-4000:]
    try:
        sock = run / "client.sock"
        deadline = time.monotonic() + 20
        while True:
            for unit, proc in procs.items():
                assert proc.poll() is None, f"{unit} exited {proc.returncode}:\n{log(unit)}"
            try:
                ctl_request(str(sock), "stats")
                ctl_request(sgw_sock, "stats")
                break
            except OSError:
                assert time.monotonic() < deadline, f"not up:\n{log('serval-client-gateway.service')}"
                time.sleep(0.1)
        wait_listening(router, ROUTER_LAN, 53, "t", 20, procs["serval-dns.service"],
                       lambda: log("serval-dns.service"))
        yield type("Home", (), dict(lab=lab, lan=lan, router=router, isp=isp, sgw=sgw, server=server,
                                    lan_if=lan_if, router_lan_if=router_lan_if, uplink_if=uplink_if,
                                    www=www, sock=str(sock), state=state, tmp=tmp_path, procs=procs,
                                    log=log))
        # a clean stop (SIGTERM, as systemctl stop): exit 0, the router's rules as they were
        codes = {}
        for unit, proc in procs.items():
            proc.terminate()
        for unit, proc in procs.items():
            codes[unit] = proc.wait(20)
        assert codes == {u: 0 for u in procs}, {u: log(u) for u in procs}
        assert ruleset(router) == before
    finally:
        for proc in [*procs.values(), sgw_proc]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if made_mountpoint:
            try:
                os.rmdir("/var/lib/serval")
            except OSError:
                pass


def test_lan_host_reaches_a_service_by_name(home):
    lan = home.lan
    r = lan.run(["getent", "hosts", NAME], check=False)
    assert r.returncode == 0, (r.stderr, home.log("serval-dns.service"))
    address = r.stdout.split()[0]
    assert address.startswith("198.18."), r.stdout
    # the resolver's allocation is in the state directory the gateway reads
    assert address in (home.state / "mappings.json").read_text()
    # every other name resolves as before: through the router, to the ISP's resolver
    r = lan.run(["getent", "hosts", ISP_NAME], check=False)
    assert r.stdout.split()[:1] == [ISP_NAME_ADDR], (r.stdout, r.stderr)
    r = lan.run(["curl", "-sS", "--fail", "-m", "20", f"http://{NAME}/"], check=False, timeout=30)
    assert r.returncode == 0, (r.stderr, home.log("serval-client-gateway.service"))
    assert r.stdout == "hello from an unmodified server\n"
    # what `serval ctl` shows on the router
    stats = ctl_request(home.sock, "stats")["result"]
    assert stats.get("flows_established", 0) >= 1, stats
    # the router's NAT applies to every translated packet: the fast path does not
    # hand them past it (fast_path_redirect = "auto" found the masquerade)
    if os.environ.get("SERVAL_REQUIRE_FASTPATH") or stats.get("fastpath") == "on":
        assert stats["fastpath_redirect"] == "off", stats
        assert "fast path redirect off (2 iptables rule(s) in table nat)" in \
            home.log("serval-client-gateway.service")
    r = home.router.run([sys.executable, "-m", "serval", "ctl", "--socket", home.sock, "stats"],
                        check=False, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "flows_established" in r.stdout, r.stderr


def test_a_transfer_survives_a_new_uplink_address(home):
    timeout = 120
    src = make_file(home.www, "40MB.bin", 40 * 1024 * 1024)
    out = home.tmp / "got.bin"
    dl = home.lan.popen(["curl", "-sS", "--fail", "-m", str(timeout), "--limit-rate", "20M", "-o", str(out),
                         f"http://{NAME}/40MB.bin"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (out.exists() and out.stat().st_size >= 8 * 1024 * 1024):
        assert dl.poll() is None, dl.stderr.read()
        assert time.monotonic() < deadline, "the transfer did not start"
        time.sleep(0.05)
    # the ISP hands out a new address (DHCP renew, PPPoE reconnect): the old one goes
    home.router.run(["ip", "addr", "add", f"{UPLINK_NEW}/24", "dev", home.uplink_if])
    home.router.run(["ip", "addr", "del", f"{UPLINK}/24", "dev", home.uplink_if])
    _, err = dl.communicate(timeout=timeout + 10)
    assert dl.returncode == 0, (err, home.log("serval-client-gateway.service"))
    assert sha256_file(out) == sha256_file(src)
    stats = ctl_request(home.sock, "stats")["result"]
    assert stats["migrations_completed"] == 1, stats
    assert stats.get("flows_reset", 0) == 0, stats
    # and new connections go from the new address
    r = home.lan.run(["curl", "-sS", "--fail", "-m", "20", f"http://{NAME}/"], check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    flows = ctl_request(home.sock, "flows")["result"]
    assert flows, flows


def test_dnsmasq_example_hands_out_the_router_as_dns_server(home):
    """deploy/home-router/dnsmasq.conf beside the router's own DHCP settings: a DHCP offer
    names the router as DNS server, and dnsmasq's DNS is off port 53 (serval dns has it)."""
    from dns_resolver.lab import dig

    leases = home.tmp / "leases"
    argv = ["dnsmasq", "--keep-in-foreground", f"--conf-file={HOME / 'dnsmasq.conf'}",
            # what the router's own dnsmasq config had already: its LAN, a range, local names
            f"--interface={home.router_lan_if}", "--dhcp-range=198.19.1.100,198.19.1.199,12h",
            f"--dhcp-leasefile={leases}", "--no-hosts", "--no-resolv", "--host-record=printer.lan,198.19.1.50",
            "--user=root", "--group=root", "--pid-file=", "--log-facility=-"]
    proc = home.router.popen(argv, stdout=open(home.tmp / "dnsmasq-router.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while dig(home.router, "127.0.0.1", "printer.lan", port=5300, timeout=1).values() != ["198.19.1.50"]:
            assert proc.poll() is None, (home.tmp / "dnsmasq-router.log").read_text()
            assert time.monotonic() < deadline, "dnsmasq does not answer on port 5300"
        options = dhcp_offer(home.lan, home.lan_if)
        assert options[53] == bytes([2])                                  # DHCPOFFER
        assert socket.inet_ntoa(options[6]) == ROUTER_LAN                 # DNS: the router
        # serval dns still has port 53 of the LAN address
        assert dig(home.lan, ROUTER_LAN, NAME).values()[0].startswith("198.18.")
    finally:
        proc.terminate()
        proc.wait(10)
