"""The resolver and Debian's dnsmasq in lab namespaces: started, stopped, asked with
``dig``. Used by the DNS integration tests and by ``python -m bench.dns``.

Nothing here runs at import time of the resolver itself; it needs root and the lab
(``lab/topology.py``) only when called.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class LabError(RuntimeError):
    pass


def wait_listening(host, address: str, port: int, proto: str = "u", timeout: float = 10.0, proc=None,
                   log=None) -> None:
    """Wait until something listens on ``address``:``port`` (``proto`` 'u' UDP, 't' TCP)
    in ``host``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LabError(f"exited {proc.returncode} before listening on {address}:{port}:\n{log() if log else ''}")
        r = host.run(["ss", f"-l{proto}nH", f"src {address}", f"sport = :{port}"], check=False)
        if r.stdout.strip():
            return
        time.sleep(0.05)
    raise LabError(f"nothing listens on {address}:{port} in {host.ns}:\n{log() if log else ''}")


# --- dnsmasq -----------------------------------------------------------------------

class Dnsmasq:
    """Debian's dnsmasq on one address of ``host``: local records (``--address``,
    ``--host-record``, ``--txt-record``), no resolv.conf, or forwarding to ``servers``."""

    def __init__(self, host, address: str, port: int = 53, args=(), log_dir: str | None = None):
        self.host, self.address, self.port = host, address, port
        self.args = list(args)
        self.proc = None
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="serval-dnsmasq-")) / f"dnsmasq-{address}.log"

    @staticmethod
    def available() -> bool:
        return shutil.which("dnsmasq") is not None

    def argv(self) -> list[str]:
        return ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-hosts",
                "--bind-interfaces", f"--listen-address={self.address}", f"--port={self.port}",
                "--user=root", "--group=root", "--pid-file=", "--log-facility=-", *self.args]

    def start(self) -> "Dnsmasq":
        self.proc = self.host.popen(self.argv(), stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT)
        self._wait()
        return self

    def _wait(self, timeout: float = 10.0) -> None:
        wait_listening(self.host, self.address, self.port, "u", timeout, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()                     # like a crash: no goodbye
            self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return ""


# --- the resolver --------------------------------------------------------------------

def resolver_config(listen, allow, zones, upstreams=None, mappings=None, gateway_control=None,
                    rate=0, burst=None, timeout=0.5, extra: str = "", virtual=None, metrics=None,
                    sections: dict | None = None) -> str:
    """A resolver TOML config. ``zones``: {zone: [service names or (name, ports)]};
    ``upstreams`` None: the key is left out (resolv.conf), [] no forwarding;
    ``metrics``: "127.0.0.1:port"; ``sections``: {section: {key: TOML value text}}."""
    q = lambda items: "[" + ", ".join(f'"{x}"' for x in items) + "]"  # noqa: E731
    lines = ["[server]", f"listen = {q(listen)}", f"allow = {q(allow)}"]
    if metrics:
        lines.append(f'metrics = "{metrics}"')
    lines += ["", "[rate_limit]", f"rate = {rate}"]
    if burst is not None:
        lines.append(f"burst = {burst}")
    lines += ["", "[upstream]", f"timeout = {timeout}", "retry_down_after = 30"]
    if upstreams is not None:
        lines.append(f"servers = {q(upstreams)}")
    lines += ["", "[virtual]"]
    if mappings:
        lines.append(f'mappings = "{mappings}"')
    if gateway_control:
        lines.append(f'gateway_control = "{gateway_control}"')
    for key, value in (virtual or {}).items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    for section, keys in (sections or {}).items():
        lines += ["", f"[{section}]", *(f"{k} = {v}" for k, v in keys.items())]
    for zone, services in zones.items():
        lines += ["", "[[zone]]", f'name = "{zone}"']
        for key, value in (services.get("_zone", {}) if isinstance(services, dict) else {}).items():
            lines.append(f"{key} = {value}")
        for svc in (services["services"] if isinstance(services, dict) else services):
            name, ports = (svc, ()) if isinstance(svc, str) else svc
            lines += ["[[zone.service]]", f'name = "{name}"']
            if ports:
                lines.append(f"ports = [{', '.join(map(str, ports))}]")
    return "\n".join(lines) + "\n" + extra


class RunningResolver:
    """``python -m serval dns`` in ``host``'s namespace."""

    def __init__(self, host, config_text: str, directory: str | None = None, log_level: str | None = None):
        from .config import load

        self.host = host
        self.dir = Path(directory or tempfile.mkdtemp(prefix="serval-dns-"))
        self.config = self.dir / "dns.toml"
        self.config.write_text(config_text)
        self.address, self.port = load(str(self.config)).listen[0]
        self.log_path = self.dir / "dns.log"
        self.log_level = log_level
        self.proc = None

    def start(self, timeout: float = 15.0) -> "RunningResolver":
        argv = [sys.executable, "-m", "serval", "dns", "--config", str(self.config)]
        if self.log_level:
            argv += ["--log-level", self.log_level]
        self.proc = self.host.popen(argv, stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT,
                                    cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
        # UDP and TCP listen at once (TCP last): TCP on our address means we are up
        wait_listening(self.host, self.address, self.port, "t", timeout, self.proc, self.log)
        return self

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (a clean stop); returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def restart(self) -> int:
        code = self.stop()
        self.start()
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""


# --- dig -----------------------------------------------------------------------------

@dataclass
class DigResult:
    status: str = ""
    flags: set = field(default_factory=set)
    ident: int | None = None
    answer: list = field(default_factory=list)       # [(name, ttl, type, data)]
    authority: list = field(default_factory=list)
    question: list = field(default_factory=list)
    udp_size: int | None = None                      # the server's EDNS payload size
    size: int | None = None                          # MSG SIZE rcvd
    returncode: int = 0
    output: str = ""

    def values(self, rtype: str = "A") -> list[str]:
        return [r[3] for r in self.answer if r[2] == rtype]


_RR = re.compile(r"^(\S+)\s+(\d+)\s+IN\s+(\S+)\s+(.*)$")


def parse_dig(text: str, returncode: int = 0) -> DigResult:
    res = DigResult(returncode=returncode, output=text)
    section = None
    for line in text.splitlines():
        m = re.search(r"status: (\w+), id: (\d+)", line)
        if m:
            res.status, res.ident = m.group(1), int(m.group(2))
            continue
        m = re.match(r";; flags: ([a-z ]*);", line)
        if m:
            res.flags = set(m.group(1).split())
            continue
        m = re.search(r"; EDNS: version: \d+, flags:[^;]*; udp: (\d+)", line)
        if m:
            res.udp_size = int(m.group(1))
            continue
        m = re.search(r"MSG SIZE\s+rcvd: (\d+)", line)
        if m:
            res.size = int(m.group(1))
            continue
        if line.startswith(";; QUESTION SECTION"):
            section = res.question
        elif line.startswith(";; ANSWER SECTION"):
            section = res.answer
        elif line.startswith(";; AUTHORITY SECTION"):
            section = res.authority
        elif line.startswith(";; ADDITIONAL SECTION") or not line.strip():
            section = None
        elif section is res.question and line.startswith(";"):
            res.question.append(line[1:].split())
        elif section is not None and not line.startswith(";"):
            m = _RR.match(line)
            if m:
                section.append((m.group(1), int(m.group(2)), m.group(3), m.group(4)))
    return res


def dig(host, server: str, name: str, rtype: str = "A", *opts, port: int = 53, timeout: float = 2,
        tries: int = 1) -> DigResult:
    argv = ["dig", f"@{server}", "-p", str(port), f"+time={timeout:g}", f"+tries={tries}", *opts, name, rtype]
    r = host.run(argv, check=False, timeout=timeout * tries * 4 + 10)
    return parse_dig(r.stdout, r.returncode)


# --- gateways that learn from the resolver's mappings file ----------------------------

class MappedGateways:
    """A client gateway on ``pair.cgw`` that maps virtual addresses through the
    resolver's mappings file (``[gateway] mappings``) and sends every service to the
    server gateway (``[[route]] prefix = "default"``), and a server gateway on
    ``pair.sgw`` with ``services``: [(name, port, backend_port)]."""

    def __init__(self, pair, mappings: str, services, directory: str | None = None, carriage: str = "ip"):
        self.pair = pair
        self.dir = Path(directory or tempfile.mkdtemp(prefix="serval-gw-"))
        tag = pair.cgw.ns.split("-")[0]
        self.sockets = {"client": f"/run/serval/{tag}-dnsc.sock", "server": f"/run/serval/{tag}-dnss.sock"}
        client = ["[gateway]", f'carriage = "{carriage}"', "queue = 0",
                  f'control_socket = "{self.sockets["client"]}"', f'sal_address = "{pair.cgw_sal}"',
                  f'mappings = "{mappings}"', "", "[[route]]", 'prefix = "default"',
                  f'next_hop = "{pair.sgw_sal}"', ""]
        server = ["[gateway]", f'carriage = "{carriage}"', "queue = 1",
                  f'control_socket = "{self.sockets["server"]}"', ""]
        for name, port, backend_port in services:
            server += ["[[service]]", f'name = "{name}"', f"port = {port}",
                       f'backend = "{pair.server_addr}:{backend_port}"', ""]
        self.configs = {"client": self.dir / "client.toml", "server": self.dir / "server.toml"}
        self.configs["client"].write_text("\n".join(client))
        self.configs["server"].write_text("\n".join(server))
        self.hosts = {"client": pair.cgw, "server": pair.sgw}
        self.procs: dict = {}

    def start(self, role: str | None = None, timeout: float = 15.0) -> "MappedGateways":
        roles = [role] if role else ["server", "client"]
        for r in roles:
            log = open(self.dir / f"{r}.log", "a")
            self.procs[r] = self.hosts[r].popen(
                [sys.executable, "-m", "serval", "gateway", r, "--config", str(self.configs[r])],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + timeout
        for r in roles:
            while True:
                if self.procs[r].poll() is not None:
                    raise LabError(f"{r} gateway exited {self.procs[r].returncode}:\n{self.log(r)}")
                try:
                    self.ctl(r, "stats")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise LabError(f"{r} gateway did not come up:\n{self.log(r)}")
                    time.sleep(0.1)
        return self

    def stop(self, role: str | None = None, timeout: float = 10.0) -> dict:
        codes = {}
        for r in ([role] if role else list(self.procs)):
            proc = self.procs.pop(r, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[r] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[r] = proc.wait()
        return codes

    def ctl(self, role: str, cmd: str):
        from serval.ctl import request
        reply = request(self.sockets[role], cmd)
        if not reply.get("ok"):
            raise LabError(reply.get("error"))
        return reply["result"]

    def log(self, role: str) -> str:
        try:
            return (self.dir / f"{role}.log").read_text()[-4000:]
        except OSError:
            return ""
