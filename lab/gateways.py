"""Run the gateway pair on a lab's namespaces: configs written, daemons started and
stopped, their control sockets queried. Used by the demo, the tests and the benchmarks."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.topologies import GatewayPair

REPO = Path(__file__).resolve().parent.parent
VIRTUAL_ADDR = "198.18.0.10"
METRICS_PORT = 9464               # with metrics=True, each gateway serves 127.0.0.1:9464 in its namespace
SERVICE = "web.svc.example"


class GatewayError(RuntimeError):
    pass


class RunningGateways:
    """A client and a server gateway on ``pair.cgw`` and ``pair.sgw``."""

    def __init__(self, pair: GatewayPair, carriage: str = "ip", client_address: str = "gateway",
                 backend_port: int = 8080, service_port: int = 80, extra_services=(),
                 client_extra: str = "", metrics: bool = False, fast_path: str | None = None,
                 sidecar: bool = False):
        """``client_extra``: TOML appended to the client gateway's config (a section);
        ``metrics``: both gateways serve Prometheus metrics (``scrape(role)``);
        ``fast_path``: "on", "off" or "auto" in both configs (None: the default);
        ``sidecar``: the server gateway runs in the server's own namespace (as in
        docker-compose), the client gateway's next hop is the server, and ``sgw``
        only routes."""
        self.pair = pair
        self.sidecar = sidecar
        self.hosts = {"client": pair.cgw, "server": pair.server if sidecar else pair.sgw}
        self.dir = Path(tempfile.mkdtemp(prefix="serval-lab-"))
        self.carriage = carriage
        tag = pair.cgw.ns.split("-")[0]
        self.sockets = {"client": f"/run/serval/{tag}-client.sock", "server": f"/run/serval/{tag}-server.sock"}
        services = [(SERVICE, service_port, VIRTUAL_ADDR, backend_port), *extra_services]
        self.configs = {
            "client": self._write("client.toml", client_config(pair, carriage, self.sockets["client"], services,
                                                               pair.server_addr if sidecar else pair.sgw_sal)
                                  + "\n" + client_extra),
            "server": self._write("server.toml", server_config(pair, carriage, self.sockets["server"],
                                                               client_address, services)),
        }
        if fast_path is not None:
            for path in self.configs.values():
                path.write_text(path.read_text().replace(
                    "[gateway]\n", f'[gateway]\nfast_path = "{fast_path}"\n', 1))
        level = os.environ.get("SERVAL_LAB_LOG_LEVEL")     # "debug" to follow every flow
        if level:
            for path in self.configs.values():
                path.write_text(path.read_text().replace("[gateway]\n", f'[gateway]\nlog_level = "{level}"\n', 1))
        if metrics:
            for path in self.configs.values():
                path.write_text(path.read_text().replace(
                    "[gateway]\n", f'[gateway]\nmetrics = "127.0.0.1:{METRICS_PORT}"\n', 1))
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def start(self, timeout: float = 15.0) -> "RunningGateways":
        for role in ("server", "client"):
            self.launch(role, wait=False)
        for role in ("server", "client"):
            self.wait_up(role, timeout)
        return self

    def launch(self, role: str, wait: bool = True, timeout: float = 15.0) -> None:
        """Start (or start again) one gateway; its log is appended to."""
        host = self.hosts[role]
        log = self.dir / f"{role}.log"
        self.logs[role] = log
        self.procs[role] = host.popen(
            [sys.executable, "-m", "serval", "gateway", role, "--config", str(self.configs[role])],
            stdout=open(log, "a"), stderr=subprocess.STDOUT, cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)})
        if wait:
            self.wait_up(role, timeout)

    def wait_up(self, role: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.procs[role].poll() is not None:
                raise GatewayError(f"{role} gateway exited {self.procs[role].returncode}:\n{self.log(role)}")
            try:
                self.ctl(role, "stats")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise GatewayError(f"{role} gateway did not come up:\n{self.log(role)}")
                time.sleep(0.05)

    def signal(self, role: str, sig: int) -> None:
        self.procs[role].send_signal(sig)

    def ctl(self, role: str, cmd: str):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.sockets[role])
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        reply = json.loads(data)
        if not reply.get("ok"):
            raise GatewayError(reply.get("error"))
        return reply["result"]

    def stats(self, role: str) -> dict:
        return self.ctl(role, "stats")

    def scrape(self, role: str) -> str:
        """The gateway's metrics page, fetched with curl inside its namespace."""
        return self.hosts[role].run(["curl", "-sS", "--fail", "-m", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout

    def log(self, role: str) -> str:
        try:
            return self.logs[role].read_text()[-4000:]
        except (KeyError, OSError):
            return ""

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """SIGTERM both gateways (a clean stop); returns their exit codes."""
        codes = {}
        for role, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for role, proc in self.procs.items():
            try:
                codes[role] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[role] = proc.wait()
        self.procs.clear()
        return codes

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def client_config(pair: GatewayPair, carriage: str, sock: str, services, next_hop: str | None = None) -> str:
    lines = ["[gateway]", f'carriage = "{carriage}"', "queue = 0", f'control_socket = "{sock}"',
             f'sal_address = "{pair.cgw_sal}"', ""]
    for name, port, vaddr, _ in services:
        lines += ["[[service]]", f'name = "{name}"', f'address = "{vaddr}"', f"port = {port}", ""]
    for name in dict.fromkeys(s[0] for s in services):
        lines += ["[[route]]", f'service = "{name}"', f'next_hop = "{next_hop or pair.sgw_sal}"', ""]
    return "\n".join(lines)


def server_config(pair: GatewayPair, carriage: str, sock: str, client_address: str, services) -> str:
    lines = ["[gateway]", f'carriage = "{carriage}"', "queue = 1", f'control_socket = "{sock}"',
             f'client_address = "{client_address}"', ""]
    for name, port, _, backend_port in services:
        lines += ["[[service]]", f'name = "{name}"', f"port = {port}",
                  f'backend = "{pair.server_addr}:{backend_port}"', ""]
    return "\n".join(lines)
