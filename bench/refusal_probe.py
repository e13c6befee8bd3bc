"""Time until a connect is refused (a RST or an ICMP error), run in the client namespace.

    python bench/refusal_probe.py HOST PORT --count 300 [--timeout 3]

Prints one JSON object: refusal times in ms (p50, p99, max), and how many connects
were not refused (they timed out, counted at the timeout, or were accepted).
Standard library only.
"""
import argparse
import json
import math
import socket
import time


def main() -> None:
    ap = argparse.ArgumentParser(description="refusal latency")
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args()
    samples, kinds = [], {}
    for _ in range(a.count):
        s = socket.socket()
        s.settimeout(a.timeout)
        t0 = time.perf_counter()
        try:
            s.connect((a.host, a.port))
            kind = "accepted"
        except ConnectionRefusedError:
            kind = "refused"
        except OSError as exc:              # an ICMP error: unreachable, prohibited; or the time-out
            kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        ms = (time.perf_counter() - t0) * 1000.0
        s.close()
        kinds[kind] = kinds.get(kind, 0) + 1
        samples.append(a.timeout * 1000.0 if kind == "timeout" else ms)
    samples.sort()

    def pct(q):
        return samples[max(1, math.ceil(q / 100 * len(samples))) - 1]

    print(json.dumps({"n": len(samples), "kinds": kinds, "p50_ms": pct(50), "p99_ms": pct(99),
                      "max_ms": samples[-1]}))


if __name__ == "__main__":
    main()
