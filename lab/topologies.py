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


def gateway_pair(lab: Lab, server_route_back: bool = True, mtu: int = 1500) -> GatewayPair:
    """Build the 4-host chain; both gateways forward as plain routers.

    With server_route_back=False the server has no route beyond its own
    subnet: it can answer only packets whose source the server gateway has
    rewritten into 198.19.3.0/24, and a direct client->server baseline fails.
    Other sysctls (rp_filter, ...) are whatever a new namespace inherits.
    """
    client, cgw, sgw, server = (lab.add_host(n) for n in ("client", "cgw", "sgw", "server"))
    client_if, cgw_lan_if = lab.link(client, cgw, "198.19.1.2/24", "198.19.1.1/24", mtu)
    cgw_sal_if, sgw_sal_if = lab.link(cgw, sgw, "198.19.2.1/24", "198.19.2.2/24", mtu)
    sgw_lan_if, server_if = lab.link(sgw, server, "198.19.3.1/24", "198.19.3.2/24", mtu)

    client.default_route("198.19.1.1")
    for gw in (cgw, sgw):
        gw.sysctl("net.ipv4.ip_forward", 1)
    cgw.route("198.19.3.0/24", "198.19.2.2")
    sgw.route("198.19.1.0/24", "198.19.2.1")
    if server_route_back:
        server.default_route("198.19.3.1")

    return GatewayPair(client, cgw, sgw, server, client_if, cgw_lan_if,
                       cgw_sal_if, sgw_sal_if, sgw_lan_if, server_if)
