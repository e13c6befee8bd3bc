"""Where service names come from: the seam between the zone and its sources.

A service zone asks a :class:`NameSource` whether a name is a service. Today the only
source is the static config (:class:`StaticNames`); registrations relayed from server
gateways (the service-router work) will be another source with the same three
methods, and :class:`CombinedNames` puts several together. A source bumps
``generation`` whenever its set of names changes, so answers memoised by the zone are
dropped.

Names are lowercase, dotted, without the trailing dot: the form that
``sal.serviceid.service_id_for`` hashes and that the mappings file carries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol


@dataclass(frozen=True)
class Service:
    name: str                          # "web.svc.example"
    ports: tuple[int, ...] = ()        # announced in the TXT record (optional)
    address: str | None = None         # a pinned virtual address (optional)
    udp_ports: tuple[int, ...] = ()    # also carried over UDP on these ports (TCP: every port)


class NameSource(Protocol):
    generation: int

    def lookup(self, name: str) -> Service | None:
        """The service called ``name``, or None."""

    def names(self) -> Iterable[str]:
        """Every name this source knows (for empty non-terminals and logs)."""


def normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


class StaticNames:
    """Services listed in the config; never changes while running."""

    def __init__(self, services: Iterable[Service] = ()):
        self.generation = 0
        self._services = {}
        for svc in services:
            self._services[normalize(svc.name)] = svc

    def lookup(self, name: str) -> Service | None:
        return self._services.get(name)

    def names(self) -> Iterable[str]:
        return self._services.keys()


class CombinedNames:
    """Several sources, asked in order; the first that knows a name wins."""

    def __init__(self, sources: list):
        self.sources = sources

    @property
    def generation(self) -> int:
        return sum(s.generation for s in self.sources)

    def lookup(self, name: str) -> Service | None:
        for source in self.sources:
            svc = source.lookup(name)
            if svc is not None:
                return svc
        return None

    def names(self) -> Iterable[str]:
        seen = set()
        for source in self.sources:
            for name in source.names():
                if name not in seen:
                    seen.add(name)
                    yield name
