"""``serval ctl``: ask a running gateway what it is doing, over its control socket."""
import json
import socket
import sys


def add_arguments(p):
    p.add_argument("--socket", "-s", default="/run/serval/client.sock",
                   help="the gateway's control socket (default: %(default)s; a server "
                        "gateway's is /run/serval/server.sock)")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument("what", choices=["flows", "stats", "config"], help="what to show")


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
        reply = request(args.socket, args.what)
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
