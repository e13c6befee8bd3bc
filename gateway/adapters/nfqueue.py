"""NFQUEUE as a Twisted reader: every queued packet gets a verdict from the translator.

The callback never lets an exception escape (Twisted would silently drop the reader and
the kernel would hold packets until the queue overflows): an internal error drops the
packet, is counted, and is logged at most once a second.
"""
import logging
import time

from netfilterqueue import NetfilterQueue
from zope.interface import implementer
from twisted.internet.interfaces import IReadDescriptor

from ..translate import PASS

log = logging.getLogger("serval.nfqueue")


@implementer(IReadDescriptor)
class QueueReader:
    def __init__(self, queue_num: int, handle, after_batch, stats):
        """``handle(payload) -> bytes | None | PASS``; ``after_batch()`` runs after each
        read (to flush packets to inject and re-arm timers)."""
        self.queue_num = queue_num
        self.handle = handle
        self.after_batch = after_batch
        self.stats = stats
        self._last_error_log = 0.0
        self.nfq = NetfilterQueue()
        self.nfq.bind(queue_num, self._on_packet, max_len=4096)

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
            self.nfq.run(block=False)
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
