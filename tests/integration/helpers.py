"""Programs and checks the gateway integration tests share."""
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SERVER_PY = r'''
import socket, sys, hashlib, threading
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(256)
def serve(c):
    with c:
        if mode == "halfclose":      # read to EOF, then answer: needs the half-close to pass
            h = hashlib.sha256(); n = 0
            while d := c.recv(65536):
                h.update(d); n += len(d)
            c.sendall(f"{n} {h.hexdigest()}".encode())
        elif mode == "reset":        # answer with a RST (SO_LINGER 0)
            c.recv(100)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        elif mode == "stream":       # send until the peer goes away
            try:
                while True:
                    c.sendall(b"z" * 65536)
            except OSError:
                print("peer gone", flush=True)
while True:
    c, addr = s.accept()
    print("peer", addr[0], flush=True)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def ruleset(host) -> str:
    """iptables-save without comments and counters: what the gateway must leave as found."""
    out = host.run(["iptables-save"], check=False).stdout
    return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in out.splitlines()
                     if line and not line.startswith("#"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_file(directory: Path, name: str, size: int) -> Path:
    path = directory / name
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    return path


def wait_port(host, addr: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on addr:port inside host's namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = host.run(["ss", "-ltnH", f"sport = :{port}"], check=False)
        if r.stdout.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {addr}:{port}")


def start_http(host, directory: Path, port: int = 8080):
    proc = host.popen([sys.executable, "-m", "http.server", str(port), "-d", str(directory)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(host, "0.0.0.0", port)
    return proc


def start_py_server(host, mode: str, port: int):
    proc = host.popen([sys.executable, "-c", SERVER_PY, mode, str(port)],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_port(host, "0.0.0.0", port)
    return proc
