"""Virtual IPv4 addresses for service names: allocated on first answer, kept stable,
persisted through an injected store, reclaimed only when unused.

No I/O of its own: ``store`` (``load() -> list[dict]``, ``save(list[dict])``) is
handed in (:class:`dns_resolver.store.MappingsFile` in the daemon, a list in tests),
and every time is an argument (wall-clock seconds, since they are persisted).

* An address is chosen by hashing the name into the range and probing upward to the
  first free address, so a name lands on the same address even if the store is lost,
  and different resolvers sharing a range tend to agree.
* Every change of the set of mappings (an allocation, a reclaim) is saved before the
  answer that needs it leaves, so the gateway can learn the mapping by the time the
  client connects. Answer times (``last_answered``) are saved, and everything forced
  to disk, by :meth:`flush` (the daemon calls it periodically and on exit).
* :meth:`idle` lists the allocations whose last answer is older than a threshold; the
  daemon asks the gateway which of them carry live flows and calls :meth:`reclaim`
  with the rest. The threshold is never below the zone's TTL, and reclaim checks it
  again, so an answer given while the gateway was being asked keeps its address.
* Pinned addresses (``address =`` in the config) are never reclaimed.
* A name's ``udp_ports`` (from the config) go into its record, for the gateway: it
  carries UDP to those ports of the address only. A stored record whose ports differ
  from the config's is written again at load.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass

log = logging.getLogger("serval.dns.allocator")


@dataclass
class Allocation:
    name: str
    address: str
    allocated: float
    last_answered: float
    pinned: bool = False

    def record(self) -> dict:
        out = {"address": self.address, "name": self.name,
               "allocated": round(self.allocated, 3), "last_answered": round(self.last_answered, 3)}
        if self.pinned:
            out["pinned"] = True
        return out


class Allocator:
    def __init__(self, network: str = "198.18.0.0/16", exclude=(), store=None,
                 pinned: dict[str, str] | None = None, udp_ports: dict[str, tuple] | None = None):
        self.network = ipaddress.IPv4Network(network)
        self.excluded = [ipaddress.IPv4Network(e, strict=False) for e in exclude]
        self.store = store
        self.by_name: dict[str, Allocation] = {}
        self.by_address: dict[str, Allocation] = {}
        self.released: dict[str, tuple] = {}     # address -> (when reclaimed, name): reused last
        self.pinned = dict(pinned or {})
        self.udp_ports = {name: list(ports) for name, ports in (udp_ports or {}).items() if ports}
        self.generation = 0                       # bumped when a mapping goes away
        self.dirty = False                        # answer times not yet saved
        self.unsynced = False                     # saved, but not yet forced to disk
        self.exhausted = False                    # the last allocation found no address
        self.store_failing = False                # the last save failed (logged once)
        if self.network.prefixlen <= 30:
            self._first = int(self.network.network_address) + 1
            self._size = self.network.num_addresses - 2
        else:
            self._first = int(self.network.network_address)
            self._size = self.network.num_addresses

    # --- state ---------------------------------------------------------------------
    def load(self, now: float) -> int:
        """Read the store; returns how many mappings were kept. Entries that no longer
        fit (outside the range, excluded, a duplicate) are dropped with a warning."""
        records = self.store.load() if self.store is not None else []
        kept, udp_changed = 0, False
        for rec in records:
            try:
                name, address = str(rec["name"]).rstrip(".").lower(), str(ipaddress.IPv4Address(rec["address"]))
            except (KeyError, TypeError, ValueError):
                log.warning("mappings: ignoring malformed entry %r", rec)
                continue
            pinned = self.pinned.get(name)
            if pinned is not None and pinned != address:
                log.warning("mappings: %s was %s, now pinned to %s by the config", name, address, pinned)
                continue
            if pinned is None and not self._usable(address):
                log.warning("mappings: dropping %s -> %s: outside the virtual range or excluded", name, address)
                continue
            if name in self.by_name or address in self.by_address:
                log.warning("mappings: dropping duplicate %s -> %s", name, address)
                continue
            alloc = Allocation(name, address, float(rec.get("allocated", now)),
                               float(rec.get("last_answered", rec.get("allocated", now))), pinned is not None)
            self._add(alloc)
            kept += 1
            udp_changed = udp_changed or rec.get("udp_ports", []) != self.udp_ports.get(name, [])
        changed = udp_changed
        for name, address in self.pinned.items():
            if name not in self.by_name:
                other = self.by_address.get(address)
                if other is not None:
                    log.warning("mappings: %s -> %s gives way to %s pinned there", other.name, address, name)
                    self._remove(other)
                self._add(Allocation(name, address, now, now, True))
                changed = True
        if changed:
            self.save()
        return kept

    def records(self) -> list[dict]:
        out = []
        for a in sorted(self.by_address.values(), key=lambda a: ipaddress.IPv4Address(a.address)):
            rec = a.record()
            if a.name in self.udp_ports:
                rec["udp_ports"] = self.udp_ports[a.name]
            out.append(rec)
        return out

    def save(self, durable: bool = False) -> None:
        if self.store is not None:
            self.store.save(self.records(), durable=durable)
        self.dirty = self.unsynced = False
        if not durable:
            self.unsynced = True

    def flush(self) -> bool:
        """Save (to disk) answer times or mappings not yet synced; True when written."""
        if self.dirty or self.unsynced:
            self.save(durable=True)
            return True
        return False

    # --- allocation ----------------------------------------------------------------
    def lookup(self, name: str) -> Allocation | None:
        return self.by_name.get(name)

    def allocate(self, name: str, now: float) -> Allocation | None:
        """The name's address, allocating (and saving) one if needed; None when the
        range is full or the store cannot be written (a gateway could not learn the
        mapping: better no answer than an address that leads nowhere)."""
        alloc = self.by_name.get(name)
        if alloc is not None:
            return alloc
        address = self.pinned.get(name) or self._free_address(name)
        if address is None:
            if not self.exhausted:
                log.warning("virtual range %s is full: cannot allocate an address for %s", self.network, name)
            self.exhausted = True
            return None
        self.exhausted = False
        alloc = Allocation(name, address, now, now, name in self.pinned)
        self._add(alloc)
        try:
            self.save()
        except OSError as exc:
            self._remove(alloc)
            if not self.store_failing:
                log.error("cannot write the mappings (%s): not handing out %s -> %s", exc, name, address)
            self.store_failing = True
            return None
        if self.store_failing:
            log.info("mappings written again")
            self.store_failing = False
        self.released.pop(address, None)
        log.info("allocated %s -> %s", name, address)
        return alloc

    def answered(self, alloc: Allocation, now: float) -> None:
        if now > alloc.last_answered:
            alloc.last_answered = now
            self.dirty = True

    # --- reclaim -------------------------------------------------------------------
    def idle(self, now: float, threshold: float) -> list[Allocation]:
        """Allocations not answered for more than ``threshold`` seconds, oldest first."""
        out = [a for a in self.by_name.values() if not a.pinned and now - a.last_answered > threshold]
        return sorted(out, key=lambda a: a.last_answered)

    def reclaim(self, candidates, in_use, now: float, threshold: float) -> list[Allocation]:
        """Free the ``candidates`` not ``in_use`` (virtual addresses with live flows)
        that are still idle for more than ``threshold``; saves once; returns them."""
        in_use = set(in_use)
        freed = []
        for cand in candidates:
            alloc = self.by_name.get(cand.name)
            if alloc is None or alloc is not cand or alloc.pinned:
                continue
            if alloc.address in in_use:
                log.debug("keeping %s -> %s: a live flow uses it", alloc.name, alloc.address)
                continue
            if now - alloc.last_answered <= threshold:
                continue
            self._remove(alloc)
            self.released[alloc.address] = (now, alloc.name)
            freed.append(alloc)
        if freed:
            self.generation += 1
            self.exhausted = False
            try:
                self.save()
            except OSError as exc:      # the file keeps them a while: harmless, retried on flush
                log.error("cannot write the mappings after a reclaim: %s", exc)
                self.unsynced = True
            for alloc in freed:
                log.info("reclaimed %s -> %s (last answered %.0f s ago, no live flow)",
                         alloc.name, alloc.address, now - alloc.last_answered)
        return freed

    # --- helpers -------------------------------------------------------------------
    def _add(self, alloc: Allocation) -> None:
        self.by_name[alloc.name] = alloc
        self.by_address[alloc.address] = alloc

    def _remove(self, alloc: Allocation) -> None:
        self.by_name.pop(alloc.name, None)
        self.by_address.pop(alloc.address, None)

    def _usable(self, address: str) -> bool:
        ip = ipaddress.IPv4Address(address)
        value = int(ip)
        if not self._first <= value < self._first + self._size:
            return False
        return not any(ip in net for net in self.excluded) and address not in self.pinned.values()

    def _free_address(self, name: str) -> str | None:
        start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % self._size
        fallback = None
        for i in range(self._size):
            value = self._first + (start + i) % self._size
            address = str(ipaddress.IPv4Address(value))
            if address in self.by_address or not self._usable(address):
                continue
            if address in self.released:
                # reclaimed lately: a gateway may still map it to its old name, so it goes
                # to another name only when nothing else is free
                if self.released[address][1] == name:
                    return address
                if fallback is None or self.released[address] < self.released[fallback]:
                    fallback = address
                continue
            return address
        return fallback
