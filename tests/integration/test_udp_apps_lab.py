"""Unmodified UDP applications by name through the resolver, the service routers and two
replicas: TFTP (tftp-hpa's client against tftpd-hpa, whose answers come from a new port
per transfer: the server gateways' TFTP helper) and QUIC (aioquic, 1452-byte datagrams
with DF set on 1500-byte links).

    client --- cgw (+ resolver) ---+--- r0, r1 (service routers)
                                   +--- sgw0 --- srv0 (in.tftpd on :69, QUIC echo on :4433)
                                   +--- sgw1 --- srv1 (the same)

The client's resolv.conf names the resolver on the client gateway, which answers
tftp.svc.example and quic.svc.example with the virtual addresses of the client
gateway's UDP services; each flow's SYN is sent to a replica by a router.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dns_resolver.lab import RunningResolver, resolver_config, wait_listening
from lab.routed import Knobs, RoutedDeployment
from lab.topologies import routed_replicas
from lab.topology import Lab
from tests.integration.helpers import make_file, sha256_file

ZONE = "svc.example"
RESOLVER = "198.19.1.1"                  # the client gateway's LAN address
TFTP, TFTP_VIP = "tftp.svc.example", "198.18.0.69"
QUIC, QUIC_VIP, QUIC_PORT, QUIC_BACKEND_PORT = "quic.svc.example", "198.18.0.44", 443, 4433
FILE_BYTES = 3 * 1024 * 1024 + 123       # not a whole number of 512-byte blocks
QUIC_BYTES = 1024 * 1024
QUIC_ECHO = Path(__file__).resolve().parent / "quic_echo.py"
MAX_DATAGRAM = 1452                      # quic_echo.py's: the largest a 1500-byte path carries


def _missing() -> list[str]:
    tools = [t for t in ("/usr/sbin/in.tftpd", "/usr/bin/tftp") if not os.access(t, os.X_OK)]
    try:
        import aioquic  # noqa: F401
    except ImportError:
        tools.append("aioquic (pip install -e .[test])")
    return tools


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if _missing():
        # CI installs them (Makefile APT_PACKAGES, setup.cfg's test extras): fail there
        if os.environ.get("SERVAL_REQUIRE_FASTPATH"):
            pytest.fail(f"missing in CI: {', '.join(_missing())}")
        pytest.skip(f"needs {', '.join(_missing())}")
    work = tmp_path_factory.mktemp("udp-apps")
    with Lab() as lab:
        topo = routed_replicas(lab)
        d = RoutedDeployment(topo, Knobs(weights=(1, 1)))
        add_services(d)
        d.work = work
        d.file = make_file(work, "big.bin", FILE_BYTES)
        subprocess.run([sys.executable, str(QUIC_ECHO), "cert", str(work), QUIC], check=True)
        d.tftp_dirs, backends = [], []
        for i, srv in enumerate(topo.servers):
            root = work / f"tftp{i}"
            root.mkdir()
            root.chmod(0o777)
            shutil.copy(d.file, root / "big.bin")
            (root / "big.bin").chmod(0o644)
            d.tftp_dirs.append(root)
            addr = topo.server_addr(i)
            backends.append(srv.popen(["/usr/sbin/in.tftpd", "--foreground", "--address", f"{addr}:69",
                                       "--secure", "--create", "--permissive", "--user", "root", str(root)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_listening(srv, addr, 69, "u", 10, backends[-1])
            backends.append(srv.popen([sys.executable, str(QUIC_ECHO), "serve", addr, str(QUIC_BACKEND_PORT),
                                       str(work / "cert.pem"), str(work / "key.pem")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_listening(srv, addr, QUIC_BACKEND_PORT, "u", 10, backends[-1])
        resolver = RunningResolver(topo.cgw, resolver_config(
            listen=[RESOLVER], allow=["198.19.1.0/24"], zones={ZONE: []}, upstreams=[],
            extra=f'[[zone.service]]\nname = "tftp"\nports = [69]\naddress = "{TFTP_VIP}"\n'
                  f'[[zone.service]]\nname = "quic"\nports = [{QUIC_PORT}]\naddress = "{QUIC_VIP}"\n'),
            str(work))
        try:
            resolver.start()
            topo.client.write_etc("resolv.conf", f"nameserver {RESOLVER}\n")
            d.start()
            d.wait_for(lambda: all(len(instances(d, r, name)) == 2 for r in ("r0", "r1") for name in (TFTP, QUIC)),
                       10, "both services' two instances registered at both routers")
            yield d
        finally:
            for name in list(d.procs):
                d.kill(name)
            resolver.stop()


def add_services(dep: RoutedDeployment) -> None:
    """The UDP services, in the configs the deployment wrote (before [routing])."""
    for name, path in dep.configs.items():
        if name.startswith("r"):
            continue
        if name == "cgw":
            svc = "".join(f'[[service]]\nname = "{n}"\naddress = "{a}"\nport = {p}\nprotocol = "udp"\n\n'
                          for n, a, p in ((TFTP, TFTP_VIP, 69), (QUIC, QUIC_VIP, QUIC_PORT)))
        else:
            server = dep.topo.server_addr(int(name[3:]))
            svc = (f'[[service]]\nname = "{TFTP}"\nport = 69\nprotocol = "udp"\n'
                   f'backend = "{server}:69"\nhelper = "tftp"\n\n'
                   f'[[service]]\nname = "{QUIC}"\nport = {QUIC_PORT}\nprotocol = "udp"\n'
                   f'backend = "{server}:{QUIC_BACKEND_PORT}"\n\n')
        text = path.read_text()
        path.write_text(text.replace("[routing]\n", svc + "[routing]\n", 1))


def instances(dep, router: str, name: str) -> set:
    return {row["instance"] for row in dep.ctl(router, "services")
            if row["service"] == name and row["health"] == "registered"}


def stat(dep, name: str, key: str) -> int:
    return dep.ctl(name, "stats").get(key, 0)


def tftp(dep, command: str) -> subprocess.CompletedProcess:
    """tftp-hpa's client by name, one command (binary mode)."""
    return dep.topo.client.run(["tftp", "-m", "binary", TFTP, "69", "-c", *command.split()], check=False, timeout=60)


def test_tftp_get_by_name_from_a_replica_that_answers_from_a_new_port(dep):
    before = sum(stat(dep, f"sgw{i}", "tftp_transfer_ports") for i in (0, 1))
    out = dep.work / "got.bin"
    r = tftp(dep, f"get big.bin {out}")
    assert out.exists() and sha256_file(out) == sha256_file(dep.file), (r.stdout, r.stderr)
    assert out.stat().st_size == FILE_BYTES
    # the transfer ran on the server's new port, taken by the helper, on one SAL flow
    assert sum(stat(dep, f"sgw{i}", "tftp_transfer_ports") for i in (0, 1)) == before + 1
    assert stat(dep, "cgw", "dropped_udp_too_big") == 0


def test_tftp_put_by_name_lands_on_one_replica(dep):
    before = sum(stat(dep, f"sgw{i}", "tftp_transfer_ports") for i in (0, 1))
    up = make_file(dep.work, "up.bin", FILE_BYTES)
    r = tftp(dep, f"put {up} up.bin")
    landed = [d / "up.bin" for d in dep.tftp_dirs if (d / "up.bin").exists()]
    assert len(landed) == 1, (landed, r.stdout, r.stderr)
    assert sha256_file(landed[0]) == sha256_file(up), (r.stdout, r.stderr)
    assert sum(stat(dep, f"sgw{i}", "tftp_transfer_ports") for i in (0, 1)) == before + 1


def test_quic_by_name_carries_a_megabyte_each_way(dep):
    r = dep.topo.client.run([sys.executable, str(QUIC_ECHO), "get", QUIC, str(QUIC_PORT),
                             str(dep.work / "cert.pem"), str(QUIC_BYTES)], check=False, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["got"] == got["sent"] == QUIC_BYTES and got["got_sha256"] == got["sent_sha256"], got
    # 1452-byte datagrams with DF (the server's, full of echoed data) fit the 1500-byte
    # links with the SAL header added: carried whole, none refused as too big
    assert got["largest_datagram_received"] == MAX_DATAGRAM, got
    for name in ("cgw", "sgw0", "sgw1"):
        assert stat(dep, name, "dropped_udp_too_big") == 0, name
