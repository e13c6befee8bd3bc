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
destination port (``sal.serviceid.service_id_for``), so one address serves every port
of a name. An entry may instead give ``"service_id"`` (64 hex digits) for one ID.
"""
import json
import logging
import os
import socket
import time

from sal.serviceid import ServiceIDError, parse_service_id, service_id_for

log = logging.getLogger("serval.virtual_map")


class VirtualMap:
    RECHECK = 1.0   # seconds between looks at the file for addresses we already know

    def __init__(self, fixed: dict[tuple[bytes, int], bytes], path: str | None = None,
                 clock=time.monotonic):
        """``fixed``: (address, port) -> serviceID from the config."""
        self.fixed = fixed
        self.path = path
        self.clock = clock
        self._checked = float("-inf")
        self.names: dict[bytes, str] = {}      # address -> service name (from the file)
        self.ids: dict[bytes, bytes] = {}      # address -> serviceID (from the file)
        self._stamp = None
        self.reloads = 0
        if path:
            self.reload()

    def __call__(self, address: bytes, port: int) -> bytes | None:
        sid = self.fixed.get((address, port))
        if sid is not None:
            return sid
        if self.path:
            now = self.clock()
            if now - self._checked >= self.RECHECK or (address not in self.names and address not in self.ids):
                self._checked = now
                self.reload()
        if address in self.ids:
            return self.ids[address]
        name = self.names.get(address)
        return service_id_for(name, port) if name else None

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
            names, ids = {}, {}
            for entry in data.get("mappings", []):
                addr = socket.inet_aton(entry["address"])
                if "service_id" in entry:
                    ids[addr] = parse_service_id(entry["service_id"])
                else:
                    names[addr] = str(entry["name"])
        except (OSError, ValueError, KeyError, TypeError, ServiceIDError) as exc:
            log.warning("ignoring mappings file %s: %s", self.path, exc)
            return False
        self._stamp = stamp
        self.names, self.ids = names, ids
        self.reloads += 1
        log.info("loaded %d virtual address mapping(s) from %s", len(names) + len(ids), self.path)
        return True
