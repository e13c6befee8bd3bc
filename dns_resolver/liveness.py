"""Which service names have a live instance, as the service routers see it. No I/O.

The routers know every registration (docs/routing.md); each offers a *names view*
over TCP (``{"cmd": "live_names"}``, see docs/resolver.md): whether it is ready (past
its warm-up, so it has heard every live gateway's refresh) and the names it holds a
live instance of. The resolver polls each router (``router_names.py``) and hands the
replies here. From them, :attr:`Liveness.live` is

* ``None`` -- **unknown**: no router configured, or no ready router heard from within
  ``stale_after`` seconds. The zone then answers every name as before;
* otherwise the union of the live names of every ready router heard from recently (a
  name is live when any of them holds an instance: each gateway registers with every
  router, and one router that missed a refresh must not take a name away).

A failed poll keeps that router's last view until it goes stale, so one lost reply
changes nothing. ``generation`` grows whenever ``live`` changes, so answers the zone
memoised are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

from .names import normalize


class BadView(ValueError):
    """A router's reply that is not a names view."""


@dataclass
class _View:
    heard: float | None = None          # monotonic time of the last good reply
    ready: bool = False
    names: frozenset = frozenset()


class Liveness:
    def __init__(self, routers, stale_after: float, stats: dict | None = None):
        self.views = {router: _View() for router in routers}
        self.stale_after = stale_after
        self.live: frozenset | None = None
        self.generation = 0
        self.stats = stats if stats is not None else {}
        for key in ("router_polls", "router_poll_failures", "router_bad_replies"):
            self.stats.setdefault(key, 0)

    def down(self, name: str) -> bool:
        """True only when the routers are known to hold no live instance of ``name``."""
        live = self.live
        return live is not None and name not in live

    # --- what the poller learns -------------------------------------------------------
    def heard(self, router, result, now: float) -> None:
        """A reply from ``router``: ``{"ready": bool, "names": [{"name", "instances"}, ...]}``.
        Raises :class:`BadView` (counted; the router's last view stands) otherwise."""
        self.stats["router_polls"] += 1
        try:
            ready, names = _parse(result)
        except BadView:
            self.stats["router_bad_replies"] += 1
            raise
        view = self.views[router]
        view.heard, view.ready, view.names = now, ready, names

    def failed(self, router, now: float) -> None:
        """No reply from ``router`` (unreachable, timed out, refused the command)."""
        self.stats["router_polls"] += 1
        self.stats["router_poll_failures"] += 1

    def refresh(self, now: float) -> tuple[frozenset | None, frozenset | None]:
        """Recompute :attr:`live` (views go stale with time alone); returns (before,
        after) so the caller can tell what changed."""
        fresh = [v for v in self.views.values()
                 if v.ready and v.heard is not None and now - v.heard <= self.stale_after]
        live = frozenset().union(*(v.names for v in fresh)) if fresh else None
        before = self.live
        if live != before:
            self.live = live
            self.generation += 1
        return before, live


def _parse(result) -> tuple[bool, frozenset]:
    if not isinstance(result, dict) or not isinstance(result.get("ready"), bool) \
            or not isinstance(result.get("names"), list):
        raise BadView(f"not a names view: {str(result)[:200]}")
    names = set()
    for row in result["names"]:
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) \
                or not isinstance(row.get("instances"), int) or isinstance(row.get("instances"), bool):
            raise BadView(f"not a names row: {str(row)[:200]}")
        if row["instances"] > 0:
            names.add(normalize(row["name"]))
    return result["ready"], frozenset(names)
