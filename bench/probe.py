"""Connection probes run inside the client namespace; each prints one JSON object.

    python bench/probe.py latency HOST PORT --count 1000 [--max-seconds 60]
        sequential connects: time from connect() to established (the
        socket.create_connection call), then close; percentiles in ms.
    python bench/probe.py rate HOST PORT --seconds 5 --workers 4 [--max-total N]
        concurrent workers each doing connect / send 'GET' / read 'OK' / close
        for a fixed time, or until N connections were started in all;
        successes per second (over the time actually used) and failures.

Standard library only.
"""
import argparse
import json
import math
import socket
import statistics
import threading
import time
from collections import Counter


def percentile(sorted_values, q):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency(host, port, count, max_seconds, warmup=5):
    addr = (host, port)
    for _ in range(warmup):                    # ARP, caches, first-flow set-up
        try:
            socket.create_connection(addr, timeout=5).close()
        except OSError:
            pass
    samples, errors = [], Counter()
    deadline = time.monotonic() + max_seconds
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        try:
            s = socket.create_connection(addr, timeout=5)
        except OSError as exc:
            errors[type(exc).__name__] += 1
            continue
        samples.append((time.perf_counter() - t0) * 1000.0)
        s.close()
    samples.sort()
    return {"n": len(samples), "failures": sum(errors.values()), "errors": dict(errors),
            "p50_ms": percentile(samples, 50), "p90_ms": percentile(samples, 90),
            "p99_ms": percentile(samples, 99), "min_ms": samples[0] if samples else None,
            "max_ms": samples[-1] if samples else None,
            "mean_ms": statistics.fmean(samples) if samples else None}


def rate(host, port, seconds, workers, max_total=200_000):
    addr = (host, port)
    lock = threading.Lock()
    totals = {"ok": 0, "failed": 0, "started": 0}
    errors = Counter()
    start = time.monotonic()
    deadline = start + seconds

    def worker():
        ok = failed = 0
        errs = Counter()
        while time.monotonic() < deadline:
            with lock:
                if totals["started"] >= max_total:
                    break
                totals["started"] += 1
            try:
                with socket.create_connection(addr, timeout=3) as s:
                    s.sendall(b"GET\n")
                    got = b""
                    for _ in range(16):
                        chunk = s.recv(64)
                        if not chunk:
                            break
                        got += chunk
                        if got.endswith(b"\n"):
                            break
                    if got != b"OK\n":
                        raise ConnectionError(f"bad reply {got!r}")
                ok += 1
            except OSError as exc:
                failed += 1
                errs[type(exc).__name__] += 1
        with lock:
            totals["ok"] += ok
            totals["failed"] += failed
            errors.update(errs)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.monotonic() - start
    return {"ok": totals["ok"], "failed": totals["failed"], "errors": dict(errors),
            "capped": totals["started"] >= max_total,
            "seconds": elapsed, "per_second": totals["ok"] / elapsed, "workers": workers}


def main():
    ap = argparse.ArgumentParser(description="connection probes")
    ap.add_argument("mode", choices=("latency", "rate"))
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-total", type=int, default=200_000)
    args = ap.parse_args()
    if args.mode == "latency":
        result = latency(args.host, args.port, args.count, args.max_seconds)
    else:
        result = rate(args.host, args.port, args.seconds, args.workers, args.max_total)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
