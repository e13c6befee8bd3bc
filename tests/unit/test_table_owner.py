"""The service table's one writer (gateway/table_owner.py): config, router health,
backend health and drain merged, whichever changes first."""
from gateway.table_owner import Rule, TableOwner
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action, ServiceTable

SID = service_id_for("web.svc.example", 80)
OTHER = service_id_for("db.svc.example", 5432)
DEFAULT = ServicePrefix(bytes(32), 0)


def targets(table):
    return sorted((e.prefix.bits, str(t.target)) for e in table.entries() for t in e.targets)


def test_the_owner_takes_over_what_was_in_the_table():
    table = ServiceTable()
    table.add(DEFAULT, Action.FORWARD, "198.19.9.9")         # written before it existed
    TableOwner(table, [Rule(DEFAULT, Action.FORWARD, "198.19.20.1", router=True)])
    assert targets(table) == [(0, "198.19.20.1")]


def test_unchanged_targets_keep_their_counters_across_a_reload():
    table = ServiceTable()
    web = Rule(ServicePrefix(SID), Action.FORWARD, "198.19.2.2")
    owner = TableOwner(table, [web])
    for _ in range(3):
        table.resolve(SID)
    owner.set_rules([web, Rule(ServicePrefix(OTHER), Action.FORWARD, "198.19.2.3")])
    assert table.match(SID).targets[0].hits == 3


def test_a_specific_route_stays_while_routers_come_and_go():
    table = ServiceTable()
    rules = [Rule(ServicePrefix(SID, 224), Action.FORWARD, "198.19.2.2"),
             Rule(DEFAULT, Action.FORWARD, "198.19.20.1", router=True),
             Rule(DEFAULT, Action.FORWARD, "198.19.21.1", router=True)]
    owner = TableOwner(table, rules)
    assert owner.set_live_routers({"198.19.21.1"}) == (["198.19.20.1"], [])
    owner.set_rules(rules)
    assert targets(table) == [(0, "198.19.21.1"), (224, "198.19.2.2")]


def test_drop_rule_removed_on_reload_leaves_the_other_targets_of_its_prefix():
    table = ServiceTable()
    prefix = ServicePrefix(SID, 224)
    fwd, drop = Rule(prefix, Action.FORWARD, "198.19.2.2"), Rule(prefix, Action.DROP, None, priority=0)
    owner = TableOwner(table, [fwd, drop])
    owner.set_rules([fwd])                                  # remove(prefix, None) takes all: put back
    assert targets(table) == [(224, "198.19.2.2")]


def test_drain_and_health_of_a_service_no_longer_configured_are_forgotten():
    table = ServiceTable()
    web = Rule(ServicePrefix(SID), Action.DEMUX, "backend", service="web.svc.example:80")
    owner = TableOwner(table, [web])
    owner.set_drained("web.svc.example:80", True)
    owner.set_health("web.svc.example:80", False)
    owner.set_rules([])
    owner.set_rules([web])                                  # configured again later: a fresh start
    assert owner.in_table("web.svc.example:80") and table.match(SID) is not None
