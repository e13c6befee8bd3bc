"""The fair baseline consumer: a Python NFQUEUE reader that accepts every packet.

    python bench/accept_only.py QUEUE [--max-seconds S]

Binds QUEUE the way the gateway does (netfilterqueue, max_len 4096), prints ``ready``
once bound, then calls ``pkt.accept()`` on every packet and does nothing else. On
SIGTERM/SIGINT (or after --max-seconds) it prints ``{"queue": N, "packets": M}`` and
exits, so the caller can check the rules really sent the flow through it.
Only the standard library and netfilterqueue: it runs inside a lab namespace.
"""
import argparse
import json
import os
import signal
import sys

from netfilterqueue import NetfilterQueue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("queue", type=int)
    ap.add_argument("--max-seconds", type=int, default=120, help="exit after this long, whatever happens")
    args = ap.parse_args()

    count = [0]

    def on_packet(pkt):
        count[0] += 1
        pkt.accept()

    def finish(signum, frame):
        # run() swallows exceptions raised by signal handlers: report and leave here.
        print(json.dumps({"queue": args.queue, "packets": count[0]}), flush=True)
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(sig, finish)
    signal.alarm(args.max_seconds)

    nfq = NetfilterQueue()
    nfq.bind(args.queue, on_packet, max_len=4096)
    print("ready", flush=True)
    nfq.run()          # blocking recv loop in C; one callback per packet
    finish(None, None)


if __name__ == "__main__":
    sys.exit(main())
