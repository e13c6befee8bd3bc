"""Backend health, sans-IO: check results in, up/down transitions out.

A backend is checked every ``interval`` (a TCP connect, done by the adapter). Its first
result decides at once (so a gateway registers as soon as its backend answers, and never
before); after that, ``fall`` consecutive failures take it down and ``rise`` consecutive
successes bring it back, so one lost probe does not flap the registration.
"""
from dataclasses import dataclass


@dataclass
class HealthCheck:
    interval: float
    rise: int = 2
    fall: int = 2
    up: bool | None = None        # None: not checked yet
    streak: int = 0               # consecutive results disagreeing with ``up``
    next_due: float = 0.0
    in_flight: bool = False
    checks: int = 0
    failures: int = 0
    transitions: int = 0
    last_error: str = ""

    @property
    def state(self) -> str:
        return "unknown" if self.up is None else "up" if self.up else "down"

    def due(self, now: float) -> bool:
        return not self.in_flight and now >= self.next_due

    def started(self, now: float) -> None:
        self.in_flight = True
        self.next_due = now + self.interval

    def hurry(self, now: float) -> None:
        """Check again now (a backend just refused a connection: do not wait a round)."""
        self.next_due = min(self.next_due, now)

    def result(self, ok: bool, error: str = "") -> bool | None:
        """Record a finished check; returns the new state when it changed, else None."""
        self.in_flight = False
        self.checks += 1
        if not ok:
            self.failures += 1
            self.last_error = error
        if self.up is None or ok == self.up:
            self.streak = 0
            if self.up is None:
                self.up = ok
                self.transitions += 1
                return ok
            return None
        self.streak += 1
        if self.streak >= (self.rise if ok else self.fall):
            self.up, self.streak = ok, 0
            self.transitions += 1
            return ok
        return None
