"""Build and tear down network-namespace topologies (tests, demo, benchmarks).

Namespaces are named ``<prefix>-<host>`` with a prefix like ``sv1a2b``; every
namespace whose name matches ``MARKER`` belongs to some Lab, so
``python -m lab.cleanup`` can remove what a crashed run left behind.

Offloads are left at the kernel defaults: veth has TSO/GSO/GRO on, so a local
TCP sender hands the stack 64 KB super-packets that are only segmented where
needed. NFQUEUE consumers still see MTU-sized packets (netfilterqueue sets no
GSO flag, so the kernel segments before queueing). Turn offloads off with
``host.run(['ethtool', '-K', ifname, 'tso', 'off', 'gso', 'off'])`` when a
capture must show wire-sized segments.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

from pyroute2 import IPRoute, netns

MARKER = re.compile(r"^sv[0-9a-f]{4}-")
ETC_NETNS = "/etc/netns"


def _ip_netns_exec(ns: str, argv) -> list[str]:
    return ["ip", "netns", "exec", ns, *map(str, argv)]


def kill_namespaces(names, grace: float = 2.0) -> list[int]:
    """SIGTERM every process in the named namespaces, SIGKILL survivors.

    Returns the pids that were signalled. Processes must be gone before the
    namespace is deleted: an open socket would keep the namespace (and its
    addresses) alive after its name has vanished.
    """
    names = set(names)

    def pids():
        found = netns.ns_pids()
        return sorted({p for n in names for p in found.get(n, ())})

    def signal_all(pid_list, sig):
        for pid in pid_list:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    victims = pids()
    signal_all(victims, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    signal_all(left, signal.SIGKILL)
    return victims


def remove_namespace(name: str) -> bool:
    """Delete a namespace and its /etc/netns dir; False if it did not exist."""
    existed = name in netns.listnetns()
    if existed:
        netns.remove(name)  # veths inside vanish with it
    shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
    return existed


class Host:
    """One network namespace; created by Lab.add_host."""

    def __init__(self, lab: Lab, name: str, ns: str):
        self.lab, self.name, self.ns = lab, name, ns
        self.ifaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def __repr__(self):
        return f"Host({self.ns!r})"

    def iproute(self) -> IPRoute:
        # flags=0: never create a namespace by accident (the default is O_CREAT).
        return IPRoute(netns=self.ns, flags=0)

    def _next_ifname(self) -> str:
        ifname = f"eth{len(self.ifaces)}"
        self.ifaces.append(ifname)
        return ifname

    def _configure(self, ifname: str, addr: str) -> None:
        iface = ipaddress.ip_interface(addr)
        with self.iproute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=str(iface.ip),
                     prefixlen=iface.network.prefixlen)
            ipr.link("set", index=idx, state="up")

    def _wait_up(self, ifname: str, timeout: float = 2.0) -> None:
        # Carrier lags "set up" by a moment; a SYN sent then would be lost
        # and cost the first test connection a 1 s retransmission.
        deadline = time.monotonic() + timeout
        with self.iproute() as ipr:
            while ipr.link("get", ifname=ifname)[0].get("IFLA_OPERSTATE") != "UP":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.ns}/{ifname} did not come up")
                time.sleep(0.01)

    def wire_like(self, ifname: str) -> None:
        """This host segments and checksums its own TCP on ``ifname``, as a host behind
        a NIC and a wire does (a veth passes 64 KB super-packets and partial checksums
        on to the next namespace)."""
        self.run(["ethtool", "-K", ifname, "tso", "off", "gso", "off", "tx", "off"])

    def route(self, dst: str, via: str) -> None:
        with self.iproute() as ipr:
            ipr.route("replace", dst=dst, gateway=via)

    def default_route(self, via: str) -> None:
        self.route("0.0.0.0/0", via)

    def sysctl(self, name: str, value) -> None:
        """Set a sysctl inside the namespace (e.g. 'net.ipv4.ip_forward', 1).

        /proc/sys/net is per network namespace as seen by the writing
        process, so the write has to happen from inside the namespace.
        """
        path = "/proc/sys/" + name.replace(".", "/")
        self.run(["sh", "-c", 'echo "$1" > "$2"', "sh", value, path])

    def write_etc(self, relpath: str, text: str) -> str:
        """Write /etc/netns/<ns>/<relpath>; `ip netns exec` binds it over /etc."""
        path = os.path.join(ETC_NETNS, self.ns, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    def run(self, argv, check=True, timeout=30, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(_ip_netns_exec(self.ns, argv), check=check,
                              timeout=timeout, **kw)

    def exec_python(self, code: str, **kw) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code], **kw)

    def popen(self, argv, **kw) -> subprocess.Popen:
        """Start a background process; Lab.teardown kills its process group."""
        # `ip netns exec` execs the command, so the pid is the command's own.
        proc = subprocess.Popen(_ip_netns_exec(self.ns, argv),
                                start_new_session=True, **kw)
        self.procs.append(proc)
        return proc


class Lab:
    """A set of namespaces joined by veth pairs; a context manager."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or self._fresh_prefix()
        self.hosts: dict[str, Host] = {}

    @staticmethod
    def _fresh_prefix() -> str:
        existing = netns.listnetns()
        while True:
            prefix = "sv" + secrets.token_hex(2)
            if not any(n.startswith(prefix + "-") for n in existing):
                return prefix

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def add_host(self, name: str) -> Host:
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        host = Host(self, name, f"{self.prefix}-{name}")
        self.hosts[name] = host  # registered first, so teardown sees partial builds
        netns.create(host.ns)
        with host.iproute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return host

    def link(self, a: Host, b: Host, a_addr: str, b_addr: str, mtu: int = 1500):
        """Veth pair a<->b with addresses like '198.19.1.1/24'; both ends up."""
        if a is b:
            raise ValueError("link needs two different hosts")
        a_if, b_if = a._next_ifname(), b._next_ifname()
        with a.iproute() as ipr:
            ipr.link("add", ifname=a_if, kind="veth", mtu=mtu,
                     peer={"ifname": b_if, "net_ns_fd": b.ns, "mtu": mtu})
        a._configure(a_if, a_addr)
        b._configure(b_if, b_addr)
        a._wait_up(a_if)
        b._wait_up(b_if)
        return a_if, b_if

    def teardown(self) -> None:
        """Kill processes, delete namespaces and /etc/netns dirs; idempotent."""
        for host in self.hosts.values():
            for proc in host.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        kill_namespaces(h.ns for h in self.hosts.values())
        for host in self.hosts.values():
            for proc in host.procs:
                try:  # descendants that left the namespace share the group
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()  # reap, so no zombie outlives the lab
            host.procs.clear()
            remove_namespace(host.ns)
        self.hosts.clear()
