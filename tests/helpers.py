"""Small helpers shared by the tests: the slowdown setting, waits on conditions, the shared data.

Every wait deadline and subprocess timeout in the tests goes through :func:`scaled`, so one setting,
``IMAGEQC_TEST_SLOWDOWN`` (a factor, default 1), gives a slow or busy machine more time without
touching a test. Waits poll a condition until a deadline (:func:`wait_until`, :func:`wait_for`);
none sleeps for a guessed time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]

#: The environment variable that scales every wait deadline and subprocess timeout in the tests.
SLOWDOWN_ENV = "IMAGEQC_TEST_SLOWDOWN"


def _read_slowdown() -> float:
    raw = os.environ.get(SLOWDOWN_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        msg = f"{SLOWDOWN_ENV}={raw!r}: must be a positive number (a factor for every wait in the tests, default 1)"
        raise ValueError(msg)
    return value


#: The factor read once from ``IMAGEQC_TEST_SLOWDOWN`` (default 1).
SLOWDOWN = _read_slowdown()

#: The ``[qc]`` table of the tests' service configs. At the default "low" priority (nice 19, idle I/O) a QC
#: child gets almost no CPU beside a CPU hog at normal priority, and the suite must pass on a busy machine;
#: tests/daemon/test_worker.py checks "low" itself.
QC_NORMAL_PRIORITY = '[qc]\npriority = "normal"\n'


def scaled(seconds: float) -> float:
    """``seconds`` times the slowdown factor: use it for every deadline and subprocess timeout."""
    return seconds * SLOWDOWN


def _describe_timeout(timeout: float) -> str:
    extra = f" ({timeout * SLOWDOWN:g} s with {SLOWDOWN_ENV}={SLOWDOWN:g})" if SLOWDOWN != 1 else ""
    return f"{timeout:g} s{extra}"


def wait_for(pred: Callable[[], object], timeout: float = 30.0, every: float = 0.05) -> bool:
    """Poll ``pred`` until it is true or ``scaled(timeout)`` seconds pass; returns whether it became true.

    For a wait whose timing-out is an answer the test handles; otherwise use :func:`wait_until`,
    which fails with what it waited for and what it saw.
    """
    deadline = time.monotonic() + scaled(timeout)
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def wait_until(
    pred: Callable[[], T],
    what: str,
    *,
    timeout: float = 30.0,
    seen: Callable[[], object] | None = None,
    every: float = 0.05,
) -> T:
    """Poll ``pred`` until it returns something truthy and return that; fail the test at ``scaled(timeout)``.

    The failure says ``what`` was awaited and what was seen last: ``seen()`` when given (the job
    states, a log tail), else the predicate's last value.
    """
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(every)
    try:
        last = seen() if seen is not None else value
    except Exception as e:
        last = f"(could not read it: {e!r})"
    pytest.fail(f"timed out after {_describe_timeout(timeout)} waiting for {what}; last seen: {last!r}")


def wait_job(store: Any, job_id: int, *, timeout: float = 30.0, **want: object) -> Any:
    """Until job ``job_id`` in ``store`` has the given values (``stage="sleeping"``, ``state="skipped"``); returns it.

    Fails with the job as it was seen last.
    """

    def matches() -> Any:
        job = store.get_job(job_id)
        return job if all(getattr(job, k) == v for k, v in want.items()) else None

    said = ", ".join(f"{k} {v!r}" for k, v in want.items())
    return wait_until(matches, f"job {job_id} to reach {said}", timeout=timeout, seen=lambda: store.get_job(job_id))


def wait_changes(read: Callable[[], object], n: int, what: str, *, timeout: float = 30.0, every: float = 0.02) -> None:
    """Until the value ``read()`` returns has changed ``n`` times (rescans finished, heartbeats written).

    How a test lets the service do more rounds before it checks that nothing new happened, instead of
    sleeping for a guessed time that a busy machine may not fill. ``None`` readings are not counted.
    """
    last = [read()]
    changes = [0]

    def changed() -> bool:
        value = read()
        if value is not None and value != last[0]:
            changes[0] += 1
            last[0] = value
        return changes[0] >= n

    wait_until(changed, f"{what} ({n} times)", timeout=timeout, every=every, seen=lambda: f"{changes[0]} so far")


def run_child(
    args: Sequence[str], *, timeout: float = 120.0, what: str | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(args, capture_output=True, text=True)`` with a scaled timeout.

    When the timeout expires the test fails with what the child printed last, not only that it
    took too long.
    """
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=scaled(timeout), **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"{what or args[0]} did not finish within {_describe_timeout(timeout)}; it printed last:\n"
            f"{tail(e.stdout)}\n--- stderr ---\n{tail(e.stderr)}"
        )


def tail(text: str | bytes | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a child's output (bytes decoded), for a failure message."""
    if text is None:
        return "(nothing)"
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "(nothing)"


def dead_pid() -> int:
    """The process id of a child that has already exited (nothing runs under it now)."""
    out = run_child([sys.executable, "-c", "import os; print(os.getpid())"], timeout=60, check=True)
    return int(out.stdout)


def shared_data_dir() -> Path:
    """The real reference data: ``$IMAGEQC_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("IMAGEQC_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


def require_shared_data(*needs: str) -> Path:
    """:func:`shared_data_dir`, failing the test with how to fix it when it (or a ``needs`` subfolder) is missing."""
    path = shared_data_dir()
    missing = [p for p in (path, *(path / n for n in needs)) if not p.is_dir()]
    if missing:
        pytest.fail(
            f"the real reference data is missing at {missing[0]}: check out `shared/` beside the repository "
            "or set IMAGEQC_SHARED_DATA"
        )
    return path
