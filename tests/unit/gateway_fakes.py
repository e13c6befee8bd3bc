"""Fakes for running a whole Gateway in memory (tests/unit/test_gateway_memory.py): the
adapters of gateway/adapters as plain objects, and Twisted's MemoryReactorClock with a
datagram port."""
import ipaddress

from twisted.internet.testing import MemoryReactorClock

from gateway.adapters import Adapters
from gateway.reachability import NoRoute


class Datagrams:
    """A UDP port: what was written, and a way to deliver a datagram."""

    def __init__(self, protocol):
        self.protocol, self.written, self.listening = protocol, [], True

    def write(self, data, addr):
        self.written.append((data, tuple(addr)))

    def deliver(self, data, addr):
        self.protocol.datagramReceived(data, addr)

    def doRead(self):
        pass

    def stopListening(self):
        self.listening = False


class Reactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.udp = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        p = Datagrams(protocol)
        self.udp.append(p)
        return p


class Net:
    """Our addresses, routes and links, as the kernel would tell them."""

    def __init__(self, addresses: dict, routes: list, up: set):
        self.addresses = dict(addresses)     # "address" -> interface
        self.routes = list(routes)           # ("network", our source, interface)
        self.up = set(up)

    def source_for(self, destination: str):
        dst = ipaddress.IPv4Address(destination)
        best = None
        for net, src, dev in self.routes:
            n = ipaddress.IPv4Network(net)
            if dst in n and (best is None or n.prefixlen > best[0].prefixlen):
                best = (n, src, dev)
        if best is None:
            raise NoRoute(destination, "this host has no route to it")
        return best[1], best[2]

    def has_route(self, destination: str) -> bool:
        try:
            self.source_for(destination)
            return True
        except LookupError:
            return False

    def ipv4_interfaces(self):
        return sorted(set(self.addresses.values()))

    def address_interfaces(self):
        return dict(self.addresses)

    def links_up(self):
        return set(self.up)

    def link_mtus(self):
        return {dev: 1500 for dev in set(self.addresses.values())}

    def broadcast_addresses(self):
        return {}                            # (no subnets known: no broadcast SYNs)


class Firewall:
    def __init__(self):
        self.installs = []

    def install(self, prerouting, output):
        self.installs.append((list(prerouting), list(output)))


class Interception:
    def __init__(self, instance, queue, state_dir, bypass=True, mark=0):
        self.instance, self.queue = instance, queue
        self.firewall = Firewall()
        self.plan = None
        self.removed = False

    def install(self, **plan):
        self.plan = plan

    def remove(self):
        self.removed = True


class QueueReader:
    def __init__(self, queue, handle, after_batch, stats, batch=None, max_len=None):
        self.queue, self.handle, self.after_batch = queue, handle, after_batch
        self.closed = False

    def packet(self, payload: bytes):
        """One queued packet: the verdict's payload (bytes), None (dropped) or PASS."""
        result = self.handle(payload)
        self.after_batch()
        return result

    def close(self):
        self.closed = True


class Injector:
    def __init__(self, mark, stats, describe=None):
        self.sent, self.closed = [], False

    def send(self, packet):
        self.sent.append(packet)

    def close(self):
        self.closed = True


class Watcher:
    def __init__(self, on_change):
        self.on_change, self.closed = on_change, False

    def close(self):
        self.closed = True


def adapters(net: Net, reactor: Reactor) -> Adapters:
    return Adapters(interception=Interception, queue_reader=QueueReader, injector=Injector,
                    net=net, watcher=Watcher, fast_path=lambda cfg, translator, interfaces: None,
                    clock=reactor.seconds, wall_ns=lambda: int((1_800_000_000 + reactor.seconds()) * 1e9))
