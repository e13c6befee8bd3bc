"""Virtual address allocation: stable, persisted, reclaimed only when unused."""
import json
import os
import socket

import pytest

from dns_resolver.allocator import Allocator
from dns_resolver.store import MappingsFile, MemoryStore
from gateway.virtual_map import VirtualMap
from sal.serviceid import service_id_for

NOW = 1_700_000_000.0


def test_allocation_is_stable_and_saved_before_it_is_returned():
    store = MemoryStore()
    a = Allocator("198.18.0.0/16", store=store)
    web = a.allocate("web.svc.example", NOW)
    assert store.writes == 1 and store.records == [web.record()]
    assert a.allocate("web.svc.example", NOW + 5) is web and store.writes == 1
    api = a.allocate("api.svc.example", NOW)
    assert api.address != web.address


def test_same_address_from_the_hash_even_without_the_store():
    one = Allocator("198.18.0.0/16").allocate("web.svc.example", NOW).address
    two = Allocator("198.18.0.0/16").allocate("web.svc.example", NOW + 9).address
    assert one == two


def test_network_broadcast_and_excluded_addresses_are_never_used():
    a = Allocator("198.18.7.0/29", exclude=["198.18.7.0/30"])     # .1-.6 usable, .1-.3 excluded
    got = {a.allocate(f"s{i}", NOW).address for i in range(3)}
    assert got == {"198.18.7.4", "198.18.7.5", "198.18.7.6"}
    assert a.allocate("one.more", NOW) is None and a.exhausted


def test_restart_reloads_the_same_mappings(tmp_path):
    path = tmp_path / "m.json"
    first = Allocator("198.18.0.0/16", store=MappingsFile(str(path)))
    first.load(NOW)
    web = first.allocate("web.svc.example", NOW)
    first.answered(web, NOW + 50)
    assert first.flush() and not first.flush()       # only when something changed
    second = Allocator("198.18.0.0/16", store=MappingsFile(str(path)))
    assert second.load(NOW + 60) == 1
    again = second.lookup("web.svc.example")
    assert again.address == web.address and again.allocated == NOW and again.last_answered == NOW + 50


def test_the_file_is_what_the_gateway_reads(tmp_path):
    """The client gateway's VirtualMap maps our addresses to serviceID(name, port)."""
    path = tmp_path / "mappings.json"
    a = Allocator("198.18.0.0/16", store=MappingsFile(str(path)))
    web = a.allocate("web.svc.example", NOW)
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["mappings"][0]["address"] == web.address and data["mappings"][0]["name"] == "web.svc.example"
    vmap = VirtualMap({}, str(path))
    addr = socket.inet_aton(web.address)
    assert vmap(addr, 80) == service_id_for("web.svc.example", 80)
    # a new allocation is picked up without restarting the map (different inode: rename)
    api = a.allocate("api.svc.example", NOW)
    assert vmap(socket.inet_aton(api.address), 8443) == service_id_for("api.svc.example", 8443)


def test_file_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "m.json"
    store = MappingsFile(str(path))
    store.save([{"address": "198.18.1.1", "name": "a"}])
    inode = os.stat(path).st_ino
    store.save([{"address": "198.18.1.2", "name": "b"}])
    assert os.stat(path).st_ino != inode            # replaced by rename, never rewritten in place
    assert sorted(os.listdir(path.parent)) == ["m.json"]


def test_corrupt_file_is_moved_aside(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    assert MappingsFile(str(path)).load() == []
    assert not path.exists() and any(p.name.startswith("m.json.bad-") for p in tmp_path.iterdir())


def test_load_drops_entries_outside_the_range_and_duplicates():
    store = MemoryStore([
        {"address": "198.18.1.1", "name": "a.svc"},
        {"address": "10.0.0.1", "name": "b.svc"},             # outside
        {"address": "198.18.1.1", "name": "c.svc"},           # duplicate address
        {"address": "198.18.1.2", "name": "a.svc"},           # duplicate name
        {"name": "d.svc"},                                     # malformed
    ])
    a = Allocator("198.18.0.0/16", store=store)
    assert a.load(NOW) == 1 and a.lookup("a.svc").address == "198.18.1.1"


def test_pinned_addresses_win_and_are_never_reclaimed():
    store = MemoryStore([{"address": "198.18.9.9", "name": "old.svc", "last_answered": 0}])
    a = Allocator("198.18.0.0/16", store=store, pinned={"web.svc": "198.18.9.9"})
    a.load(NOW)
    assert a.lookup("web.svc").address == "198.18.9.9" and a.lookup("web.svc").pinned
    assert a.lookup("old.svc") is None
    assert a.allocate("web.svc", NOW).address == "198.18.9.9"
    assert a.idle(NOW + 10**6, 1) == []
    assert {r["name"] for r in store.records} == {"web.svc"}


def test_reclaim_needs_the_ttl_passed_and_no_live_flow():
    a = Allocator("198.18.0.0/16", store=MemoryStore())
    web, api, db = (a.allocate(n, NOW) for n in ("web", "api", "db"))
    a.answered(db, NOW + 90)
    idle = a.idle(NOW + 100, threshold=30)
    assert {x.name for x in idle} == {"web", "api"}
    freed = a.reclaim(idle, in_use={web.address}, now=NOW + 100, threshold=30)
    assert [x.name for x in freed] == ["api"]
    assert a.lookup("web") is web and a.lookup("api") is None and a.lookup("db") is db
    assert a.generation == 1


def test_reclaim_rechecks_answers_given_while_the_gateway_was_asked():
    a = Allocator("198.18.0.0/16", store=MemoryStore())
    web = a.allocate("web", NOW)
    idle = a.idle(NOW + 100, 30)
    a.answered(web, NOW + 101)                       # answered meanwhile
    assert a.reclaim(idle, set(), NOW + 102, 30) == []
    assert a.lookup("web") is web


def test_a_reclaimed_address_goes_to_another_name_only_as_a_last_resort():
    a = Allocator("198.18.3.0/29", store=MemoryStore())        # 6 usable
    names = [f"n{i}" for i in range(6)]
    allocs = {n: a.allocate(n, NOW) for n in names}
    victim = allocs["n0"]
    a.reclaim([victim], set(), NOW + 100, 30)
    assert a.allocate("fresh", NOW + 101).address == victim.address     # nothing else is free
    b = Allocator("198.18.3.0/29", store=MemoryStore())
    first = b.allocate("n0", NOW)
    b.reclaim([first], set(), NOW + 100, 30)
    assert b.allocate("other", NOW + 101).address != first.address     # others are free: not reused
    assert b.allocate("n0", NOW + 102).address == first.address         # its own name gets it back


@pytest.mark.parametrize("network", ["198.18.0.0/16", "198.18.200.0/24", "198.18.0.8/31"])
def test_allocations_stay_inside_the_network(network):
    import ipaddress
    a = Allocator(network)
    net = ipaddress.IPv4Network(network)
    for i in range(2):
        alloc = a.allocate(f"svc{i}", NOW)
        assert ipaddress.IPv4Address(alloc.address) in net


def test_an_unwritable_store_means_no_address_rather_than_one_the_gateway_cannot_know():
    class Broken(MemoryStore):
        fail = True

        def save(self, records, durable=True):
            if self.fail:
                raise OSError(28, "No space left on device")
            super().save(records, durable)

    store = Broken()
    a = Allocator("198.18.0.0/16", store=store)
    assert a.allocate("web", NOW) is None and a.lookup("web") is None and not a.exhausted
    store.fail = False
    assert a.allocate("web", NOW) is not None and store.records[0]["name"] == "web"
