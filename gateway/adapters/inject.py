"""Sending packets the translator made itself (control packets, resets) with a raw socket.

The socket marks what it sends, and the firewall's own chains return marked packets
first, so nothing we inject is queued back to us.
"""
import errno
import socket

SO_MARK = 36


class Injector:
    def __init__(self, mark: int, stats):
        self.stats = stats
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self.sock.setblocking(False)

    def send(self, packet: bytes) -> None:
        try:
            self.sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
            self.stats["injected"] += 1
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno)).lower()
            self.stats[f"inject_failed_{name}"] += 1

    def close(self) -> None:
        self.sock.close()
