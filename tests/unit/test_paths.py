"""Mobility policy (gateway/paths.py): which flows move after a link, address or route
change, as a pure function of flows, addresses, routes and links."""
from gateway.paths import FlowPath, Route, plan_moves
from sal.ip import aton

A1, A2, B1 = aton("198.19.2.1"), aton("198.19.2.11"), aton("198.19.7.1")   # ours
PEER, PEER_B = aton("198.19.2.2"), aton("198.19.7.5")
OURS = {"198.19.2.1": "eth0", "198.19.7.1": "eth1"}
UP = {"eth0", "eth1"}


def ours(table=OURS):
    return {aton(a): dev for a, dev in table.items()}


def look(flows, routes, up=UP, seen=None, addresses=OURS, **kw):
    return plan_moves(flows, ours(addresses), routes, up, seen or {}, **kw)


def moves(plan):
    return {(addr, peer): sorted(ids) for addr, peers in plan.moves.items() for peer, ids in peers.items()}


def test_a_flow_on_its_route_stays():
    flows = [FlowPath(1, PEER, A1)]
    plan = look(flows, {PEER: Route(A1, "eth0")})
    assert plan.moves == {} and plan.seen == {1: (PEER, "eth0")}


def test_address_gone_moves_to_the_route_source():
    flows = [FlowPath(1, PEER, A1), FlowPath(2, PEER, A1)]
    now = {"198.19.2.11": "eth0", "198.19.7.1": "eth1"}              # 198.19.2.1 replaced
    plan = look(flows, {PEER: Route(A2, "eth0")}, addresses=now, seen={1: (PEER, "eth0")})
    assert moves(plan) == {(A2, PEER): [1, 2]}


def test_uplink_down_moves_to_the_other_uplink():
    flows = [FlowPath(1, PEER, A1)]
    plan = look(flows, {PEER: Route(B1, "eth1")}, up={"eth1"}, seen={1: (PEER, "eth0")},
                return_to_preferred=False)
    assert moves(plan) == {(B1, PEER): [1]}
    assert plan.seen == {1: (PEER, "eth1")}


def test_new_address_beside_a_working_one_moves_nothing():
    flows = [FlowPath(1, PEER, A1)]
    both = {**OURS, "198.19.2.11": "eth0"}
    # the kernel now prefers the new address toward the peer, on the same link
    assert look(flows, {PEER: Route(A2, "eth0")}, addresses=both).moves == {}


def test_return_to_preferred_moves_back_when_the_route_returns():
    # after a fail-over the flow is on eth1; the preferred uplink's route comes back
    flows = [FlowPath(1, PEER, B1)]
    seen = {1: (PEER, "eth1")}
    back = look(flows, {PEER: Route(A1, "eth0")}, seen=seen)
    assert moves(back) == {(A1, PEER): [1]}
    stay = look(flows, {PEER: Route(A1, "eth0")}, seen=seen, return_to_preferred=False)
    assert stay.moves == {} and stay.seen == {1: (PEER, "eth0")}


def test_a_flow_set_up_on_a_backup_link_follows_a_route_that_changed_since():
    # never looked at: it was set up on its address's interface (eth1); the route now
    # leaves by eth0, so it changed since set-up
    flows = [FlowPath(1, PEER, B1)]
    assert moves(look(flows, {PEER: Route(A1, "eth0")})) == {(A1, PEER): [1]}


def test_force_address_moves_every_flow_not_there_yet():
    flows = [FlowPath(1, PEER, A1), FlowPath(2, PEER_B, A2), FlowPath(3, PEER, B1)]
    routes = {PEER: Route(A1, "eth0")}                # no route to PEER_B: forced anyway
    plan = look(flows, routes, force_address=B1)
    assert moves(plan) == {(B1, PEER): [1], (B1, PEER_B): [2]}


def test_a_move_made_by_hand_stays_on_an_unrelated_event():
    flows = [FlowPath(1, PEER, A1)]
    forced = look(flows, {PEER: Route(A1, "eth0")}, force_address=B1)
    assert moves(forced) == {(B1, PEER): [1]}
    after = [FlowPath(1, PEER, B1)]
    assert look(after, {PEER: Route(A1, "eth0")}, seen=forced.seen).moves == {}


def test_follow_routes_by_hand_moves_a_flow_off_its_route():
    flows = [FlowPath(1, PEER, B1)]
    seen = {1: (PEER, "eth0")}
    assert look(flows, {PEER: Route(A1, "eth0")}, seen=seen).moves == {}
    assert moves(look(flows, {PEER: Route(A1, "eth0")}, seen=seen, follow_routes=True)) == {(A1, PEER): [1]}


def test_no_route_to_the_peer_waits_and_remembers_the_last_route():
    flows = [FlowPath(1, PEER, A1)]
    plan = look(flows, {}, addresses={"198.19.7.1": "eth1"}, seen={1: (PEER, "eth0")})
    assert plan.moves == {} and plan.seen == {1: (PEER, "eth0")}


def test_only_the_flow_whose_path_broke_moves():
    flows = [FlowPath(1, PEER, A1), FlowPath(2, PEER, A2)]
    now = {"198.19.2.11": "eth0", "198.19.7.1": "eth1"}              # 198.19.2.1 gone
    plan = look(flows, {PEER: Route(A2, "eth0")}, addresses=now, seen={1: (PEER, "eth0"), 2: (PEER, "eth0")})
    assert moves(plan) == {(A2, PEER): [1]}


# --- the spurious move seen against the reference stack (issue 14) ------------------------
# A server gateway on two subnets (eth0 198.19.2.0/24, eth1 198.19.7.0/24). The reference
# client, at 198.19.2.2, moved onto eth1's subnet (198.19.7.5): the server gateway followed
# the peer (its address on eth0 still reaches it, through eth1). Then an unrelated link
# event (a capture leaving promiscuous mode) made it look at its paths again: it must not
# move its own side, whose path did not change.

def test_an_unrelated_event_after_the_peer_moved_moves_nothing():
    route = {PEER_B: Route(B1, "eth1")}
    # looked at before the peer moved
    seen = look([FlowPath(1, PEER, A1)], {PEER: Route(A1, "eth0")}).seen
    plan = look([FlowPath(1, PEER_B, A1, peer_moved=True)], route, seen=seen)
    assert plan.moves == {} and plan.seen == {1: (PEER_B, "eth1")}
    # and the next unrelated event, with the peer's route now remembered
    assert look([FlowPath(1, PEER_B, A1, peer_moved=True)], route, seen=plan.seen).moves == {}


def test_an_unrelated_event_after_the_peer_moved_moves_nothing_never_looked_at_before():
    plan = look([FlowPath(1, PEER_B, A1, peer_moved=True)], {PEER_B: Route(B1, "eth1")})
    assert plan.moves == {}


def test_after_the_peer_moved_our_own_broken_path_still_moves():
    flows = [FlowPath(1, PEER_B, A1, peer_moved=True)]
    plan = look(flows, {PEER_B: Route(B1, "eth1")}, up={"eth1"})
    assert moves(plan) == {(B1, PEER_B): [1]}
