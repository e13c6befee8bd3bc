"""The configs shipped in deploy/compose/ and deploy/home-router/ load (no Docker, no
root): every file the compose services and the systemd units name exists, and each is
accepted by the daemon that reads it, with the addresses the compose networks give."""
import ipaddress
import re
import secrets
from pathlib import Path

import pytest

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
