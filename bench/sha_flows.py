"""Long, paced TCP flows whose every byte is checked: the two ends of ``bench.restarts``.

    python bench/sha_flows.py serve PORT
    python bench/sha_flows.py run ADDR PORT DOWNLOADS UPLOADS SIZE RATE

``serve`` answers each connection's first line: ``down SIZE SEED RATE`` sends SIZE
bytes drawn from SEED at RATE bytes/s, ``up SIZE`` reads SIZE bytes and answers their SHA-256 in hex. ``run``
opens DOWNLOADS + UPLOADS connections at once, each moving SIZE bytes at RATE bytes/s,
prints ``started`` once every one is connected, then one JSON line: how many moved
every byte intact (``ok``), and the errors of the others.
"""
import hashlib
import json
import random
import socket
import sys
import threading
import time

CHUNK = 8192


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def send_paced(sock: socket.socket, data: bytes, rate: float) -> None:
    start = time.monotonic()
    for off in range(0, len(data), CHUNK):
        due = start + off / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendall(data[off:off + CHUNK])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = sock.recv(min(1 << 16, size - got))
        if not chunk:
            raise ConnectionError(f"closed after {got} of {size} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            raise ConnectionError("closed before a full line")
        line += c
    return line


def serve_one(conn: socket.socket) -> None:
    with conn:
        words = read_line(conn).split()
        if words[0] == b"down":
            send_paced(conn, payload(int(words[1]), int(words[2])), float(words[3]))
        else:
            data = recv_exactly(conn, int(words[1]))
            conn.sendall(hashlib.sha256(data).hexdigest().encode() + b"\n")


def serve(port: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(1024)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=serve_quietly, args=(conn,), daemon=True).start()


def serve_quietly(conn: socket.socket) -> None:
    try:
        serve_one(conn)
    except OSError:
        pass          # the client judges the flow


def run(addr: str, port: int, downloads: int, uploads: int, size: int, rate: float) -> None:
    results: list = []
    lock = threading.Lock()
    socks = []
    for _ in range(downloads + uploads):
        s = socket.create_connection((addr, port), timeout=10)
        s.settimeout(90)
        socks.append(s)
    print("started", flush=True)

    def flow(i: int, s: socket.socket) -> None:
        try:
            with s:
                if i < downloads:
                    s.sendall(f"down {size} {i} {rate}\n".encode())
                    ok = recv_exactly(s, size) == payload(size, i)
                else:
                    data = payload(size, i)
                    s.sendall(f"up {size}\n".encode())
                    send_paced(s, data, rate)
                    ok = read_line(s).strip() == hashlib.sha256(data).hexdigest().encode()
                err = None if ok else "bytes differ"
        except OSError as exc:
            err = f"{type(exc).__name__}: {exc}"
        with lock:
            results.append(err)

    threads = [threading.Thread(target=flow, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [e for e in results if e]
    print(json.dumps({"ok": len(results) - len(errors), "failed": len(errors), "errors": sorted(set(errors))[:5]}),
          flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
            float(sys.argv[7]))
