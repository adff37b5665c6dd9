"""The real discovery in a real in-process Daemon, for the discovery tests and the file-system fault tests.

:class:`DiscoveryServices` (the ``discovery_service`` fixture in tests/conftest.py) starts a Daemon
with one :class:`~daemon.discovery.Discovery` for a config the test made, and stops every one it
started at teardown. :func:`rescans` is how a test lets discovery do more rounds before checking
that nothing new was queued.
"""

from __future__ import annotations

from typing import Any

from daemon.config import Config
from daemon.discovery import Discovery
from daemon.service import Daemon
from tests.helpers import wait_until


class NullRunner:
    """Claims nothing: queued jobs stay queued (for tests about queueing only)."""

    def free_slots(self) -> int:
        return 0

    def submit(self, job: Any) -> None:  # pragma: no cover - never called
        raise AssertionError("NullRunner claims no job")

    def active(self) -> list[Any]:
        return []

    def stop(self, timeout: float) -> None:
        pass


class DiscoveryServices:
    """Starts Daemons with discovery for the test; :meth:`close` stops those still running."""

    def __init__(self) -> None:
        self.running: list[Daemon] = []

    def start(
        self, cfg: Config, *, runner: Any = None, target: str = "tests.daemon.targets:ok", **discovery: Any
    ) -> tuple[Daemon, Discovery, Config]:
        """A started Daemon whose one component is ``Discovery(cfg, **discovery)``; returns (daemon, discovery, cfg)."""
        disc = Discovery(cfg, **discovery)
        d = Daemon(cfg, target=target, runner=runner, components=[disc])
        d.start()
        self.running.append(d)
        return d, disc, cfg

    def stop(self, d: Daemon) -> None:
        self.running.remove(d)
        d.stop()

    def close(self) -> None:
        while self.running:
            self.stop(self.running[-1])


def rescans(disc: Discovery, n: int = 2, *, timeout: float = 30.0) -> None:
    """Until discovery's rescanner has walked its roots ``n`` more times and its ticks took every result in.

    Counts every walk, a missing root's too. After the ``n``-th walk, waiting for the result queue to
    drain means the walks before it were applied by a tick: what a test waits for before it checks
    that nothing new was queued, instead of sleeping for a guessed time.
    """
    rs = disc._rescanner
    assert rs is not None, "discovery has no rescanner (not started?)"
    counter = rs.__dict__.get("_test_walks")
    if counter is None:
        counter = rs._test_walks = [0]
        walk = rs._scan

        def counted(root: str) -> None:
            walk(root)
            counter[0] += 1

        rs._scan = counted  # the rescanner's thread looks it up on every walk
    target = counter[0] + n
    wait_until(
        lambda: counter[0] >= target and rs.results.empty(),
        f"{n} more rescans, applied",
        timeout=timeout,
        seen=lambda: f"{counter[0] - target + n} walks done, {rs.results.qsize()} results not applied",
    )
