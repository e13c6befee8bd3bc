"""Client affinity: the service table's rendezvous choice (consistent, the same in another
process, minimal movement on join/leave, weighted), its sticky table (a joining replica
does not take an active client; draining and failover win), and the router's use of it
(keyed by the SYN's SAL source; the same answer after a restart)."""
import random
import subprocess
import sys
from collections import Counter

import pytest

from router.config import RouterConfigError, parse as parse_config
from sal import wire
from sal.affinity import Affinity, rendezvous
from sal.ip import IPv4, aton, ntoa
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action, ServiceTable
from tests.unit.test_router_core import WALL, SID, Sender, make_router, record, sal_syn

PREFIX = ServicePrefix(SID)
HOPS = [f"198.19.{30 + i}.1" for i in range(5)]
KEYS = [aton(f"198.19.{100 + i // 250}.{i % 250 + 1}") for i in range(4000)]


def table(hops, weights=None, affinity=Affinity(60.0), seed=1):
    t = ServiceTable(random.Random(seed))
    for i, hop in enumerate(hops):
        t.add(PREFIX, Action.FORWARD, hop, 1, (weights or {}).get(hop, 1))
    t.set_affinity(ServicePrefix(service_id_for("web.svc.example"), 224), affinity)    # every port
    return t


def choices(t, keys=KEYS, now=None):
    return {k: t.resolve(SID, key=k, now=now).target for k in keys}


def test_same_client_same_target_in_any_order_and_any_process():
    a = choices(table(HOPS[:3]))
    assert choices(table(list(reversed(HOPS[:3])), seed=99)) == a          # order and rng play no part
    assert len(set(a.values())) == 3
    code = ("import sys; sys.path.insert(0, '.');"
            "from tests.unit.test_router_affinity import *;"
            "print(','.join(choices(table(HOPS[:3]), KEYS[:200]).values()))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345"}).stdout.strip().split(",")
    assert other == [a[k] for k in KEYS[:200]]                              # another process, another hash seed


def test_without_a_key_or_a_policy_the_choice_is_per_connection():
    t = table(HOPS[:2])
    assert len({t.resolve(SID).target for _ in range(200)}) == 2            # no key: weighted random
    t.set_affinity(ServicePrefix(service_id_for("web.svc.example"), 224), None)
    assert len({t.resolve(SID, key=KEYS[0]).target for _ in range(200)}) == 2


def test_a_joining_replica_takes_only_its_share_and_a_leaving_one_gives_only_its_own():
    before = choices(table(HOPS[:4]))
    joined = choices(table(HOPS[:5]))
    moved = [k for k in KEYS if joined[k] != before[k]]
    assert all(joined[k] == HOPS[4] for k in moved)                        # only to the newcomer
    assert abs(len(moved) - len(KEYS) / 5) < 5 * (len(KEYS) * 0.2 * 0.8) ** 0.5
    left = choices(table(HOPS[:3]))
    assert all(left[k] == before[k] for k in KEYS if before[k] != HOPS[3])  # nobody else moves
    assert all(left[k] in HOPS[:3] for k in KEYS)


def test_weights_hold_across_clients():
    counts = Counter(choices(table(HOPS[:2], weights={HOPS[0]: 1, HOPS[1]: 3})).values())
    n, p = len(KEYS), 0.25
    assert abs(counts[HOPS[0]] - n * p) < 5 * (n * p * (1 - p)) ** 0.5, counts


def test_rendezvous_is_pure():
    class T:
        def __init__(self, hop, weight=1):
            self.target, self.weight = hop, weight
    ts = [T(h) for h in HOPS[:3]]
    assert rendezvous(KEYS[7], ts) is rendezvous(KEYS[7], list(reversed(ts)))


def test_sticky_keeps_an_active_client_when_a_replica_joins_until_its_timeout():
    t = table(HOPS[:1], affinity=Affinity(10.0))
    assert set(choices(t, KEYS[:400], now=0.0).values()) == {HOPS[0]}      # alone: everyone on it
    t.add(PREFIX, Action.FORWARD, HOPS[1])
    assert set(choices(t, KEYS[:400], now=5.0).values()) == {HOPS[0]}      # refreshed at 5 s: to 15 s
    hashed = choices(table(HOPS[:2]), KEYS[:400])
    assert choices(t, KEYS[:400], now=15.5) == hashed                       # idle past the timeout: the hash
    assert HOPS[1] in hashed.values()


def test_draining_and_failover_win_over_affinity():
    t = table(HOPS[:3])
    first = choices(t, KEYS[:600], now=0.0)
    on_0 = [k for k in KEYS[:600] if first[k] == HOPS[0]]
    t.remove(PREFIX, HOPS[0])                                               # drained (or its gateway died)
    after = choices(t, KEYS[:600], now=1.0)
    assert on_0 and all(after[k] in HOPS[1:3] for k in on_0)
    assert all(after[k] == first[k] for k in KEYS[:600] if k not in on_0)
    t.add(PREFIX, Action.FORWARD, "198.19.60.1", priority=5)                # a higher priority appears
    assert set(choices(t, KEYS[:100], now=2.0).values()) == {"198.19.60.1"}
    t.remove(PREFIX, "198.19.60.1")
    t.remove(PREFIX, HOPS[1])
    t.remove(PREFIX, HOPS[2])
    t.add(PREFIX, Action.FORWARD, "198.19.61.1", priority=0)                # only a backup left
    assert set(choices(t, KEYS[:100], now=3.0).values()) == {"198.19.61.1"}


def test_sticky_table_is_bounded():
    t = table(HOPS[:2])
    t.sticky.limit = 100
    choices(t, KEYS[:1000], now=0.0)
    assert len(t.sticky.entries) == 100


# --- in the router ------------------------------------------------------------------------

def routed(r, flow, now=0.0, **kw):
    return ntoa(IPv4(r.on_packet(sal_syn(flow=flow, **kw), now)).dst)


def router_with(senders, order=None, seed=1):
    r = make_router(seed=seed)
    r.set_affinity(ServicePrefix(SID), Affinity(30.0))
    r.senders = {name: Sender(name, addr) for name, addr in senders}
    for name, _ in (order or senders):
        assert r.on_control(r.senders[name].register(record()), 0.0, WALL) is not None
    return r


SGWS = [("sgw0", "198.19.30.1"), ("sgw1", "198.19.31.1"), ("sgw2", "198.19.32.1")]


def test_router_sends_every_connection_of_a_client_gateway_to_one_instance():
    r = router_with(SGWS)
    assert {row["affinity"] for row in r.services(0.0)} == {"client 30s"}
    assert len({routed(r, flow) for flow in range(1, 101)}) == 1
    # other client gateways (SAL sources) spread over the instances
    spread = {routed(r, 1000 + i, src=f"198.19.{10 + i // 200}.{i % 200 + 2}") for i in range(300)}
    assert spread == {a for _, a in SGWS}


def test_router_client_is_the_original_source_in_source():
    r = router_with(SGWS)
    direct = {i: routed(r, 10 + i, src=f"198.19.11.{i + 1}") for i in range(30)}
    via = {i: routed(r, 100 + i, extra=[wire.Source([aton(f"198.19.11.{i + 1}")])]) for i in range(30)}
    assert via == direct and len(set(direct.values())) > 1


def test_router_restart_gives_the_same_answers():
    clients = [f"198.19.12.{i + 1}" for i in range(60)]
    a = router_with(SGWS)
    before = [routed(a, 1, src=c) for c in clients]
    b = router_with(SGWS, order=list(reversed(SGWS)), seed=42)              # a new process: other order, rng
    assert [routed(b, 1, src=c) for c in clients] == before


def test_router_unregister_moves_only_that_instances_clients():
    clients = [f"198.19.12.{i + 1}" for i in range(90)]
    r = router_with(SGWS)
    before = {c: routed(r, 1, src=c) for c in clients}
    assert r.on_control(r.senders["sgw0"].unregister(), 0.1, WALL) is not None
    after = {c: routed(r, 2, 0.2, src=c) for c in clients}
    assert all(after[c] == before[c] for c in clients if before[c] != SGWS[0][1])
    assert all(after[c] != SGWS[0][1] for c in clients) and SGWS[0][1] in before.values()


def test_router_config_service_affinity():
    base = {"router": {"address": "198.19.20.1"}, "key": [{"key": "11" * 32}]}
    cfg = parse_config({**base, "service": [{"service": "web.svc.example", "affinity": "client", "affinity_timeout": 60},
                                            {"service": "db.svc.example:5432", "affinity": "none"}]}, "router.toml")
    assert cfg.affinities == [(ServicePrefix(service_id_for("web.svc.example"), 224), Affinity(60.0), "web.svc.example"),
                              (ServicePrefix(service_id_for("db.svc.example", 5432)), None, "db.svc.example:5432")]
    assert parse_config({**base, "service": [{"service": "w", "affinity": "client"}]}, "r").affinities[0][1] == Affinity()
    assert parse_config({"router": {"repeated_syn_window": 1.5}, "key": base["key"]}, "r").options.affinity == 1.5
    for bad in ([{"service": "w", "affinity": "sticky"}], [{"service": "w", "affinity_timeout": 5}],
                [{"service": "w", "affinity": "client", "affinity_timeout": -1}], [{"affinity": "client"}],
                [{"service": "w", "affinity": "client"}, {"service": "w"}], [{"service": "w", "weight": 2}]):
        with pytest.raises(RouterConfigError, match=r"\[service \d\]"):
            parse_config({**base, "service": bad}, "router.toml")


# --- a client gateway's static routes ---------------------------------------------------------

ROUTES = """
[gateway]
[[service]]
name = "web.svc.example"
address = "198.18.0.10"
port = 80
[[route]]
service = "web.svc.example"
next_hop = "198.19.2.2"
affinity = "client"
affinity_timeout = 30
[[route]]
service = "web.svc.example"
next_hop = "198.19.3.2"
"""


def test_client_gateway_static_routes_choose_by_the_legacy_client(tmp_path):
    from gateway.config import ConfigError, load
    from gateway.daemon import build_translator
    path = tmp_path / "client.toml"
    path.write_text(ROUTES)
    cfg = load(str(path), "client")
    assert cfg.rules[0].affinity == Affinity(30.0)
    from gateway.table_owner import TableOwner, config_rules
    source_for = lambda hop: ("198.19.2.1", "eth0")
    t = build_translator(cfg, source_for, {"eth0": 1500}).table
    TableOwner(t, config_rules(cfg, source_for))           # as the daemon does: the one writer
    legacy = [aton(f"198.19.1.{i + 2}") for i in range(200)]
    first = {k: t.resolve(SID, key=k, now=0.0).target for k in legacy}
    assert all(t.resolve(SID, key=k, now=1.0).target == first[k] for k in legacy for _ in range(3))
    assert set(first.values()) == {"198.19.2.2", "198.19.3.2"}
    path.write_text(ROUTES.replace('affinity = "client"', 'affinity = "sticky"'))
    with pytest.raises(ConfigError, match="affinity"):
        load(str(path), "client")
