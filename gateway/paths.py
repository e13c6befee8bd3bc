"""Mobility policy, with no I/O: which live flows move to which of our addresses after a
link, address or route change (docs/mobility.md).

The daemon gathers the inputs (the flows, our addresses and their interfaces, the route
to each peer, the links that are up) and applies the moves; this module only decides.

A flow moves when its own path changed:

* its local address is gone, or the link that address is on is down (the path broke);
* or the route to its peer now leaves by another interface than at the last look, and
  ``return_to_preferred`` is on (a preferred uplink came back).

Nothing else moves a flow: a new address beside a working one, an event on an unrelated
link, or a peer that moved onto another interface's subnet (its route then differs from
our address's interface, but our path did not change: the peer moved, not us). A move
made by hand stays until its own path changes.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FlowPath:
    flow: int                  # our flowID
    peer: bytes                # the peer's address now
    local: bytes               # our address the flow uses
    peer_moved: bool = False   # the peer has moved since set-up


@dataclass(frozen=True)
class Route:
    source: bytes              # our address the kernel would send from
    device: str                # the interface the route leaves by


@dataclass
class Plan:
    moves: dict = field(default_factory=dict)   # our new address -> {peer: [flowIDs]}
    seen: dict = field(default_factory=dict)    # flowID -> (peer, device): routes looked at

    def count(self) -> int:
        return sum(len(ids) for peers in self.moves.values() for ids in peers.values())


def plan_moves(flows, ours: dict, routes: dict, links_up: set, seen: dict, *,
               return_to_preferred: bool = True, follow_routes: bool = False,
               force_address: bytes | None = None) -> Plan:
    """The moves to make now.

    ``flows``: :class:`FlowPath` of the live flows to consider; ``ours``: our address ->
    its interface; ``routes``: peer -> :class:`Route` (a peer with no route is absent:
    its flows wait); ``links_up``: interface names; ``seen``: the ``Plan.seen`` of the
    last look (what each flow's route was then). ``follow_routes`` (a move asked for by
    hand) moves every flow whose route leaves by another interface than its address's;
    ``force_address`` moves every flow to that address.

    Returns the moves and, in ``seen``, the routes looked at, for the next look."""
    plan = Plan()
    for f in flows:
        route = routes.get(f.peer)
        if route is None:
            if f.flow in seen:
                plan.seen[f.flow] = seen[f.flow]      # no route for now: remember the last
            if force_address is not None:
                _add(plan, force_address, f)
            continue
        plan.seen[f.flow] = (f.peer, route.device)
        if force_address is not None:
            _add(plan, force_address, f)
            continue
        device = ours.get(f.local)                    # None: the address is gone
        if device == route.device:
            continue                                  # the route in use is the flow's own
        broken = device is None or device not in links_up
        if broken or follow_routes or (return_to_preferred and _route_changed(f, route, seen)):
            _add(plan, route.source, f)
    return plan


def _route_changed(f: FlowPath, route: Route, seen: dict) -> bool:
    """Whether the route to the flow's peer leaves by another interface than before."""
    last = seen.get(f.flow)
    if last is not None:
        peer, before = last
        # a peer that moved since the last look: its new route is where it went, not a
        # change of ours
        return peer == f.peer and before != route.device
    # not looked at since set-up: it was set up on its address's interface, so the
    # route changed since, unless the peer moved (then the route is where it went)
    return not f.peer_moved


def _add(plan: Plan, address: bytes, f: FlowPath) -> None:
    if address != f.local:
        plan.moves.setdefault(address, {}).setdefault(f.peer, []).append(f.flow)
