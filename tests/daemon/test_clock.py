"""The service clock: wall-clock time that never runs backwards (issue #20 case 8)."""

from __future__ import annotations

import random

from daemon.clock import SLEW_RATE, ServiceClock, backoff


class Clocks:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall, self.mono = 1_800_000_000.0, 100.0

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s


def test_time_follows_the_wall_clock_and_slows_down_when_it_steps_back_until_it_catches_up():
    c = Clocks()
    clock = ServiceClock(lambda: c.wall, lambda: c.mono)
    t0 = clock()
    assert t0 == c.wall
    c.advance(5)
    assert clock() == t0 + 5
    c.wall -= 600  # NTP steps the wall clock back ten minutes
    assert clock() == t0 + 5  # not back
    c.advance(10)
    assert clock() == t0 + 5 + 10 * SLEW_RATE  # on, slower than the monotonic clock
    seen = []
    for _ in range(300):
        c.advance(5)
        seen.append(clock())
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # never back, never still
    assert clock() == c.wall  # caught up (600 s at half pace take 1200 s): the wall clock again
    c.advance(1)
    assert clock() == c.wall


def test_a_step_forward_is_taken_at_once():
    c = Clocks()
    clock = ServiceClock(lambda: c.wall, lambda: c.mono)
    t0 = clock()
    c.wall += 3600
    assert clock() == t0 + 3600
    assert clock.monotonic() == c.mono


def test_small_jitter_back_never_goes_backwards_and_never_drifts_ahead():
    c = Clocks()
    clock = ServiceClock(lambda: c.wall, lambda: c.mono)
    seen = [clock()]
    for _ in range(100):
        c.mono += 1.0
        c.wall += 0.999  # a wall clock slightly slower than the monotonic one
        seen.append(clock())
    assert seen == sorted(seen)
    assert seen[-1] - c.wall < 1.0


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(7)
    delays = [backoff(n, base=1.0, cap=60.0, rng=rng) for n in range(1, 10)]
    for n, d in enumerate(delays, start=1):
        full = min(60.0, 2 ** (n - 1))
        assert full / 2 <= d <= full  # equal jitter: never zero, never above the step
    assert max(delays) <= 60.0
    assert len({round(d, 6) for d in delays}) == len(delays)  # jitter: no two clients in lock-step
