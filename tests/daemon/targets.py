"""Job functions the worker tests run in real child processes."""

from __future__ import annotations

import os
import time

import psutil

from daemon.worker import JobContext, JobOutcome
from tests.helpers import scaled


def ok(ctx: JobContext) -> JobOutcome:
    ctx.progress("qc", 50.0)
    with ctx.open_store() as store:
        store.save_result(ctx.job.id, verdict="pass", report={"schema": "imageqc.report/1", "chip": ctx.job.chip})
    ctx.progress("qc", 100.0)
    return JobOutcome(state="qc_done", message="test pass")


def boom(ctx: JobContext) -> JobOutcome:
    raise ValueError("the image is upside down")


def transient(ctx: JobContext) -> JobOutcome:
    return JobOutcome(state="failed", error="share went away", transient=True)


def sleep_long(ctx: JobContext) -> JobOutcome:
    ctx.progress("sleeping", 0.0)
    time.sleep(scaled(300))  # longer than any test waits: the tests stop or cancel it
    return JobOutcome(state="qc_done")


def hog_memory(ctx: JobContext) -> JobOutcome:
    blocks = []
    for _ in range(200):
        blocks.append(bytearray(50 * 2**20))  # touched: counts as resident
        time.sleep(0.05)
    return JobOutcome(state="qc_done")


def report_environment(ctx: JobContext) -> JobOutcome:
    proc = psutil.Process()
    from numpy._core import multiarray

    data = {
        "nice": proc.nice(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "pid": os.getpid(),
        "huge_pages": multiarray._get_madvise_hugepage(),
    }
    return JobOutcome(state="qc_done", message="env", data=data)


def crash(ctx: JobContext) -> JobOutcome:
    os._exit(17)


def wait_for_go(ctx: JobContext) -> JobOutcome:
    """Report stage ``waiting``, then wait (up to five minutes, scaled) for the file ``<state_dir>/go-<job id>``; then as :func:`ok`."""
    ctx.progress("waiting", 0.0)
    go = ctx.config.state_dir / f"go-{ctx.job.id}"
    deadline = time.monotonic() + scaled(300)
    while not go.exists():
        if time.monotonic() > deadline:
            return JobOutcome(state="failed", error=f"{go} never appeared")
        time.sleep(0.05)
    return ok(ctx)


def environment_or_crash(ctx: JobContext) -> JobOutcome:
    """:func:`report_environment`, but the process dies (exit 17) for a chip named ``CRASH``."""
    if ctx.job.chip == "CRASH":
        os._exit(17)
    return report_environment(ctx)


#: Set by :func:`warm` in the worker child, before its first job.
WARMED: list[int] = []


def warm(config) -> None:
    """The worker calls a job module's ``warm(config)`` once, before its first job."""
    WARMED.append(os.getpid())


def report_warm(ctx: JobContext) -> JobOutcome:
    return JobOutcome(state="qc_done", message="warm", data={"warmed": list(WARMED), "pid": os.getpid()})
