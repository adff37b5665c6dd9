"""The Daemon: wiring, start/stop, the tick, health.

``imageqc run``, the systemd unit and the Windows service all run this same
class. One instance per state folder (a file lock says so); on start it
recovers jobs left ``running`` or ``uploading`` by a previous instance, then
a tick thread does the rounds, one at a time, every ``service.tick_seconds``
on the monotonic clock (a step of the wall clock neither freezes nor hurries
it; see :mod:`daemon.clock` for the times the service stores):

1. recover expired leases of other owners (this service watches its own jobs
   directly), re-queue failed jobs whose retry time has come;
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
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock, Timeout

from daemon import __version__
from daemon.clock import ServiceClock
from daemon.config import Config
from daemon.errors import DaemonError, DatabaseUnavailable
from daemon.logging import get_logger
from daemon.stateguard import (
    DatabaseLost,
    StateGuard,
    StateLost,
    copy_failed,
    live_service,
    read_heartbeat,
    restore_saved_copy,
    saved_copy_name,
)
from daemon.store import JobState, Store
from daemon.worker import JobRunner, ProcessWorker

__all__ = [
    "DEFAULT_TARGET",
    "AlreadyRunning",
    "Component",
    "Daemon",
    "default_components",
    "exit_past_abandoned_threads",
    "heartbeat_age_limit",
]

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
    """The service's pluggable parts (discovery, live QC of growing tile folders, uploads, notifications when rules
    are set, the status page when web.listen is set, the fleet document when uploads are), as `imageqc run` and the
    services use them."""
    comps: list[Component] = []
    try:
        from daemon.discovery import Discovery
    except ImportError:  # pragma: no cover - partial installs only
        pass
    else:
        comps.append(Discovery(config))
        if config.live.enabled:
            from daemon.live import LiveQC

            comps.append(LiveQC(config))
    try:
        from daemon.upload.manager import UploadManager
    except ImportError:  # pragma: no cover - partial installs only
        pass
    else:
        comps.append(UploadManager(config))
    if config.notify.rule:
        from daemon.notify import Notifier

        comps.append(Notifier(config))
    if config.web.listen:
        from daemon.web import WebServer

        comps.append(WebServer(config))
    if config.fleet.interval_s and any(t.mode != "none" for t in config.upload):
        from daemon.fleet import FleetReporter

        comps.append(FleetReporter(config))
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
        The wall clock, seconds since the epoch (tests pass one they can step). The service uses it
        through a :class:`~daemon.clock.ServiceClock` (:attr:`clock`), which never runs backwards.
    timer : callable
        A monotonic clock in seconds: the tick interval, QC timeouts and lease renewals run on it.
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
        timer: Callable[[], float] = time.monotonic,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.target = target
        self.clock = ServiceClock(clock, timer)
        self.timer = timer
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.components = list(components)
        self._runner = runner
        self._notify = notify or (lambda _msg: None)
        self._stop = threading.Event()
        self._urgent = threading.Event()
        self._lock: FileLock | None = None
        self.store: Store | None = None
        self.runner: JobRunner | None = None
        self._ticker: threading.Thread | None = None
        self.started_at: float | None = None
        self.last_tick_error: str | None = None
        #: Why the service stopped itself (None after a requested stop); `imageqc run` exits 1 when set.
        self.failure: str | None = None
        self._long_round_logged = float("-inf")
        self._last_sweep = float("-inf")
        self._guard: StateGuard | None = None
        #: Where to save what the service holds of a job database deleted under it (set when that is seen).
        self._save_lost_database: Path | None = None
        #: When a stop must be over (:func:`time.monotonic`); set by :meth:`stop`, shared by every wait in it.
        self.stop_deadline: float | None = None
        self._signals = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        lock_path = cfg.state_dir / "service.lock"
        if not lock_path.exists():
            self._refuse_beside_a_live_service(lock_path)
        self._lock = FileLock(str(lock_path))
        try:
            self._lock.acquire(timeout=0.5)
        except Timeout:
            msg = (
                f"another imageqc service is already running with state folder {cfg.state_dir}; "
                "stop it first (`imageqc status` shows it), or give this one its own state_dir"
            )
            raise AlreadyRunning(msg) from None
        try:
            restored = restore_saved_copy(cfg.database_path)
            if restored is not None:
                log.warning(
                    "the job database was missing; resuming from the copy saved when it was deleted",
                    database=str(cfg.database_path),
                    copy=str(restored),
                )
            self.store = Store(cfg.database_path)
            self._guard = StateGuard(cfg.database_path, lock_path)
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

    def _refuse_beside_a_live_service(self, lock_path: Path) -> None:
        """Without its lock file, the heartbeat still tells whether another service runs here."""
        beat = read_heartbeat(self.config.database_path)
        if beat is None:
            return
        h, at = beat
        now = self.clock()
        if live_service(h, at, now=now, age_limit=heartbeat_age_limit(self.config)):
            msg = (
                f"another imageqc service (pid {h.get('pid')} on {h.get('host')}, heartbeat {max(0.0, now - at):.0f} s ago) "
                f"is running with state folder {self.config.state_dir}, although the lock file {lock_path} is missing; "
                "stop it first (`imageqc status` shows it), then start this one"
            )
            raise AlreadyRunning(msg)

    def _start_parts(self) -> None:
        cfg = self.config
        assert self.store is not None
        now = self.clock()
        self.started_at = now
        # We hold the state folder's lock, so leases held by anyone else are orphans, whatever their expiry.
        recovered = self.store.recover_expired(now=now, orphans=True)
        if recovered:
            log.warning("recovered jobs left by a previous run", jobs=recovered)
        if self.store.repair_infinite_times(now=now):
            log.info("replaced infinite job times left by an older version's recovery")
        self._sweep_outputs(now)
        self.runner = self._runner or ProcessWorker(
            cfg, self.store, target=self.target, owner=self.owner, clock=self.clock, timer=self.timer
        )
        started: list[Component] = []
        try:
            for comp in self.components:
                comp.start(self)
                started.append(comp)
        finally:
            self.components_started = started
        self._ticker = threading.Thread(target=self._tick_loop, name="imageqc-tick", daemon=True)
        self._ticker.start()
        self._heartbeat("running")

    def stop(self) -> None:
        """Stop cleanly: no new work; running QC jobs and transfers share ``shutdown_timeout_s`` (none
        after an urgent request), then go back to the queue. A transfer stuck in a request is abandoned."""
        self._stop.set()
        self._notify("STOPPING=1")
        grace = 0.0 if self._urgent.is_set() else self.config.service.shutdown_timeout_s
        self.stop_deadline = time.monotonic() + grace
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()  # the round under way finishes
            self._ticker = None
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
            if self._save_lost_database is not None:
                self._save_copy(self._save_lost_database)
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

    def _tick_loop(self) -> None:
        """Run :meth:`tick` every ``tick_seconds`` of the monotonic clock until a stop is requested.

        A round that outlasts the interval is followed at once by the next (missed rounds are not
        made up); the wait is the stop event's, so a stop request ends it at once.
        """
        interval = self.config.service.tick_seconds
        due = self.timer()
        while not self._stop.is_set():
            delay = due - self.timer()
            if delay > 0 and self._stop.wait(delay):
                return
            started = self.timer()
            self.tick()
            due = started + interval

    def tick(self, now: float | None = None) -> None:
        """One round of the service's work; never raises (errors are logged)."""
        if self._stop.is_set() or self.store is None:
            return
        now = self.clock() if now is None else now
        started = self.timer()
        try:
            self._tick(now)
            self.last_tick_error = None
        except DatabaseUnavailable as e:
            self.last_tick_error = str(e)
            self.failure = str(e)
            log.error("job database unavailable; stopping the service", error=str(e))
            self._stop.set()
        except StateLost as e:
            self.last_tick_error = self.failure = self._state_lost(e)
            log.error("a state file changed under the service; stopping it", error=self.failure)
            self._stop.set()
        except Exception as e:
            self.last_tick_error = f"{type(e).__name__}: {e}"
            log.exception("tick failed; the service keeps running")
        self._note_long_round(self.timer() - started)
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
        mono = self.timer()
        if mono - self._long_round_logged < 60.0:
            return
        self._long_round_logged = mono
        log.info(
            "a service round outlasted the tick interval; the next rounds start late",
            seconds=round(seconds, 1),
            tick_seconds=interval,
        )

    def _state_lost(self, e: StateLost) -> str:
        """Plan the copy of a database deleted or replaced under the service; what to tell about it."""
        if isinstance(e, DatabaseLost):
            self._save_lost_database = saved_copy_name(self.config.database_path)
        return e.explain(self.config.database_path, self._save_lost_database)

    def _save_copy(self, dest: Path) -> None:
        assert self.store is not None
        try:
            self.store.save_copy(dest)
        except (OSError, sqlite3.Error) as e:
            self.failure = self.last_tick_error = copy_failed(self.config.database_path, dest, e)
            log.error("could not save the job database the service held", copy=str(dest), error=str(e))
            return
        log.warning("saved a copy of the job database the service held", copy=str(dest))

    def _tick(self, now: float) -> None:
        store, runner = self.store, self.runner
        assert store is not None and runner is not None
        if self._guard is not None:
            self._guard.check()
        for job_id in store.recover_expired(now=now, spare_owner=self.owner):
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


def exit_past_abandoned_threads(code: int) -> None:
    """End the process at once with ``code`` when a thread outlived the stop.

    A transfer stuck in a request at the stop deadline is abandoned in a
    daemon thread (:class:`daemon.upload.pool.DaemonPool`). Letting the
    interpreter finalise around such a thread is not safe: when the request's
    bytes arrive during finalisation the thread is torn down inside C code, and
    a run on CI ended in glibc's "double free or corruption" abort (exit -6)
    instead of 0. Everything the service holds is saved and closed by
    :meth:`Daemon.stop` (store, lock, transfer records), so only the logs need
    flushing before ``os._exit``. Returns when no other thread is alive.
    """
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive()]
    if not others:
        return
    log.info("exiting past threads still busy at the stop", threads=sorted(t.name for t in others))
    _flush_logs()
    os._exit(code)


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
