"""Run a routed deployment on a ``routed_replicas`` lab: routers, server gateways (one
per replica) and the client gateway, with configs written from one set of knobs; start,
stop, kill -9 and restart each daemon; query control sockets. Used by the routing tests
and ``bench/routing.py``."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lab.topologies import RoutedReplicas

REPO = Path(__file__).resolve().parent.parent
VIRTUAL_ADDR = "198.18.0.10"
SERVICE = "web.svc.example"
SERVICE_PORT, BACKEND_PORT = 80, 8080


class DeploymentError(RuntimeError):
    pass


@dataclass
class Knobs:
    carriage: str = "ip"
    weights: tuple = (1, 3)
    refresh: float = 0.05          # server gateways refresh this often ...
    hold: float = 0.2              # ... and routers forget them this long after the last refresh
    probe: float = 0.05            # client: router probes, and ...
    misses: int = 3                # ... how many unanswered before failing over
    health_interval: float = 0.1
    health_rise: int = 2
    health_fall: int = 2


class RoutedDeployment:
    def __init__(self, topo: RoutedReplicas, knobs: Knobs | None = None):
        self.topo, self.knobs = topo, knobs or Knobs()
        self.dir = Path(tempfile.mkdtemp(prefix="serval-routed-"))
        self.tag = topo.cgw.ns.split("-")[0]
        self.key = secrets.token_hex(32)
        key_file = self.dir / "deployment.key"
        key_file.write_text(self.key + "\n")
        key_file.chmod(0o600)
        self.hosts = {"cgw": topo.cgw}
        self.hosts.update({f"r{i}": h for i, h in enumerate(topo.routers)})
        self.hosts.update({f"sgw{i}": h for i, h in enumerate(topo.sgws)})
        self.procs: dict[str, subprocess.Popen] = {}
        self.configs = {name: self._write(name, self._config(name, key_file)) for name in self.hosts}

    # --- configs ---------------------------------------------------------------------
    def socket(self, name: str) -> str:
        return f"/run/serval/{self.tag}-{name}.sock"

    def _write(self, name: str, text: str) -> Path:
        path = self.dir / f"{name}.toml"
        path.write_text(text)
        return path

    def _routing(self, key_file: Path) -> list[str]:
        k = self.knobs
        routers = ", ".join(f'"{self.topo.router_addr(i)}"' for i in range(len(self.topo.routers)))
        return ["[routing]", f"routers = [{routers}]", f'key_file = "{key_file}"',
                f"refresh_interval = {k.refresh}", f"hold_time = {k.hold}",
                f"probe_interval = {k.probe}", f"probe_misses = {k.misses}", "",
                "[routing.health]", f"interval = {k.health_interval}", "timeout = 0.5",
                f"rise = {k.health_rise}", f"fall = {k.health_fall}", ""]

    def _config(self, name: str, key_file: Path) -> str:
        k, t = self.knobs, self.topo
        if name.startswith("r"):
            i = int(name[1:])
            return "\n".join(["[router]", f'instance = "{self.tag}-{name}"', f'address = "{t.router_addr(i)}"',
                              "queue = 2", f'control_socket = "{self.socket(name)}"', f"warmup = {k.hold}", "",
                              "[[key]]", 'id = "deployment"', f'key_file = "{key_file}"', ""])
        head = ["[gateway]", f'instance = "{self.tag}-{name}"', f'carriage = "{k.carriage}"',
                f'control_socket = "{self.socket(name)}"']
        if name == "cgw":
            return "\n".join(head + ["queue = 0", f'sal_address = "{t.cgw_sal}"', "",
                                     "[[service]]", f'name = "{SERVICE}"', f'address = "{VIRTUAL_ADDR}"',
                                     f"port = {SERVICE_PORT}", ""] + self._routing(key_file))
        i = int(name[3:])
        return "\n".join(head + ["queue = 1", f'sal_address = "{t.sgw_sal(i)}"', "",
                                 "[[service]]", f'name = "{SERVICE}"', f"port = {SERVICE_PORT}",
                                 f'backend = "{t.server_addr(i)}:{BACKEND_PORT}"', f"weight = {k.weights[i]}", ""]
                         + self._routing(key_file))

    # --- processes ---------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> "RoutedDeployment":
        names = sorted(n for n in self.hosts if n.startswith("r")) + \
            sorted(n for n in self.hosts if n.startswith("sgw")) + ["cgw"]
        for name in names:
            self.launch(name)
        for name in names:
            self.wait_up(name, timeout)
        return self

    def launch(self, name: str) -> None:
        argv = ["router", "--config"] if name.startswith("r") else \
            ["gateway", "client" if name == "cgw" else "server", "--config"]
        log = open(self.dir / f"{name}.log", "a")
        self.procs[name] = self.hosts[name].popen(
            [sys.executable, "-m", "serval", *argv, str(self.configs[name])],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})

    def wait_up(self, name: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise DeploymentError(f"{name} exited {proc.returncode}:\n{self.log(name)}")
            try:
                self.ctl(name, "stats")
                return
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise DeploymentError(f"{name} did not come up:\n{self.log(name)}")
                time.sleep(0.05)

    def kill(self, name: str) -> float:
        """kill -9; returns the time (monotonic) of the kill."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        t = time.monotonic()
        proc.wait()
        return t

    def stop(self, name: str, timeout: float = 10.0) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> dict[str, int]:
        order = ["cgw"] + [n for n in list(self.procs) if n.startswith("sgw")] + \
            [n for n in list(self.procs) if n.startswith("r")]
        return {n: self.stop(n) for n in order if n in self.procs}

    # --- control sockets ------------------------------------------------------------------
    def ctl(self, name: str, cmd: str, **args):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.socket(name))
            s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        reply = json.loads(data)
        if not reply.get("ok"):
            raise DeploymentError(reply.get("error"))
        return reply["result"]

    def instances(self, router: str) -> dict[str, int]:
        """Registered instance address -> weight, for the service, at ``router``."""
        return {row["instance"]: row["weight"] for row in self.ctl(router, "services")
                if row["service"] == SERVICE and row["health"] == "registered"}

    def wait_for(self, check, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def wait_registered(self, count: int, timeout: float = 10.0) -> None:
        routers = [n for n in self.procs if n.startswith("r")]
        self.wait_for(lambda: all(len(self.instances(r)) == count for r in routers), timeout,
                      f"{count} instance(s) registered at {routers}")

    def log(self, name: str) -> str:
        try:
            return (self.dir / f"{name}.log").read_text()[-4000:]
        except OSError:
            return ""


# --- programs run in the namespaces: an unmodified server and clients -------------------

BACKEND_PY = r'''
import hashlib, socket, sys, threading, time
name, port = sys.argv[1], int(sys.argv[2])
def stream(seed, n):
    """n bytes, the same for the same seed: SHA-256 in counter mode."""
    i = 0
    while n > 0:
        block = b"".join(hashlib.sha256(b"%s:%d:%d" % (seed.encode(), i, j)).digest() for j in range(512))[:n]
        yield block
        n -= len(block); i += 1
def serve(c):
    with c:
        try:
            line = c.makefile("rb").readline().decode().split()
            if line[:1] == ["BIG"]:      # BIG bytes seed rate: the data, paced at rate bytes/s
                n, seed, rate = int(line[1]), line[2], float(line[3])
                c.sendall(name.encode() + b"\n")
                t0, sent = time.monotonic(), 0
                for block in stream(seed, n):
                    c.sendall(block); sent += len(block)
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0: time.sleep(ahead)
            else:               # ID: our name, then wait for the client to close first;
                c.sendall(name.encode() + b"\n")      # CLOSE: our name, and we close first
                if line[:1] != ["CLOSE"]:
                    c.settimeout(10)
                    c.recv(1)
        except OSError:
            pass
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(1024)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

CLIENT_PY = r'''
import hashlib, json, socket, sys, threading, time
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
REQUEST = b"ID\n"
def ask(timeout):
    """One short connection: (replica name or None, error)."""
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.sendall(REQUEST)
            reply = s.makefile("rb").readline().decode().strip()
            return (reply, "") if reply else (None, "empty")
    except OSError as exc:
        return None, type(exc).__name__
if mode == "split":            # split N CONCURRENCY TIMEOUT [REQUEST]: counts per replica
    n, conc, timeout = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    REQUEST = (sys.argv[7] if len(sys.argv) > 7 else "ID").encode() + b"\n"
    counts, lock, left = {}, threading.Lock(), [n]
    def worker():
        while True:
            with lock:
                if left[0] == 0: return
                left[0] -= 1
            name, err = ask(timeout)
            with lock:
                counts[name or "fail:" + err] = counts.get(name or "fail:" + err, 0) + 1
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    t0 = time.monotonic()
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps({"counts": counts, "seconds": time.monotonic() - t0}))
elif mode == "loop":           # loop SECONDS RATE TIMEOUT: a new connection every 1/RATE s, timed
    seconds, rate, timeout = float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
    results, lock, threads = [], threading.Lock(), []
    def attempt(t):
        name, err = ask(timeout)
        with lock:
            results.append((t, time.monotonic(), name, err))
    # open loop: arrivals do not wait for earlier connections, so a stuck one never
    # hides the failures that follow it (at most rate x timeout threads at once)
    t0 = time.monotonic()
    for i in range(int(seconds * rate)):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0: time.sleep(delay)
        th = threading.Thread(target=attempt, args=(time.monotonic(),)); th.start(); threads.append(th)
    for th in threads: th.join()
    print(json.dumps(sorted(results)))
elif mode == "big":            # big BYTES SEED RATE: one long transfer, hashed
    n, seed, rate = int(sys.argv[4]), sys.argv[5], sys.argv[6]
    s = socket.create_connection((addr, port), timeout=30)
    s.sendall(f"BIG {n} {seed} {rate}\n".encode())
    f = s.makefile("rb")
    name = f.readline().decode().strip()
    print(json.dumps({"event": "started", "replica": name}), flush=True)
    h, got = hashlib.sha256(), 0
    try:
        while chunk := f.read1(65536):
            h.update(chunk); got += len(chunk)
        error = ""
    except OSError as exc:
        error = type(exc).__name__
    print(json.dumps({"event": "done", "replica": name, "bytes": got, "sha256": h.hexdigest(), "error": error}))
'''


def expected_sha256(nbytes: int, seed: str) -> str:
    """What BACKEND_PY sends for BIG nbytes seed."""
    import hashlib
    h, i, n = hashlib.sha256(), 0, nbytes
    while n > 0:
        block = b"".join(hashlib.sha256(b"%s:%d:%d" % (seed.encode(), i, j)).digest() for j in range(512))[:n]
        h.update(block)
        n -= len(block)
        i += 1
    return h.hexdigest()


def start_backend(host, name: str, port: int = BACKEND_PORT) -> subprocess.Popen:
    proc = host.popen([sys.executable, "-c", BACKEND_PY, name, str(port)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not host.run(["ss", "-ltnH", f"sport = :{port}"], check=False).stdout.strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DeploymentError(f"backend {name} did not start")
        time.sleep(0.02)
    return proc


def run_client(host, mode: str, *args, timeout: float = 120.0):
    """Run CLIENT_PY to completion and return its JSON output."""
    r = host.run([sys.executable, "-c", CLIENT_PY, mode, VIRTUAL_ADDR, str(SERVICE_PORT), *map(str, args)],
                 check=False, timeout=timeout)
    if r.returncode:
        raise DeploymentError(f"client {mode} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def start_client(host, mode: str, *args) -> subprocess.Popen:
    return host.popen([sys.executable, "-c", CLIENT_PY, mode, VIRTUAL_ADDR, str(SERVICE_PORT), *map(str, args)],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
