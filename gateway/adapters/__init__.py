"""Thin adapters between the kernel or reactor and the translators: each only converts.

:class:`Adapters` is what a :class:`~gateway.daemon.Gateway` talks to outside itself; the
defaults are the real ones, and unit tests pass fakes (and Twisted's MemoryReactorClock as
the reactor) to run a whole gateway in memory.
"""
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Adapters:
    # (instance, queue, state_dir, bypass=, mark=) -> .install(**plan), .remove(), .firewall.install(pre, out)
    interception: Callable = None
    # (queue, handle, after_batch, stats, batch=None) -> a reader for reactor.addReader, with close()
    queue_reader: Callable = None
    injector: Callable = None       # (mark, stats) -> .send(packet), .close()
    # source_for(address) -> (our address, interface), has_route, ipv4_interfaces,
    # address_interfaces() -> {address: interface}, links_up() -> {interface}
    net: object = None
    watcher: Callable = None        # (on_change) -> a reader for reactor.addReader, with close()
    control: object = None          # in_use(path), listen(reactor, path, commands) -> a port
    fast_path: Callable = None      # (cfg, translator, interfaces) -> a started FastPath, or None
    # () -> a Deferred list of what a redirected packet would skip here (fastpath/host_filters.py),
    # surveyed off the reactor's thread: a big ruleset takes a while to list
    host_filters: Callable = None
    clock: Callable = time.monotonic        # the translators' time (seconds)
    wall_ns: Callable = time.time_ns        # wall-clock time for signed registrations

    def __post_init__(self):
        if self.interception is None:
            from nat import Interception
            self.interception = Interception
        if self.queue_reader is None:
            from .nfqueue import QueueReader
            self.queue_reader = QueueReader
        if self.injector is None:
            from .inject import Injector
            self.injector = Injector
        if self.net is None:
            from . import netlink
            self.net = netlink
        if self.watcher is None:
            from .netwatch import NetlinkWatcher
            self.watcher = NetlinkWatcher
        if self.control is None:
            from . import control
            self.control = control
        if self.host_filters is None:
            from twisted.internet.threads import deferToThread
            from ..fastpath.host_filters import survey
            self.host_filters = lambda: deferToThread(survey)
