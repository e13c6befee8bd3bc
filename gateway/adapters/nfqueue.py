"""NFQUEUE as a Twisted reader: every queued packet gets a verdict from the translator.

The callback never lets an exception escape (Twisted would silently drop the reader and
the kernel would hold packets until the queue overflows): an internal error drops the
packet, is counted, and is logged at most once a second.
"""
import errno
import logging
import socket
import time

from netfilterqueue import NetfilterQueue
from zope.interface import implementer
from twisted.internet.interfaces import IReadDescriptor

from ..translate import PASS

log = logging.getLogger("serval.nfqueue")
QUEUE_LEN = 4096


@implementer(IReadDescriptor)
class QueueReader:
    def __init__(self, queue_num: int, handle, after_batch, stats, batch: int | None = None):
        """``handle(payload) -> bytes | None | PASS``; ``after_batch()`` runs after each
        read (to flush packets to inject and re-arm timers). With ``batch``, a read
        takes at most that many packets and returns to the reactor, so a busy data queue
        cannot keep the control queue, timers and the control socket waiting."""
        self.queue_num = queue_num
        self.handle = handle
        self.after_batch = after_batch
        self.stats = stats
        self._last_error_log = 0.0
        self.nfq = NetfilterQueue()
        # The socket buffer must hold as many packets as the queue may: sized (as the
        # library does for its default 1024) for QUEUE_LEN, or bursts are lost as
        # "user dropped" long before the queue is full.
        self.nfq.bind(queue_num, self._on_packet, max_len=QUEUE_LEN, sock_len=QUEUE_LEN * 4800 // 2)
        self._batch = None
        if batch:
            sock = socket.fromfd(self.nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
            sock.setblocking(False)
            self._batch = _Batch(sock, batch)

    def _on_packet(self, pkt) -> None:
        try:
            result = self.handle(pkt.get_payload())
            if result is PASS:
                pkt.accept()
            elif result is None:
                pkt.drop()
            else:
                pkt.set_payload(result)
                pkt.accept()
        except Exception:
            self.stats["internal_errors"] += 1
            now = time.monotonic()
            if now - self._last_error_log > 1.0:
                self._last_error_log = now
                log.exception("error translating a packet (dropped; counted as internal_errors)")
            try:
                pkt.drop()
            except Exception:
                pass

    # IReadDescriptor
    def fileno(self) -> int:
        return self.nfq.get_fd()

    def doRead(self):
        try:
            if self._batch is None:
                self.nfq.run(block=False)
            else:
                self._batch.left = self._batch.limit
                self.nfq.run_socket(self._batch)
        except OSError as exc:
            self.stats["nfqueue_read_errors"] += 1
            log.warning("reading queue %d: %s", self.queue_num, exc)
        try:
            self.after_batch()
        except Exception:
            log.exception("after a packet batch")

    def connectionLost(self, reason):
        pass

    def logPrefix(self) -> str:
        return f"nfqueue-{self.queue_num}"

    def close(self) -> None:
        self.nfq.unbind()
        if self._batch is not None:
            self._batch.sock.close()


class _Batch:
    """A view of the queue's socket whose ``recv`` says EAGAIN after ``limit`` reads."""

    def __init__(self, sock: socket.socket, limit: int):
        self.sock, self.limit, self.left = sock, limit, limit

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        return self.sock.recv(size)
