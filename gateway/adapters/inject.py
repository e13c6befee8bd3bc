"""Sending packets the translator made itself (control packets, resets) with a raw socket.

The socket marks what it sends, and the firewall's own chains return marked packets
first, so nothing we inject is queued back to us. A send that fails is counted and
said in words (gateway/reachability.py), once a minute per address and reason.
"""
import socket

from ..reachability import SendFailures

SO_MARK = 36


class Injector:
    def __init__(self, mark: int, stats, describe=None):
        """``describe(address) -> str | None``: what an address is to us (a backend, the
        next hop), for the message when sends to it fail."""
        self.stats = stats
        self.failures = SendFailures(stats, describe)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self.sock.setblocking(False)

    def send(self, packet: bytes) -> None:
        destination = socket.inet_ntoa(packet[16:20])
        try:
            self.sock.sendto(packet, (destination, 0))
            self.stats["injected"] += 1
        except OSError as exc:
            self.failures.failed(destination, exc.errno)

    def close(self) -> None:
        self.sock.close()
