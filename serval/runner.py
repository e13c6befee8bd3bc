"""Running one daemon on the Twisted reactor: start it, stop it at shutdown, run."""
import logging


def serve(daemon, reactor, name: str, when_running=None) -> int:
    """``daemon`` has start() and stop(); ``name`` is its command (for the log).
    Returns the process's exit status: 1 when it could not start."""
    try:
        daemon.start()
    except Exception as exc:
        logging.getLogger(f"serval.{name}").error("could not start: %s", exc)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stop)
    if when_running is not None:
        reactor.callWhenRunning(when_running)
    reactor.run()
    return 0
