"""What a router knows about instances: registrations, kept in the service table.

Each sender (a server gateway, by its stable name) holds one registration: the instance
address and the complete set of services it currently offers there, valid for the hold
time it asked for (clamped) after its last REGISTER. A REGISTER replaces the set (so a
lost UNREGISTER is corrected by the next refresh, and a new address replaces the old one:
re-registration after a move); UNREGISTER removes some or all; expiry removes all.
Only changes touch the service table: a refresh of the same set is a timestamp update.
"""
from collections import Counter
from dataclasses import dataclass

from sal import registration as reg
from sal.ip import ntoa
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action, ServiceTable


@dataclass(frozen=True)
class Instance:
    """A FORWARD target in the router's table: where a registered service runs."""
    sender: str
    address: bytes

    def __str__(self):
        return ntoa(self.address)


@dataclass
class Registration:
    instance: Instance
    records: dict                 # ServicePrefix -> reg.Record
    refreshed: float
    hold: float
    registered: float

    @property
    def expires(self) -> float:
        return self.refreshed + self.hold


class Registry:
    def __init__(self, table: ServiceTable, min_hold: float = 0.05, max_hold: float = 120.0):
        self.table = table
        self.min_hold, self.max_hold = min_hold, max_hold
        self.by_sender: dict[tuple, Registration] = {}
        self.stats: Counter = Counter()
        self.version = 0                  # bumped on every change of the table

    # --- messages ------------------------------------------------------------------
    def register(self, msg: reg.Message, now: float) -> None:
        ident = (msg.key_id, msg.sender)
        hold = min(max(msg.hold_ms / 1000.0, self.min_hold), self.max_hold)
        records = {r.prefix: r for r in msg.records}
        old = self.by_sender.get(ident)
        if not records:                # nothing on offer (its backends are down): hold nothing
            if old is not None:
                self._withdraw(self.by_sender.pop(ident), None)
            return
        instance = Instance(msg.sender, msg.address)
        if old is None:
            self.stats["registrations_new"] += 1
            old = self.by_sender[ident] = Registration(instance, {}, now, hold, now)
        elif old.instance != instance:
            self.stats["registrations_moved"] += 1
            self._withdraw(old, list(old.records))
            old.instance = instance
        else:
            self.stats["refreshes"] += 1
        old.refreshed, old.hold = now, hold
        gone = [p for p in old.records if p not in records]
        self._withdraw(old, gone)
        for prefix, record in records.items():
            have = old.records.get(prefix)
            if have == record:
                continue
            if have is not None:
                self._withdraw(old, [prefix])
            old.records[prefix] = record
            self.table.add(prefix, Action.FORWARD, instance, record.priority, record.weight)
            self.version += 1

    def unregister(self, msg: reg.Message) -> None:
        old = self.by_sender.get((msg.key_id, msg.sender))
        if old is None:
            return
        self.stats["unregistrations"] += 1
        prefixes = [r.prefix for r in msg.records] if msg.records else list(old.records)
        self._withdraw(old, [p for p in prefixes if p in old.records])
        if not old.records:
            del self.by_sender[(msg.key_id, msg.sender)]

    def expire(self, now: float) -> int:
        dead = [ident for ident, r in self.by_sender.items() if r.expires <= now]
        for ident in dead:
            self.stats["registrations_expired"] += 1
            self._withdraw(self.by_sender.pop(ident), None)
        return len(dead)

    def next_expiry(self) -> float | None:
        return min((r.expires for r in self.by_sender.values()), default=None)

    def _withdraw(self, registration: Registration, prefixes) -> None:
        for prefix in list(registration.records) if prefixes is None else prefixes:
            self.table.remove(prefix, registration.instance)
            registration.records.pop(prefix, None)
            self.version += 1

    # --- views ---------------------------------------------------------------------
    def live(self, prefix: ServicePrefix, instance: Instance) -> bool:
        for r in self.by_sender.values():
            if r.instance == instance and prefix in r.records:
                return True
        return False

    def registration_of(self, instance: Instance) -> Registration | None:
        for r in self.by_sender.values():
            if r.instance == instance:
                return r
        return None

    def names(self) -> list[dict]:
        """Registered service names (the resolver's NameSource seam), one row per
        (name, serviceID prefix), with how many instances serve it."""
        rows: dict[tuple, dict] = {}
        for r in self.by_sender.values():
            for record in r.records.values():
                key = (record.name, record.prefix)
                row = rows.setdefault(key, {"name": record.name, "service_id": record.prefix.value.to_bytes(32, "big").hex(),
                                            "prefix_bits": record.prefix.bits, "port": _port_of(record), "instances": 0})
                row["instances"] += 1
        return sorted(rows.values(), key=lambda row: (row["name"], row["port"] or 0))


def _port_of(record: reg.Record) -> int | None:
    """The port, when the serviceID is the one derived from name and port."""
    sid = record.prefix.value.to_bytes(32, "big")
    port = int.from_bytes(sid[30:], "big")
    if record.prefix.bits == 256 and service_id_for(record.name, port) == sid:
        return port
    return None
