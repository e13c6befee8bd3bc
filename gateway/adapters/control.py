"""The local control socket: one JSON request line in, one JSON reply line out.

``serval ctl`` is its client. Commands are methods the daemon registers by name.
"""
import json
import logging
import os

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

log = logging.getLogger("serval.control")


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 65536

    def lineReceived(self, line: bytes):
        try:
            request = json.loads(line)
            command = self.factory.commands.get(request.get("cmd"))
            if command is None:
                reply = {"ok": False, "error": f"unknown command {request.get('cmd')!r}",
                         "commands": sorted(self.factory.commands)}
            else:
                reply = {"ok": True, "result": command(**request.get("args", {}))}
        except Exception as exc:  # a bad request must never hurt the daemon
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.sendLine(json.dumps(reply).encode())
        self.transport.loseConnection()


class ControlFactory(Factory):
    protocol = ControlProtocol

    def __init__(self, commands: dict):
        self.commands = commands


def in_use(path: str) -> bool:
    """Whether a live daemon answers on ``path`` (a crashed run's socket answers nothing)."""
    import socket
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def listen(reactor, path: str, commands: dict):
    """Listen on ``path`` (replacing a stale socket left by a crashed run)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    return reactor.listenUNIX(path, ControlFactory(commands), mode=0o660)
