"""The service's clock: wall-clock time that never runs backwards.

Times the service stores (when a job was queued, when a set last changed, a
lease's expiry) are wall-clock seconds, so that other processes and a later
start read them. Intervals inside one run (the tick, the QC timeout, lease
renewals) are measured on the monotonic clock instead. What is left is the
wall clock stepping while the service runs (an NTP correction, an operator
setting the time):

- stepped back: :class:`ServiceClock` does not go back with it but slows to
  half the pace of the monotonic clock until the wall clock has caught up (a
  step of 600 s is absorbed in 1200 s), so nothing that compares a stored time
  with now ("settled for 5 s?", "is the retry due?", "did that lease run
  out?") waits out the step, and the service's times rejoin the PC's;
- stepped forward: the new time is taken at once (upload windows and the
  times people read follow the PC's clock); what waits on intervals is on the
  monotonic clock and is not cut short.

Both steps are logged once each.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from daemon.logging import get_logger

__all__ = ["SLEW_RATE", "STEP_TOLERANCE_S", "ServiceClock", "backoff"]

log = get_logger("imageqc.clock")

#: A wall clock that moves this much more or less than the monotonic clock has stepped.
STEP_TOLERANCE_S = 2.0

#: The pace of service time, relative to the monotonic clock, while it is ahead of a wall clock that stepped back.
SLEW_RATE = 0.5


class ServiceClock:
    """Seconds since the epoch from ``wall``, never less than a time this clock returned before.

    Parameters
    ----------
    wall : callable
        The wall clock (default :func:`time.time`); tests pass one they can step.
    timer : callable
        A monotonic clock in seconds (default :func:`time.monotonic`).
    """

    def __init__(self, wall: Callable[[], float] = time.time, timer: Callable[[], float] = time.monotonic) -> None:
        self.wall = wall
        self.timer = timer
        self._lock = threading.Lock()
        self._last: tuple[float, float] | None = None  # (time returned, timer then)
        self._held = False

    def __call__(self) -> float:
        with self._lock:
            wall, mono = self.wall(), self.timer()
            if self._last is None:
                self._last = (wall, mono)
                return wall
            last, last_mono = self._last
            elapsed = max(0.0, mono - last_mono)
            slewed = last + elapsed * SLEW_RATE
            if self._held and wall >= slewed:
                now, self._held = wall, False
                log.info("the wall clock has caught up with the service's time again")
            elif self._held:
                now = slewed
            elif wall < last - STEP_TOLERANCE_S:  # stepped back: on at a slower pace until the wall clock catches up
                now, self._held = slewed, True
                log.warning(
                    "the wall clock stepped back; the service's time slows down until it has caught up",
                    step_s=round(wall - last, 1),
                    slew_rate=SLEW_RATE,
                )
            else:
                now = max(wall, last)
                if wall - last > elapsed + STEP_TOLERANCE_S:
                    log.warning(
                        "the wall clock stepped forward; intervals stay on the monotonic clock",
                        step_s=round(wall - last - elapsed, 1),
                    )
            self._last = (now, mono)
            return now

    def monotonic(self) -> float:
        """The monotonic clock, for intervals."""
        return self.timer()


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry ``attempt`` (1 = the first retry), in seconds.

    ``min(cap, base * 2**(attempt-1))``, of which the upper half is random
    ("equal jitter"): never zero, never in lock-step with other clients.
    """
    uniform = random.uniform if rng is None else rng.uniform
    full = min(cap, base * 2.0 ** max(0, attempt - 1))
    return full / 2 + uniform(0, full / 2)
