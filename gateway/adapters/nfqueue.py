"""NFQUEUE as a Twisted reader: every queued packet gets a verdict from the translator.

The callback never lets an exception escape (Twisted would silently drop the reader and
the kernel would hold packets until the queue overflows): an internal error drops the
packet, is counted, and is logged at most once a second.
"""
import errno
import logging
import socket
import time
import warnings

from netfilterqueue import NetfilterQueue
from zope.interface import implementer
from twisted.internet.interfaces import IReadDescriptor

from ..translate import PASS

log = logging.getLogger("serval.nfqueue")

# Packets the kernel holds for us per queue before it drops. A burst must fit: 10,000
# flows closing at once put ~4.4 packets per close on one queue (FINs, ACKs, SAL
# control) and a connect burst one SYN per connection; 4096 lost 39,424 of such a burst.
# 65,536 holds about 15,000 simultaneous closes while Python works through them.
QUEUE_LEN = 65_536
# The queue of new connections' SYNs alone is kept short on purpose: a SYN flood beyond
# it is dropped by the kernel (a real client sends its SYN again a second later), and a
# flood Python works through in full would evict every handshake in progress, those
# of real clients among them, from the half-open limit before their answers came back.
SYN_QUEUE_LEN = 4096
# What one queued packet may cost the netlink socket's receive buffer (the library's
# own figure: a full 4,016-byte copy plus the message's and skb's overhead). A buffer
# smaller than QUEUE_LEN of these loses a burst as "user dropped" before the queue is
# full. It is a limit, not an allocation: memory is used only while packets wait.
MESSAGE_COST = 4_800
# Fail-open stays off on every queue (the kernel's default; NFQA_CFG_F_FAIL_OPEN is
# never set): a packet passed untranslated is worse than one dropped. A dropped SYN,
# FIN or segment is sent again by its TCP; a backend's packet handed to this host's
# own stack is answered with a RST, and a legacy packet leaves for the virtual range
# as it is. Every drop is counted by the kernel (kernel_queue_dropped when the queue
# is full, kernel_user_dropped when the socket is) and shown by ``serval ctl stats``.


@implementer(IReadDescriptor)
class QueueReader:
    def __init__(self, queue_num: int, handle, after_batch, stats, batch: int | None = None,
                 max_len: int = QUEUE_LEN):
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
        wanted = max_len * MESSAGE_COST
        with warnings.catch_warnings():
            # the library warns when the kernel gave less; we say so ourselves, below
            warnings.simplefilter("ignore", RuntimeWarning)
            # the kernel doubles what is asked (for its bookkeeping): ask half. The
            # library asks with SO_RCVBUFFORCE (root may pass net.core.rmem_max), then
            # with SO_RCVBUF (capped at rmem_max)
            self.nfq.bind(queue_num, self._on_packet, max_len=max_len, sock_len=wanted // 2)
        sock = socket.fromfd(self.nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        log_sizing(queue_num, max_len, wanted, got)
        self._batch = None
        if batch:
            sock.setblocking(False)
            self._batch = _Batch(sock, batch)
        else:
            sock.close()            # a duplicate of the library's descriptor: that one stays

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


def sizing_line(queue_num: int, queue_len: int, wanted: int, got: int) -> tuple[int, str]:
    """The start-up line saying how a queue was sized, and its level: a warning, with
    what to do, when the socket buffer holds fewer packets than the queue."""
    mib = got / (1 << 20)
    if got >= wanted:
        return logging.INFO, (f"queue {queue_num}: holds up to {queue_len} packets, socket buffer "
                              f"{mib:.0f} MiB, fail-open off (a full queue drops, counted as "
                              f"kernel_queue_dropped; nothing passes untranslated)")
    held = got // MESSAGE_COST
    return logging.WARNING, (f"queue {queue_num}: holds up to {queue_len} packets, but the kernel gave "
                             f"its socket only {mib:.1f} MiB of the {wanted / (1 << 20):.0f} MiB asked "
                             f"(about {held} packets): a burst beyond that is dropped (counted as "
                             f"kernel_user_dropped). Run the gateway with CAP_NET_ADMIN, or raise "
                             f"net.core.rmem_max to at least {wanted // 2}")


def log_sizing(queue_num: int, queue_len: int, wanted: int, got: int) -> None:
    level, line = sizing_line(queue_num, queue_len, wanted, got)
    log.log(level, line)


class _Batch:
    """A view of the queue's socket whose ``recv`` says EAGAIN after ``limit`` reads."""

    def __init__(self, sock: socket.socket, limit: int):
        self.sock, self.limit, self.left = sock, limit, limit

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        return self.sock.recv(size)
