"""Healthchecks of docker-compose.yml (exit 0: healthy, 1: not yet, with the reason).

    healthcheck.py router SOCKET        the router answers on its control socket
    healthcheck.py server SOCKET        every service of the server gateway is registered;
                                        a sidecar whose namespace lost its last interface
                                        (the replica restarted) is stopped, so that its
                                        restart policy joins the replica's new namespace
    healthcheck.py client SOCKET        the client gateway answers; a router (if any) is live
    healthcheck.py dns ADDRESS NAME     the resolver answers NAME with an address
"""
import os
import signal
import socket
import sys


def ctl(path: str, cmd: str):
    from serval.ctl import request

    reply = request(path, cmd, timeout=3.0)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error"))
    return reply["result"]


def interfaces() -> list[str]:
    """This network namespace's interfaces other than loopback."""
    with open("/proc/self/net/dev") as f:
        names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    return [n for n in names if n and n != "lo"]


def check(role: str, args: list[str]) -> str | None:
    """None when healthy, else why not."""
    if role == "router":
        ctl(args[0], "stats")
        return None
    if role == "server":
        if not interfaces():
            # network_mode: service:web-N joins the namespace web-N had when we started;
            # when web-N restarts it gets a new one and ours is left with loopback only.
            os.kill(1, signal.SIGTERM)          # PID 1 (docker-init) passes it on
            return "the replica's network namespace is gone: stopping, to be restarted into the new one"
        rows = ctl(args[0], "services")
        bad = [f"{r.get('service')}: {r.get('state')}" for r in rows if r.get("state") != "registered"]
        return ("; ".join(bad) or None) if rows else "no services"
    if role == "client":
        ctl(args[0], "stats")
        rows = [r for r in ctl(args[0], "services") if r.get("health") not in (None, "")]
        if rows and not any(r["health"] == "live" for r in rows):
            return "no live router: " + ", ".join(f"{r.get('next_hop')} {r['health']}" for r in rows)
        return None
    if role == "dns":
        import dnslib

        address, name = args
        reply = dnslib.DNSRecord.question(name).send(address, 53, timeout=2)
        answer = dnslib.DNSRecord.parse(reply)
        if not answer.rr:
            return f"{name}: {dnslib.RCODE.get(answer.header.rcode)} with no answer"
        return None
    return f"unknown role {role!r}"


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        why = check(sys.argv[1], sys.argv[2:])
    except (OSError, ValueError, RuntimeError, socket.timeout) as exc:
        why = f"{type(exc).__name__}: {exc}"
    if why:
        print(why)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
