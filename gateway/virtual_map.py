"""Which serviceID a virtual address:port stands for.

Two sources: the ``[[service]]`` entries of the gateway's own config (fixed), and a
mappings file that the DNS resolver writes (``serval dns``; see docs/resolver.md) when it
hands out a virtual address for a service name. The file is re-read whenever it has
changed (looked at no more than once a second, and at once for an address the map does
not know), so a gateway learns new and reassigned names without a restart, and either
process may restart without losing the mapping.

File format (JSON, replaced atomically by its writer)::

    {"version": 1,
     "mappings": [{"address": "198.18.0.11", "name": "web.svc.example"}, ...]}

A mapping names a service, not a port: the serviceID is derived from the name and the
destination port (``sal.serviceid.service_id_for``), so one address serves every TCP port
of a name. UDP is carried only to the ports an entry lists in ``"udp_ports"`` (written
by the resolver from its config's ``udp_ports``), under the UDP serviceID of name:port
(:func:`udp_service_id_for`); a datagram to any other port is refused as before. An entry
may instead give ``"service_id"`` (64 hex digits) for one ID (TCP).
"""
import json
import logging
import os
import socket
import time

from sal.serviceid import ServiceIDError, parse_service_id, service_id_for

log = logging.getLogger("serval.virtual_map")


def udp_service_id_for(name: str, port: int) -> bytes:
    """A UDP service's serviceID derived from name:port: the TCP one with 17 in the word
    before the port (one name:port may be both, as DNS is), under the same name prefix
    (so a route by name covers both). As ``protocol = "udp"`` services in the config."""
    sid = service_id_for(name, port)
    return sid[:28] + (17).to_bytes(2, "big") + sid[30:]


class VirtualMap:
    RECHECK = 1.0   # seconds between looks at the file for addresses we already know

    def __init__(self, fixed: dict[tuple[bytes, int], bytes], path: str | None = None,
                 clock=time.monotonic, fixed_udp: dict[tuple[bytes, int], bytes] | None = None):
        """``fixed``: (address, port) -> serviceID of the config's TCP services,
        ``fixed_udp`` the same for its UDP services."""
        self.fixed = fixed
        self.fixed_udp = fixed_udp or {}
        self.path = path
        self.clock = clock
        self._checked = float("-inf")
        self.names: dict[bytes, str] = {}      # address -> service name (from the file)
        self.ids: dict[bytes, bytes] = {}      # address -> serviceID (from the file)
        self.udp_ports: dict[bytes, frozenset] = {}   # address -> ports carried over UDP (from the file)
        self._stamp = None
        self.reloads = 0
        if path:
            self.reload()

    def __call__(self, address: bytes, port: int) -> bytes | None:
        sid = self.fixed.get((address, port))
        if sid is not None:
            return sid
        self._look(address)
        if address in self.ids:
            return self.ids[address]
        name = self.names.get(address)
        return service_id_for(name, port) if name else None

    def udp(self, address: bytes, port: int) -> bytes | None:
        """The serviceID of the UDP service at ``address``:``port``, or None (refused)."""
        sid = self.fixed_udp.get((address, port))
        if sid is not None:
            return sid
        self._look(address)
        if port in self.udp_ports.get(address, ()):
            return udp_service_id_for(self.names[address], port)
        return None

    def _look(self, address: bytes) -> None:
        """Re-read the file when it is time to, or at once for an unknown address."""
        if self.path:
            now = self.clock()
            if now - self._checked >= self.RECHECK or (address not in self.names and address not in self.ids):
                self._checked = now
                self.reload()

    def reload(self) -> bool:
        """Re-read the mappings file if it changed; True when something was loaded."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        try:
            with open(self.path) as f:
                data = json.load(f)
            names, ids, udp_ports = {}, {}, {}
            for entry in data.get("mappings", []):
                addr = socket.inet_aton(entry["address"])
                if "service_id" in entry:
                    ids[addr] = parse_service_id(entry["service_id"])
                    continue
                names[addr] = str(entry["name"])
                ports = entry.get("udp_ports", [])
                if not all(type(p) is int and 0 < p < 65536 for p in ports):
                    raise ValueError(f"udp_ports of {names[addr]} is not a list of ports: {ports!r}")
                if ports:
                    udp_ports[addr] = frozenset(ports)
        except (OSError, ValueError, KeyError, TypeError, ServiceIDError) as exc:
            log.warning("ignoring mappings file %s: %s", self.path, exc)
            return False
        self._stamp = stamp
        self.names, self.ids, self.udp_ports = names, ids, udp_ports
        self.reloads += 1
        log.info("loaded %d virtual address mapping(s) from %s", len(names) + len(ids), self.path)
        return True
