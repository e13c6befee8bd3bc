"""Standard topologies built on a Lab."""

from __future__ import annotations

from dataclasses import dataclass

from lab.topology import Host, Lab


@dataclass(frozen=True)
class GatewayPair:
    """client --- cgw === sgw --- server; the '===' segment is where SAL runs.

        client 198.19.1.2/24 --- 198.19.1.1/24 cgw 198.19.2.1/24
            --- 198.19.2.2/24 sgw 198.19.3.1/24 --- 198.19.3.2/24 server
    """

    client: Host
    cgw: Host
    sgw: Host
    server: Host
    client_if: str
    cgw_lan_if: str
    cgw_sal_if: str
    sgw_sal_if: str
    sgw_lan_if: str
    server_if: str
    client_addr: str = "198.19.1.2"
    cgw_lan: str = "198.19.1.1"
    cgw_sal: str = "198.19.2.1"
    sgw_sal: str = "198.19.2.2"
    sgw_lan: str = "198.19.3.1"
    server_addr: str = "198.19.3.2"
    # with a middle router (gateway_pair(middle=True)): cgw 198.19.2.1 --- .254 mid
    # 198.19.5.254 --- 198.19.5.2 sgw; mid_cgw_if / mid_sgw_if are mid's two ends
    mid: Host | None = None
    mid_cgw_if: str | None = None
    mid_sgw_if: str | None = None


def gateway_pair(lab: Lab, server_route_back: bool = True, mtu: int = 1500, wire: bool = False,
                 middle: bool = False, middle_mtu: int | None = None) -> GatewayPair:
    """Build the 4-host chain; both gateways forward as plain routers.

    With ``wire`` the legacy hosts' links behave like a real wire rather than a veth:
    their senders segment and checksum TCP themselves (TSO, GSO and TX checksum
    offload off), so the gateways receive MTU-sized packets with complete checksums,
    as from a NIC. The kernel fast path needs that; a veth otherwise hands 64 KB
    super-packets across namespaces, which only the slow path can take.

    With server_route_back=False the server has no route beyond its own
    subnet: it can answer only packets whose source the server gateway has
    rewritten into 198.19.3.0/24, and a direct client->server baseline fails.
    Other sysctls (rp_filter, ...) are whatever a new namespace inherits.

    With ``middle`` a plain IP router ``mid`` stands between the gateways, as the
    Internet does: its link toward the server gateway has ``middle_mtu`` (a PPPoE line,
    a tunnel), it sends ICMP errors as routers do, and it is where tests impair the
    path (delay, loss, bit flips) or put a NAT.
    """
    client, cgw, sgw, server = (lab.add_host(n) for n in ("client", "cgw", "sgw", "server"))
    client_if, cgw_lan_if = lab.link(client, cgw, "198.19.1.2/24", "198.19.1.1/24", mtu)
    mid = mid_cgw_if = mid_sgw_if = None
    if middle:
        mid = lab.add_host("mid")
        mid.sysctl("net.ipv4.ip_forward", 1)
        cgw_sal_if, mid_cgw_if = lab.link(cgw, mid, "198.19.2.1/24", "198.19.2.254/24", mtu)
        mid_sgw_if, sgw_sal_if = lab.link(mid, sgw, "198.19.5.254/24", "198.19.5.2/24", middle_mtu or mtu)
        sgw_sal = "198.19.5.2"
    else:
        cgw_sal_if, sgw_sal_if = lab.link(cgw, sgw, "198.19.2.1/24", "198.19.2.2/24", mtu)
        sgw_sal = "198.19.2.2"
    sgw_lan_if, server_if = lab.link(sgw, server, "198.19.3.1/24", "198.19.3.2/24", mtu)

    client.default_route("198.19.1.1")
    for gw in (cgw, sgw):
        gw.sysctl("net.ipv4.ip_forward", 1)
    if middle:
        cgw.default_route("198.19.2.254")
        sgw.default_route("198.19.5.254")
        mid.route("198.19.1.0/24", "198.19.2.1")
        mid.route("198.19.3.0/24", "198.19.5.2")
    else:
        cgw.route("198.19.3.0/24", "198.19.2.2")
        sgw.route("198.19.1.0/24", "198.19.2.1")
    if server_route_back:
        server.default_route("198.19.3.1")
    if wire:
        client.wire_like(client_if)
        server.wire_like(server_if)

    return GatewayPair(client, cgw, sgw, server, client_if, cgw_lan_if,
                       cgw_sal_if, sgw_sal_if, sgw_lan_if, server_if, sgw_sal=sgw_sal,
                       mid=mid, mid_cgw_if=mid_cgw_if, mid_sgw_if=mid_sgw_if)


@dataclass(frozen=True)
class RoutedReplicas:
    """Replicas of a service behind server gateways, service routers, one client:

        client 198.19.1.2 --- 198.19.1.1 cgw 198.19.10.1 ---+
                                     r<i> 198.19.2<i>.1 ----+--- core (a plain IP router,
                                   sgw<i> 198.19.3<i>.1 ----+    .254 on every subnet)
        sgw<i> 198.19.4<i>.1 --- 198.19.4<i>.2 srv<i>            i = 0, 1, ...

    Every link is its own /24 and ``core`` forwards between them, so SYNs go
    cgw -> core -> r<i> -> core -> sgw<i>, and everything else cgw <-> core <-> sgw<i>:
    a capture on a router's link shows whether data ever passes through it. The
    servers have no route beyond their own subnet.
    """

    client: Host
    cgw: Host
    core: Host
    routers: tuple
    sgws: tuple
    servers: tuple
    client_addr: str = "198.19.1.2"
    cgw_lan: str = "198.19.1.1"
    cgw_sal: str = "198.19.10.1"

    @staticmethod
    def router_addr(i: int) -> str:
        return f"198.19.{20 + i}.1"

    @staticmethod
    def sgw_sal(i: int) -> str:
        return f"198.19.{30 + i}.1"

    @staticmethod
    def sgw_lan(i: int) -> str:
        return f"198.19.{40 + i}.1"

    @staticmethod
    def server_addr(i: int) -> str:
        return f"198.19.{40 + i}.2"


def routed_replicas(lab: Lab, replicas: int = 2, routers: int = 2) -> RoutedReplicas:
    if not (1 <= replicas <= 9 and 1 <= routers <= 9):
        raise ValueError("1..9 replicas and routers")
    client, cgw, core = (lab.add_host(n) for n in ("client", "cgw", "core"))
    # core forwards packets whose source is on another link (a router sends the client
    # gateway's SYN on): no reverse-path filter there, for links made after this too
    for scope in ("all", "default"):
        core.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 0)
    core.sysctl("net.ipv4.ip_forward", 1)
    cgw.sysctl("net.ipv4.ip_forward", 1)
    lab.link(client, cgw, "198.19.1.2/24", "198.19.1.1/24")
    lab.link(cgw, core, "198.19.10.1/24", "198.19.10.254/24")
    client.default_route("198.19.1.1")
    cgw.default_route("198.19.10.254")
    core.route("198.19.1.0/24", "198.19.10.1")
    rs, sgws, servers = [], [], []
    for i in range(routers):
        r = lab.add_host(f"r{i}")
        lab.link(r, core, f"{RoutedReplicas.router_addr(i)}/24", f"198.19.{20 + i}.254/24")
        r.default_route(f"198.19.{20 + i}.254")
        rs.append(r)
    for i in range(replicas):
        sgw, srv = lab.add_host(f"sgw{i}"), lab.add_host(f"srv{i}")
        lab.link(sgw, core, f"{RoutedReplicas.sgw_sal(i)}/24", f"198.19.{30 + i}.254/24")
        lab.link(sgw, srv, f"{RoutedReplicas.sgw_lan(i)}/24", f"{RoutedReplicas.server_addr(i)}/24")
        sgw.default_route(f"198.19.{30 + i}.254")
        sgw.sysctl("net.ipv4.ip_forward", 1)
        sgws.append(sgw)
        servers.append(srv)
    return RoutedReplicas(client, cgw, core, tuple(rs), tuple(sgws), tuple(servers))
