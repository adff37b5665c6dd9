"""The Daemon: wiring, start/stop, the scheduler tick, health.

``imageqc run``, the systemd unit and the Windows service all run this same
class. One instance per state folder (a file lock says so); on start it
recovers jobs left ``running`` or ``uploading`` by a previous instance, then
an APScheduler tick (in-memory, coalesced, one at a time) does the rounds:

1. recover expired leases, re-queue failed jobs whose retry time has come;
2. let each component (discovery, uploads, notifications) do its part;
3. hand due ``queued`` jobs to the worker while it has free slots;
4. jobs that finished QC with no upload configured become ``skipped``;
5. write a heartbeat that ``imageqc status`` reads from another process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from filelock import FileLock, Timeout

from daemon import __version__
from daemon.config import Config
from daemon.errors import DaemonError, DatabaseUnavailable
from daemon.logging import get_logger
from daemon.store import JobState, Store
from daemon.worker import JobRunner, ProcessWorker

__all__ = ["Component", "Daemon", "DEFAULT_TARGET", "AlreadyRunning", "heartbeat_age_limit", "default_components"]

log = get_logger("imageqc.service")

#: How often (seconds) the service looks for half-written outputs of killed QC runs.
OUTPUT_SWEEP_S = 600.0

#: The job function run in the worker child for each queued job.
DEFAULT_TARGET = "daemon.jobs:run_qc_job"


class AlreadyRunning(DaemonError):
    """Another imageqc service holds this state folder."""


class Component(Protocol):
    """A part of the service that plugs into the tick (discovery, uploads)."""

    name: str

    def start(self, daemon: Daemon) -> None: ...

    def tick(self, now: float) -> None: ...

    def stop(self) -> None:
        """Stop; a component that waits returns by the daemon's ``stop_deadline`` (a
        :func:`time.monotonic` value shared by every wait of the stop), abandoning what is stuck."""
        ...

    def health(self) -> dict[str, Any]: ...


def default_components(config: Config) -> list[Component]:
    """The service's pluggable parts (discovery, uploads, notifications when rules are set), as `imageqc run`
    and the services use them."""
    comps: list[Component] = []
    try:
        from daemon.discovery import Discovery
    except ImportError:  # pragma: no cover - partial installs only
        pass
    else:
        comps.append(Discovery(config))
    try:
        from daemon.upload.manager import UploadManager
    except ImportError:  # pragma: no cover - partial installs only
        pass
    else:
        comps.append(UploadManager(config))
    if config.notify.rule:
        from daemon.notify import Notifier

        comps.append(Notifier(config))
    return comps


def heartbeat_age_limit(config: Config) -> float:
    """A heartbeat older than this means the service is not running."""
    return max(15.0, 5 * config.service.tick_seconds)


class Daemon:
    """The service.

    Parameters
    ----------
    config : Config
    target : str
        The job function for the worker (``"module:function"``).
    runner : JobRunner, optional
        Where claimed jobs go; default a :class:`ProcessWorker`.
    components : sequence of Component
        Discovery, uploads and anything else that ticks.
    clock : callable
        Returns now in seconds.
    notify : callable, optional
        Receives service-manager notifications ("READY=1", "WATCHDOG=1", "STOPPING=1").
    """

    def __init__(
        self,
        config: Config,
        *,
        target: str = DEFAULT_TARGET,
        runner: JobRunner | None = None,
        components: Sequence[Component] = (),
        clock: Callable[[], float] = time.time,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.target = target
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.components = list(components)
        self._runner = runner
        self._notify = notify or (lambda _msg: None)
        self._stop = threading.Event()
        self._urgent = threading.Event()
        self._lock: FileLock | None = None
        self.store: Store | None = None
        self.runner: JobRunner | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.started_at: float | None = None
        self.last_tick_error: str | None = None
        #: Why the service stopped itself (None after a requested stop); `imageqc run` exits 1 when set.
        self.failure: str | None = None
        self._long_round_logged = float("-inf")
        self._last_sweep = float("-inf")
        #: When a stop must be over (:func:`time.monotonic`); set by :meth:`stop`, shared by every wait in it.
        self.stop_deadline: float | None = None
        self._signals = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(cfg.state_dir / "service.lock"))
        try:
            self._lock.acquire(timeout=0.5)
        except Timeout:
            msg = (
                f"another imageqc service is already running with state folder {cfg.state_dir}; "
                "stop it first (`imageqc status` shows it), or give this one its own state_dir"
            )
            raise AlreadyRunning(msg) from None
        try:
            self.store = Store(cfg.database_path)
            check = self.store.integrity_check()
            if check != "ok":
                msg = (
                    f"the job database {cfg.database_path} failed its integrity check ({check}); imageqc will not "
                    "run on it, to avoid losing state. Move it aside and start again: scan sets are rediscovered"
                )
                raise DatabaseUnavailable(msg)
        except BaseException:
            self._release()
            raise
        try:
            self._start_parts()
        except BaseException:
            log.exception("service failed to start")
            self.stop()
            raise
        log.info(
            "service started",
            version=__version__,
            config=cfg.source,
            state_dir=str(cfg.state_dir),
            roots=[str(w.path) for w in cfg.watch],
            uploads=[t.name for t in cfg.upload if t.mode != "none"],
            owner=self.owner,
        )
        self._notify("READY=1")

    def _start_parts(self) -> None:
        cfg = self.config
        assert self.store is not None
        now = self.clock()
        self.started_at = now
        # We hold the state folder's lock, so leases held by anyone else are orphans.
        recovered = self.store.recover_expired(now=float("inf"))
        if recovered:
            log.warning("recovered jobs left by a previous run", jobs=recovered)
        self._sweep_outputs(now)
        self.runner = self._runner or ProcessWorker(cfg, self.store, target=self.target, owner=self.owner, clock=self.clock)
        started: list[Component] = []
        try:
            for comp in self.components:
                comp.start(self)
                started.append(comp)
        finally:
            self.components_started = started
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.scheduler.add_job(self.tick, "interval", seconds=cfg.service.tick_seconds, id="tick", next_run_time=_dt_now())
        self.scheduler.start()
        self._heartbeat("running")

    def stop(self) -> None:
        """Stop cleanly: no new work; running QC jobs and transfers share ``shutdown_timeout_s`` (none
        after an urgent request), then go back to the queue. A transfer stuck in a request is abandoned."""
        self._stop.set()
        self._notify("STOPPING=1")
        grace = 0.0 if self._urgent.is_set() else self.config.service.shutdown_timeout_s
        self.stop_deadline = time.monotonic() + grace
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        for comp in reversed(getattr(self, "components_started", [])):
            try:
                comp.stop()
            except Exception:
                log.exception("component failed to stop", component=comp.name)
        if self.runner is not None:
            self.runner.stop(0.0 if self._urgent.is_set() else max(0.0, self.stop_deadline - time.monotonic()))
        if self.store is not None:
            try:
                self._heartbeat("stopped")
            except DaemonError as e:  # the database may be what failed
                log.warning("could not record the stop in the database", error=str(e))
            self.store.close()
            self.store = None
        self._release()
        log.info("service stopped")

    def _release(self) -> None:
        if self._lock is not None and self._lock.is_locked:
            self._lock.release()

    def request_stop(self, urgent: bool = False) -> None:
        if urgent:
            self._urgent.set()
        self._stop.set()

    def run_forever(self, *, install_signals: bool = True) -> None:
        """Start, wait for a stop request (signal or :meth:`request_stop`), stop."""
        if install_signals:
            self._install_signals()
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            # Counted before anything else: a second signal can run this handler again inside the
            # first one's logging call.
            self._signals += 1
            if self._signals > 1:
                # The first stop may be waiting on something stuck (a trickling server, a hung share):
                # the person or service manager asking twice gets an exit now. Leases and saved
                # transfer states make the next start resume whatever was running.
                log.warning("second signal: stopping now", signal=signum)
                _flush_logs()
                os._exit(128 + signum)
            self._stop.set()
            log.info("signal received: stopping", signal=signum)

        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGINT, handler)
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, handler)
        if sys.platform == "win32" and hasattr(signal, "SIGBREAK"):  # pragma: no cover - Windows console
            signal.signal(signal.SIGBREAK, handler)

    # -- the tick ------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """One round of the service's work; never raises (errors are logged)."""
        if self._stop.is_set() or self.store is None:
            return
        now = self.clock() if now is None else now
        started = time.monotonic()
        try:
            self._tick(now)
            self.last_tick_error = None
        except DatabaseUnavailable as e:
            self.last_tick_error = str(e)
            self.failure = str(e)
            log.error("job database unavailable; stopping the service", error=str(e))
            self._stop.set()
        except Exception as e:
            self.last_tick_error = f"{type(e).__name__}: {e}"
            log.exception("tick failed; the service keeps running")
        self._note_long_round(time.monotonic() - started)
        self._notify("WATCHDOG=1")

    def _sweep_outputs(self, now: float) -> None:
        """Remove the half-written outputs of QC writers that were killed (a crash, a timeout, a restart)."""
        from qc.report import remove_abandoned_outputs

        self._last_sweep = now
        try:
            removed = remove_abandoned_outputs(self.config.output_dir)
        except OSError as e:
            log.warning("could not clean half-written outputs", folder=str(self.config.output_dir), error=str(e))
            return
        if removed:
            log.info("removed half-written outputs of killed QC runs", paths=[str(p) for p in removed])

    def _note_long_round(self, seconds: float) -> None:
        """Log (at most once a minute) a round that outlasted the tick interval, so slow rounds show."""
        interval = self.config.service.tick_seconds
        if seconds <= interval:
            return
        mono = time.monotonic()
        if mono - self._long_round_logged < 60.0:
            return
        self._long_round_logged = mono
        log.info("a service round outlasted the tick interval; the next rounds start late", seconds=round(seconds, 1), tick_seconds=interval)

    def _tick(self, now: float) -> None:
        store, runner = self.store, self.runner
        assert store is not None and runner is not None
        for job_id in store.recover_expired(now=now):
            log.warning("lease expired; job re-queued", job_id=job_id)
        requeued = store.requeue_due(now=now, max_attempts=self.config.service.max_attempts)
        if requeued:
            log.info("retrying failed jobs", jobs=requeued)
        for comp in self.components:
            if self._stop.is_set():
                return
            try:
                comp.tick(now)
            except DatabaseUnavailable:
                raise
            except Exception:
                log.exception("component tick failed", component=comp.name)
        while runner.free_slots() > 0 and not self._stop.is_set():
            job = store.claim(self.owner, now=now, lease_s=self.config.service.lease_seconds)
            if job is None:
                break
            runner.submit(job)
        if now - self._last_sweep >= OUTPUT_SWEEP_S:
            self._sweep_outputs(now)
        if not any(t.mode != "none" for t in self.config.upload):
            for job in store.list_jobs(states=[JobState.QC_DONE]):
                store.transition(job.id, JobState.SKIPPED, now=now, message="QC done; no upload configured")
        self._heartbeat("running", now)

    # -- health ---------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "state": "stopped" if self._stop.is_set() else "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "owner": self.owner,
            "version": __version__,
            "config": self.config.source,
            "started_at": self.started_at,
            "tick_seconds": self.config.service.tick_seconds,
            "last_tick_error": self.last_tick_error,
            "active": self.runner.active() if self.runner else [],
            "components": {c.name: _safe_health(c) for c in self.components},
        }

    def _heartbeat(self, state: str, now: float | None = None) -> None:
        if self.store is None:
            return
        h = self.health()
        h["state"] = state
        self.store.set_status("service", h, now=self.clock() if now is None else now)


def _flush_logs() -> None:
    """Flush the log handlers before an immediate exit (best effort: never blocks on a busy handler)."""
    import logging

    for h in logging.getLogger().handlers:
        if h.lock is None or h.lock.acquire(timeout=0.5):
            try:
                with contextlib.suppress(Exception):  # exiting anyway
                    h.flush()
            finally:
                if h.lock is not None:
                    h.lock.release()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _safe_health(comp: Component) -> dict[str, Any]:
    try:
        return comp.health()
    except Exception as e:  # health must never break the heartbeat
        return {"error": f"{type(e).__name__}: {e}"}


def _dt_now() -> Any:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def state_paths(config: Config) -> dict[str, Path]:
    return {"state_dir": config.state_dir, "database": config.database_path, "log": config.log_file}
