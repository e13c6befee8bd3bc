"""``serval ctl``: ask a running gateway what it is doing, over its control socket."""
import json
import socket
import sys


def add_arguments(p):
    p.add_argument("--socket", "-s", default="/run/serval/client.sock",
                   help="the gateway's control socket (default: %(default)s; a server "
                        "gateway's is /run/serval/server.sock)")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument("what", choices=["flows", "stats", "config", "migrate", "services", "drain", "names"],
                   help="what to show, or 'migrate' to move live flows by hand")
    p.add_argument("--flow", help="migrate: only this flow (our flowID, hex as in 'flows')")
    p.add_argument("--service", help="migrate: only the flows of this service name")
    p.add_argument("--address", help="migrate: move to this local address (default: "
                                     "wherever the routes now say)")
    p.add_argument("drain_service", nargs="?", metavar="SERVICE",
                   help="drain: the service (name, or name:port) to take out of the routers")
    p.add_argument("--cancel", action="store_true", help="drain: offer the service again")


def request(path: str, cmd: str, timeout: float = 5.0, **args):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def run(args) -> int:
    try:
        extra = {k: getattr(args, k) for k in ("flow", "service", "address")
                 if args.what == "migrate" and getattr(args, k, None)}
        if args.what == "drain":
            if not args.drain_service:
                print("serval ctl: drain needs a SERVICE", file=sys.stderr)
                return 2
            extra = {"service": args.drain_service, "cancel": args.cancel}
        reply = request(args.socket, args.what, **extra)
    except (OSError, ValueError) as exc:
        print(f"serval ctl: cannot reach {args.socket}: {exc}", file=sys.stderr)
        return 2
    if not reply.get("ok"):
        print(f"serval ctl: {reply.get('error')}", file=sys.stderr)
        return 1
    result = reply["result"]
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.what == "flows":
        print_flows(result)
    elif isinstance(result, list):      # services, drain, names: one row per item
        print_rows(result)
    else:
        for key, value in sorted(result.items()):
            print(f"{key:32} {value}")
    return 0


def print_flows(rows: list) -> None:
    cols = ["legacy", "local_flow", "remote_flow", "peer", "state", "bytes_out", "bytes_in", "age"]
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    print(f"{len(rows)} flow(s)")


def print_rows(rows: list) -> None:
    cols = list(rows[0]) if rows else []
    widths = {c: max([len(c)] + [len(str(r.get(c))) for r in rows]) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c)).ljust(widths[c]) for c in cols))
    print(f"{len(rows)} row(s)")
