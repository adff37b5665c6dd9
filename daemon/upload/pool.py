"""A thread pool for network transfers that a stop never has to wait for.

:class:`concurrent.futures.ThreadPoolExecutor` joins its threads at
interpreter exit, so one request stuck on a server that trickles its
response (a few bytes a second: no read timeout ever fires) keeps the whole
process alive until the server lets go. The workers here are daemon threads:
:meth:`DaemonPool.shutdown` waits at most until a deadline, and a thread
still inside a request after that is abandoned; the process exits without
it. What such a transfer did is in the store (its record stays ``active`` or
``pending``), so the next start resumes it.

Only for work whose state is saved as it goes (uploads): a daemon thread is
cut off wherever it is when the process exits.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["DaemonPool"]

T = TypeVar("T")

_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonPool:
    """Up to ``workers`` daemon threads running submitted calls (the ``submit`` of an executor).

    Parameters
    ----------
    workers : int
        Threads at most; they are started as work arrives.
    name : str
        Thread name prefix (``<name>_<n>``).
    """

    def __init__(self, workers: int, name: str = "pool") -> None:
        if workers < 1:
            msg = f"a pool needs at least one worker, not {workers}"
            raise ValueError(msg)
        self.workers = workers
        self.name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in a worker; its :class:`~concurrent.futures.Future`."""
        with self._lock:
            if self._closed:
                msg = f"thread pool {self.name} is shut down"
                raise RuntimeError(msg)
            future: Future[T] = Future()
            self._queue.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.workers:
                t = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)  # wake the next worker too
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:  # handed to the future, as an executor does
                    future.set_exception(e)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> bool:
        """No more work; optionally cancel what has not started and wait (at most ``timeout`` seconds).

        Returns whether every worker has ended. Workers still busy when it
        returns (a stuck request) end with their call, or with the process.
        """
        with self._lock:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self._queue.put(None)
            threads = list(self._threads)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)
