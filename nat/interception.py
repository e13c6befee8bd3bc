"""The one object a gateway daemon needs: sysctls, routes and rules as a unit.

    ic = Interception(instance='client', queue=0, state_dir='/run/serval')
    ic.install(prerouting=[['-p', 'tcp', '-d', '198.18.0.0/16']], output=[],
               sysctls={'net.ipv4.ip_forward': '1'},
               routes=[{'dst': '198.18.0.0/16', 'dev': 'eth1', 'prefsrc': '198.19.2.1'}])
    ...
    ic.remove()

``install`` first undoes a crashed earlier run of the same instance (same namespace),
then sets sysctls, adds routes, installs rules; ``remove`` goes the opposite way.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

from .firewall import DEFAULT_MARK, Firewall, cleanup_all_rules
from .routes import OwnedRoutes
from .state import DEFAULT_STATE_DIR, state_files
from .sysctl import Sysctls

log = logging.getLogger(__name__)


def _undo_all(steps) -> None:
    """Run every undo step even if one fails; raise the first failure afterwards."""
    error = None
    for step in steps:
        try:
            step()
        except Exception as e:  # keep undoing the rest
            log.warning('cleanup step %s failed: %s', getattr(step, '__qualname__', step), e)
            error = error or e
    if error:
        raise error


class Interception:
    def __init__(self, instance: str, queue: int, state_dir: str = DEFAULT_STATE_DIR,
                 bypass: bool = True, mark: int = DEFAULT_MARK, iptables: str = 'iptables'):
        self.instance = instance
        self.state_dir = state_dir
        self.iptables = iptables
        self.firewall = Firewall(instance, queue, bypass, mark, state_dir, iptables)
        self.sysctls = Sysctls(instance, state_dir)
        self.routes = OwnedRoutes(instance, state_dir)

    def install(self, prerouting: Iterable[Sequence[str]] = (), output: Iterable[Sequence[str]] = (),
                sysctls: Mapping[str, object] | None = None,
                routes: Iterable[Mapping[str, Any]] = ()) -> None:
        cleanup(self.instance, self.state_dir, self.iptables)
        try:
            self.sysctls.set(sysctls or {})
            for spec in routes or ():
                self.routes.add(**spec)
            self.firewall.install(prerouting, output)
        except BaseException:
            try:
                self.remove()
            except Exception as e:
                log.warning('rollback after failed install incomplete: %s', e)
            raise

    def remove(self) -> None:
        _undo_all([self.firewall.remove, self.routes.remove, self.sysctls.restore])

    def __enter__(self) -> 'Interception':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def cleanup(instance: str, state_dir: str | None = None, iptables: str = 'iptables') -> None:
    """Remove what a crashed run of ``instance`` left in this namespace: its chains and
    jumps (found by name), then the routes and sysctls recorded in its state file."""
    ic = Interception(instance, 0, state_dir or DEFAULT_STATE_DIR, iptables=iptables)
    ic.remove()


def cleanup_all(state_dir: str | None = None, iptables: str = 'iptables') -> None:
    """Clean up every instance recorded for this namespace, then remove every
    ``SERVAL-`` chain and ``serval:`` rule left in it."""
    steps = [lambda p=p: cleanup(p.name.split('.')[0], state_dir, iptables)
             for p in state_files(state_dir)]
    _undo_all(steps + [lambda: cleanup_all_rules(iptables)])
