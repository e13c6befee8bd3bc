"""Routes added by an instance (pyroute2), recorded in its state file for removal.

A route spec is the keyword dict given to ``IPRoute().route('add', ...)`` (pyroute2 0.9),
plus ``dev='eth1'`` as a convenience for ``oif=<index of eth1>`` (pyroute2 has no
``dev`` keyword). ``dst`` may be ``'default'``, an address or a prefix. The spec is
recorded before the route is added, so a crash can never leave an unrecorded route.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import socket
from typing import Any, Callable

from .state import StateFile

log = logging.getLogger(__name__)
COMPARED = ('oif', 'gateway', 'prefsrc', 'priority')  # what makes two routes "identical"


class RouteError(RuntimeError):
    pass


class NoSuchDevice(RouteError):
    pass


def _iproute():
    from pyroute2 import IPRoute  # lazy: importing nat must not need pyroute2
    return IPRoute()


def resolve(ipr, spec: dict[str, Any]) -> dict[str, Any]:
    """Spec -> pyroute2 keywords: ``dev`` becomes ``oif``, ``dst`` a normalized prefix."""
    kw = dict(spec)
    dev = kw.pop('dev', None)
    if dev is not None:
        idx = ipr.link_lookup(ifname=dev)
        if not idx:
            raise NoSuchDevice(f'no network device {dev!r} for route {spec}')
        kw['oif'] = idx[0]
    dst = kw.pop('dst', 'default')
    if dst == 'default':
        dst = '0.0.0.0/0' if ':' not in str(kw.get('gateway', '')) else '::/0'
    if 'dst_len' in kw:
        dst = f'{dst}/{kw.pop("dst_len")}'
    net = ipaddress.ip_network(dst, strict=False)
    kw['dst'] = str(net)
    kw.setdefault('family', socket.AF_INET if net.version == 4 else socket.AF_INET6)
    return kw


def find_identical(ipr, kw: dict[str, Any]) -> bool:
    net = ipaddress.ip_network(kw['dst'])
    for msg in ipr.route('dump', family=kw['family']):
        if (msg.get('table') == kw.get('table', 254)
                and (msg.get('dst') or str(net.network_address)) == str(net.network_address)
                and msg['dst_len'] == net.prefixlen
                and all(msg.get(k) == kw[k] for k in COMPARED if k in kw)):
            return True
    return False


class OwnedRoutes:
    def __init__(self, instance: str, state_dir: str | os.PathLike | None = None,
                 iproute: Callable[[], Any] = _iproute):
        self.state = StateFile(instance, state_dir)
        self.iproute = iproute

    def add(self, **spec: Any) -> bool:
        """Add the route unless an identical one exists; True if we added (and own) it."""
        from pyroute2 import NetlinkError
        spec = json.loads(json.dumps(spec))  # as it will read back from the state file
        with self.iproute() as ipr:
            kw = resolve(ipr, spec)
            if find_identical(ipr, kw):
                return False
            self.state.update('routes', lambda s: (s or []) + [spec])
            try:
                ipr.route('add', **kw)
            except NetlinkError as e:
                self.state.update('routes', lambda s: _without(s, spec))
                hint = ' (a different route to that prefix exists)' if e.code == errno.EEXIST else ''
                raise RouteError(f'cannot add route {spec}: {e}{hint}') from e
        return True

    def remove(self) -> None:
        """Delete every recorded route, newest first; ones already gone are forgotten."""
        from pyroute2 import NetlinkError
        error = None
        with self.iproute() as ipr:
            for spec in reversed(self.state.get('routes') or []):
                try:
                    ipr.route('del', **resolve(ipr, spec))
                except NoSuchDevice:
                    pass  # the device took its routes with it
                except NetlinkError as e:
                    if e.code not in (errno.ESRCH, errno.ENODEV):
                        log.warning('cannot delete route %s: %s', spec, e)
                        error = error or RouteError(f'cannot delete route {spec}: {e}')
                        continue
                self.state.update('routes', lambda s: _without(s, spec))
        if error:
            raise error


def _without(routes: list | None, spec: dict) -> list:
    out = list(routes or [])
    if spec in out:
        out.remove(spec)
    return out
