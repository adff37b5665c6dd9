"""The transfers' thread pool: a stop never joins a call stuck in a request."""

from __future__ import annotations

import threading

import pytest

from daemon.upload.pool import DaemonPool
from tests.helpers import scaled


def test_results_and_errors_reach_the_futures():
    pool = DaemonPool(2, "t")
    try:
        assert [f.result(scaled(30)) for f in [pool.submit(pow, 2, n) for n in range(5)]] == [1, 2, 4, 8, 16]
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(scaled(30))
    finally:
        assert pool.shutdown(wait=True, timeout=scaled(30))


def test_a_stuck_call_is_abandoned_at_shutdown_and_queued_work_is_cancelled():
    release = threading.Event()
    pool = DaemonPool(1, "stuck")
    stuck = pool.submit(release.wait, 600)
    queued = pool.submit(int, "1")
    assert not pool.shutdown(wait=True, cancel_futures=True, timeout=0.2)  # returns although a worker is busy
    assert queued.cancelled() and not stuck.done()
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("stuck_"))  # the exit does not wait for it
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(int, "2")
    release.set()
    assert stuck.result(scaled(30)) is True
