"""Run a claimed job in a child process, at low priority, under a lease.

The service claims a job (``queued -> running``) and hands it to a
:class:`ProcessWorker`. The worker keeps warm child processes, started with the
``spawn`` method (the same on Windows and Linux) at low CPU and I/O priority
with capped threads, which import the job function once and then run job after
job (``qc.worker_jobs`` each, then they are replaced), so a job does not pay a
process start and imports. From the parent it:

- renews the job's lease while the child runs; a job cancelled meanwhile (the
  lease is gone) stops the child;
- stops a child that runs past ``timeout_s`` (on the monotonic clock: a step
  of the wall clock neither kills nor spares a QC run) or uses more than
  ``memory_limit_mb`` of resident memory;
- turns the child's outcome (or its death) into the job's next state.

The child runs ``target(ctx)``, a function named ``"module:function"``, which
receives a :class:`JobContext` and returns a :class:`JobOutcome`. A child that
is stopped (timeout, memory, cancel, service stop) or dies is never reused: its
job's outcome is decided as before and a fresh child serves the next job. The
child also watches its parent and exits if the service died, so a killed
service leaves no orphan writing results (writes are owner-checked anyway).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from daemon.clock import backoff
from daemon.config import Config
from daemon.errors import DaemonError, DatabaseUnavailable, IllegalTransition
from daemon.logging import bind_job, configure_logging, get_logger
from daemon.qcsettings import no_huge_page_stalls
from daemon.store import Job, JobState, Store

__all__ = [
    "THREAD_ENV_VARS",
    "JobContext",
    "JobOutcome",
    "JobRunner",
    "ProcessWorker",
    "apply_priority",
]

log = get_logger("imageqc.worker")

#: Environment variables that cap the thread pools of numpy/BLAS/OpenCV/onnxruntime.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "OPENCV_NUM_THREADS",
)


@dataclass(frozen=True)
class JobOutcome:
    """What a job function reports back.

    ``state`` is the job's next state (``qc_done``, ``done``, ``skipped`` or
    ``failed``). A failure is ``transient`` when a retry may succeed (a share
    briefly gone) and permanent when it cannot (a corrupt image). ``stage`` is
    the job's ``failed_stage`` (``files``: its files could not be reached).
    """

    state: str
    message: str = ""
    error: str | None = None
    transient: bool = False
    data: dict[str, Any] | None = None
    stage: str = "qc"


@dataclass(frozen=True)
class JobContext:
    """Everything a job function gets in the child process."""

    job: Job
    config: Config
    owner: str
    db_path: str
    progress: Callable[[str, float | None], None] = field(repr=False, compare=False)

    def open_store(self) -> Store:
        """The child's own connection to the job database (never creates one: see :class:`Store`)."""
        return Store(self.db_path, create=False)


class JobRunner(Protocol):
    """Where the service hands claimed jobs (a process pool, or in tests a thread)."""

    def free_slots(self) -> int: ...

    def submit(self, job: Job) -> None: ...

    def active(self) -> list[dict[str, Any]]: ...

    def stop(self, timeout: float) -> None: ...


def apply_priority(level: str, proc: psutil.Process | None = None) -> None:
    """Lower CPU and I/O priority of ``proc`` (default: this process). Best effort."""
    if level == "normal":
        return
    proc = proc or psutil.Process()
    try:
        if sys.platform == "win32":
            cls = psutil.IDLE_PRIORITY_CLASS if level == "low" else psutil.BELOW_NORMAL_PRIORITY_CLASS
            proc.nice(cls)
        else:
            proc.nice(19 if level == "low" else 10)
    except (psutil.Error, OSError):  # pragma: no cover - permission quirks
        pass
    try:
        if sys.platform.startswith("linux"):
            proc.ionice(
                psutil.IOPRIO_CLASS_IDLE if level == "low" else psutil.IOPRIO_CLASS_BE,
                *(() if level == "low" else (7,)),
            )
        elif sys.platform == "win32":
            proc.ionice(psutil.IOPRIO_LOW)
    except (psutil.Error, OSError, AttributeError, ValueError):  # pragma: no cover - platform quirks
        pass


def _resolve(target: str) -> Callable[[JobContext], JobOutcome]:
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)  # type: ignore[no-any-return]


def _warm(target: str, config: Config) -> None:
    """Call the job module's ``warm(config)`` when it has one: what every job needs (the QC modules it imports
    lazily, their libraries), loaded once per worker before its first job rather than inside it."""
    warm = getattr(importlib.import_module(target.partition(":")[0]), "warm", None)
    if not callable(warm):
        return
    try:
        warm(config)
    except Exception:  # the first job then does the same work, and reports what fails
        log.exception("QC worker could not warm up", target=target)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if not psutil.pid_exists(parent_pid):
            os._exit(3)  # the service died: leave the job to lease recovery


def _child_setup(config: Config, parent_pid: int) -> None:
    threads = str(config.qc.threads)
    for var in THREAD_ENV_VARS:
        os.environ[var] = threads
    apply_priority(config.qc.priority)
    no_huge_page_stalls()
    configure_logging(
        level=config.logging.level,
        file=config.log_file,
        max_bytes=config.logging.max_bytes,
        backups=config.logging.backups,
        console="off",
    )
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()


def _run_one(target: str, job: Job, config: Config, owner: str, db_path: str) -> dict[str, Any]:
    """Run one job in this (child) process; returns its outcome as a dict."""
    try:
        store = Store(db_path, create=False)
    except DaemonError as e:  # the database went away under the service: it notices and stops
        log.error("QC child cannot open the job database", error=str(e))
        return dataclasses.asdict(JobOutcome(state="failed", error=str(e), transient=True))
    last = [float("-inf")]

    def progress(stage: str, pct: float | None) -> None:
        mono = time.monotonic()
        if mono - last[0] >= 0.5 or pct in (0.0, 100.0):
            last[0] = mono
            store.set_progress(job.id, owner, stage, pct, now=time.time())

    ctx = JobContext(job=job, config=config, owner=owner, db_path=db_path, progress=progress)
    with bind_job(job.id, job.chip):
        try:
            outcome = _resolve(target)(ctx)
        except DatabaseUnavailable as e:  # the database went away (or is locked) under the job: not the image's fault
            log.error("QC child lost the job database", error=str(e))
            outcome = JobOutcome(state="failed", error=str(e), transient=True)
        except Exception as e:  # a failing job never kills the worker
            log.exception("job function raised", target=target)
            outcome = JobOutcome(state="failed", error=f"{type(e).__name__}: {e}", transient=False)
    store.close()
    return dataclasses.asdict(outcome)


def _warm_main(target: str, config: Config, db_path: str, jobs: Any, results: Any, parent_pid: int) -> None:
    """Entry point of a warm child: set up once, import the job function, then run the jobs sent to it.

    ``jobs`` carries ``(job, owner)`` pairs, ``None`` to exit; every outcome
    goes to ``results``.
    """
    _child_setup(config, parent_pid)
    try:
        _resolve(target)  # the imports (and what they load) happen once, before the first job
    except Exception:  # reported per job, by _run_one
        log.exception("QC worker could not import its job function", target=target)
    else:
        _warm(target, config)
    while True:
        item = jobs.get()
        if item is None:
            return
        job, owner = item
        results.put(_run_one(target, job, config, owner, db_path))


@dataclass
class _Child:
    """A warm worker process and its two queues."""

    process: Any
    jobs: Any
    results: Any
    served: int = 0


@dataclass
class _Running:
    job: Job
    child: _Child
    started: float  # wall clock, for people
    started_t: float  # the worker's timer, for the timeout
    thread: threading.Thread | None = None
    stop_reason: str | None = None


class ProcessWorker:
    """Runs jobs in child processes, up to ``slots`` at a time.

    Parameters
    ----------
    config : Config
    store : Store
        The service's store (the parent's connection).
    target : str
        ``"module:function"`` run in the child for each job.
    owner : str
        The lease owner name of this service instance.
    clock : callable
        The wall clock, seconds since the epoch, for the times stored in the database (tests pass their own).
    timer : callable
        A monotonic clock in seconds: ``qc.timeout_s`` and the lease renewals are measured on it.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        target: str,
        owner: str,
        slots: int | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
        poll_s: float = 0.25,
    ) -> None:
        self.config = config
        self.store = store
        self.target = target
        self.owner = owner
        self.slots = slots or config.service.workers
        self.clock = clock
        self.timer = timer
        self.poll_s = poll_s
        self._ctx = mp.get_context("spawn")
        self._idle: list[_Child] = []  # warm children waiting for a job
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # -- JobRunner -----------------------------------------------------------

    def free_slots(self) -> int:
        with self._lock:
            return 0 if self._stopping.is_set() else self.slots - len(self._running)

    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"job_id": r.job.id, "chip": r.job.chip, "pid": r.child.process.pid, "started": r.started}
                for r in self._running.values()
            ]

    def submit(self, job: Job) -> None:
        with self._lock:
            child = None
            while self._idle and child is None:
                candidate = self._idle.pop()
                if candidate.process.is_alive():
                    child = candidate
                else:
                    candidate.process.join(0)
        if child is None:
            child = self._spawn()
        child.served += 1
        child.jobs.put((job, self.owner))
        run = _Running(job=job, child=child, started=self.clock(), started_t=self.timer())
        with self._lock:
            self._running[job.id] = run
        run.thread = threading.Thread(target=self._supervise, args=(run,), name=f"supervise-{job.id}", daemon=True)
        run.thread.start()

    def _spawn(self) -> _Child:
        jobs, results = self._ctx.Queue(), self._ctx.Queue()
        proc = self._ctx.Process(
            target=_warm_main,
            args=(self.target, self.config, str(self.store.path), jobs, results, os.getpid()),
            name="imageqc-qc-worker",
            daemon=True,
        )
        proc.start()
        with _suppress_psutil():
            apply_priority(self.config.qc.priority, psutil.Process(proc.pid))
        return _Child(proc, jobs, results)

    def _release(self, child: _Child) -> None:
        """A child whose job ended normally: keep it warm for the next job, or let it go."""
        limit_mb = self.config.qc.memory_limit_mb
        rss = _rss_mb(child.process.pid) if limit_mb else None
        keep = (
            not self._stopping.is_set()
            and child.served < self.config.qc.worker_jobs
            and child.process.is_alive()
            and (rss is None or rss <= limit_mb)
        )
        if keep:
            with self._lock:
                if len(self._idle) < self.slots:
                    self._idle.append(child)
                    return
        _dismiss(child)

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for running jobs, then stop them and return them to the queue; end the warm children."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for run in list(self._running.values()):
            if run.thread:
                run.thread.join(max(0.0, deadline - time.monotonic()))
        for run in list(self._running.values()):
            run.stop_reason = "service stopping"
            _terminate(run.child.process)
            if run.thread:
                run.thread.join(5.0)
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            _dismiss(child)

    def join(self, timeout: float | None = None) -> None:
        """Wait for every running job (tests)."""
        for run in list(self._running.values()):
            if run.thread:
                run.thread.join(timeout)

    # -- supervision -----------------------------------------------------------

    def _supervise(self, run: _Running) -> None:
        job, proc = run.job, run.child.process
        lease_s = self.config.service.lease_seconds
        renew_every = max(0.5, lease_s / 4)
        last_renew = self.timer()
        limit_mb = self.config.qc.memory_limit_mb
        timeout_s = self.config.qc.timeout_s
        outcome: dict[str, Any] | None = None
        with bind_job(job.id, job.chip):
            log.info("job started", pid=proc.pid, target=self.target, worker_job=run.child.served)
            while True:
                try:
                    outcome = run.child.results.get(timeout=self.poll_s)
                    break
                except queue.Empty:
                    pass
                if not proc.is_alive():
                    try:  # the result may have landed just before exit
                        outcome = run.child.results.get(timeout=0.5)
                    except queue.Empty:
                        outcome = None
                    break
                if run.stop_reason:
                    break
                if self.timer() - last_renew >= renew_every:
                    last_renew = self.timer()
                    if not self.store.renew_lease(job.id, self.owner, now=self.clock(), lease_s=lease_s):
                        run.stop_reason = "cancelled"  # lease gone: cancelled or recovered elsewhere
                        break
                if self.timer() - run.started_t > timeout_s:
                    run.stop_reason = f"QC took longer than qc.timeout_s = {timeout_s:g} s"
                    break
                if limit_mb:
                    rss = _rss_mb(proc.pid)
                    if rss is not None and rss > limit_mb:
                        run.stop_reason = f"QC used {rss:.0f} MB, more than qc.memory_limit_mb = {limit_mb}"
                        break
            if outcome is None:  # stopped or dead: never reused
                _terminate(proc)
                proc.join(10)
            else:
                self._release(run.child)
            try:
                self._finish(run, outcome)
            finally:  # even when the database failed: the slot is free again
                with self._lock:
                    self._running.pop(job.id, None)

    def _finish(self, run: _Running, outcome: dict[str, Any] | None) -> None:
        job = run.job
        now = self.clock()
        try:
            if outcome is not None:
                self._apply_outcome(job, JobOutcome(**outcome), now)
            elif run.stop_reason == "cancelled":
                log.warning("job stopped: its lease was taken away (cancelled or recovered)")
            elif run.stop_reason == "service stopping":
                self.store.transition(
                    job.id, JobState.QUEUED, now=now, owner=self.owner, message="service stopped; job re-queued"
                )
                log.info("job returned to the queue because the service is stopping")
            elif run.stop_reason:
                self._fail(job, run.stop_reason, transient=False, now=now)
            else:
                code = run.child.process.exitcode
                self._fail(job, f"QC process ended unexpectedly (exit code {code})", transient=True, now=now)
        except IllegalTransition as e:
            log.warning("job outcome not recorded: the job changed meanwhile", detail=str(e))

    def _apply_outcome(self, job: Job, out: JobOutcome, now: float) -> None:
        if out.state == JobState.FAILED.value:
            self._fail(job, out.error or out.message or "failed", transient=out.transient, now=now, stage=out.stage)
            return
        self.store.transition(job.id, out.state, now=now, owner=self.owner, message=out.message, data=out.data)
        log.info("job finished", state=out.state, detail=out.message)

    def _fail(self, job: Job, error: str, *, transient: bool, now: float, stage: str = "qc") -> None:
        svc = self.config.service
        fresh = self.store.get_job(job.id)
        retry_at = None
        if transient and fresh.attempts < svc.max_attempts:
            retry_at = now + backoff(fresh.attempts, base=svc.retry_base_s, cap=svc.retry_max_s)
        self.store.transition(
            job.id,
            JobState.FAILED,
            now=now,
            owner=self.owner,
            error=error,
            failed_stage=stage,
            next_attempt_at=retry_at,
        )
        log.error("job failed", error=error, transient=transient, retry_at=retry_at, attempts=fresh.attempts)


class _suppress_psutil:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, (psutil.Error, OSError))


def _rss_mb(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except (psutil.Error, OSError):
        return None


def _dismiss(child: _Child) -> None:
    """Ask a warm child to exit; make sure it does."""
    with contextlib.suppress(OSError, ValueError):
        child.jobs.put(None)
    child.process.join(5)
    _terminate(child.process)


def _terminate(proc: Any) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():  # pragma: no cover - stubborn child
        proc.kill()
        proc.join(5)
