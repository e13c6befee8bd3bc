"""Translation between legacy TCP and SAL flows: packets in, packets out, no I/O.

A translator takes whole IPv4 packets (as NFQUEUE hands them over) and the time, and
returns the verdict for that packet: new bytes to accept in its place, ``None`` to drop
it, or ``PASS`` to let it through untouched. Packets it must send besides (control
packets, retransmissions, resets) collect in ``outbox`` for the adapter to inject.
"""
from .base import PASS, Timeouts
from .client import ClientTranslator, VirtualService
from .server import Backend, ServerTranslator

__all__ = ["PASS", "Timeouts", "ClientTranslator", "VirtualService", "ServerTranslator", "Backend"]
