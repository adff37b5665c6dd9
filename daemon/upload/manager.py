"""The uploads component of the service: claims QC'd jobs and drives the uploaders.

Each tick only dispatches (the files run in one thread pool per target, of
``concurrency`` threads):

1. jobs whose files have all finished are settled: ``done``; ``failed`` at
   once for a permanent error (bad credentials, missing bucket...); ``failed``
   with a retry time (exponential backoff) for transient ones, until
   ``service.max_attempts`` attempts of a file; back to ``qc_done`` with a
   ``next_attempt_at`` when files wait for a closed window;
2. the leases of active jobs are renewed (a lost lease -> the job's transfers stop);
3. ``qc_done`` jobs get their upload records planned early, so ``imageqc
   status`` shows the backlog even while a window is closed;
4. ``qc_done`` jobs are claimed (``qc_done -> uploading``) while fewer than
   ``max_jobs`` are active and at least one target's window is open.

Windows, per target: a file starts only while its target's window is open;
when it closes, parts in flight finish and the rest waits (state saved).
Mixed windows: a job is claimed when any target is open; it uploads to the
open targets and then waits in ``qc_done`` (``next_attempt_at`` = the next
opening of a target it still needs); it is ``done`` when every target has
every file.

Inputs changed since QC: before any input is sent, the scan set recorded at
discovery is compared with the files (size, mtime; tile folders: file count
and total size); each file is compared again with the size/mtime recorded
after QC before it is read, and while it is hashed. A change means nothing
more of the job is uploaded: its input records become ``changed`` and the job
waits in ``qc_done``. The new export has a new fingerprint, so discovery
queues it as a new job, which supersedes this one (the newer data is never
lost and QC runs on it); if the files come back as QC saw them, the upload
proceeds at the next recheck. An input deleted from a folder that is still
there fails the job. Inputs missing because the watch root or a folder of
the set is unavailable (a share unmounted, a folder renamed away or made
unreadable: :func:`daemon.jobs.unreachable`, as QC decides it) fail it
transiently, before or during the transfer: the job waits in ``failed``
(stage ``upload``) with a retry time, backing off like other transient
errors but never giving up, so the upload resumes once the folder is back;
what was already stored stays, and the files caught by the outage keep their
attempts.

Size and mtime do not tell a file from a replacement that kept them, so each
input's SHA-256 is computed again (no digest saved by an earlier attempt is
trusted for inputs) and compared with the one QC recorded
(``qc_results.inputs``, :mod:`daemon.inputs`). Streaming uploaders (S3, OSS)
compute it while they read the file to send it, once, and compare it before
anything is published (``Transfer.expect_sha256``: a single PUT is not sent,
a multipart upload is aborted instead of completed); the others (HPC) hash
the file before sending it. Content that differs with the same size and time
sends the job back to QC (:meth:`Store.send_back_to_qc`): discovery would
never see it as new. For a non-streaming target, a file replaced while it is
sent shows as an integrity error (a part digest or the stored object's
checksum); the file is hashed again, and if it changed, the torn object and
the multipart upload are deleted and the job goes back to QC too.
A job's outputs (the QC verdict) are sent to a target only after all its
inputs are stored there, so a verdict is never published beside inputs that
turned out to be other files.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from datetime import tzinfo
from pathlib import Path
from typing import Any

from daemon.clock import backoff
from daemon.config import Config, UploadTarget
from daemon.errors import (
    IllegalTransition,
    PermanentUploadError,
    TransientUploadError,
    UploadError,
)
from daemon.inputs import changed_content, sha256_file
from daemon.jobs import unreachable
from daemon.logging import bind_job, get_logger
from daemon.store import UPLOAD_FINISHED, Job, JobState, Store, UploadRow, UploadState
from daemon.upload import make_uploader
from daemon.upload.base import (
    ContentChanged,
    InputChanged,
    IntegrityError,
    Interrupted,
    LocalFile,
    Transfer,
    Uploader,
    choose_concurrency,
    file_stat,
)
from daemon.upload.plan import PlanError, check_inputs, ignore_patterns, plan_job, skipped_entries
from daemon.upload.policy import UploadWindow, kinds_for_mode, retrying
from daemon.upload.pool import DaemonPool

__all__ = ["UploadManager"]

log = get_logger("imageqc.upload")

U = UploadState


class _Outage(Exception):
    """An input's transfer failed while its watch root or folder is unavailable (``_Active.unreachable``)."""


@dataclass
class _Active:
    """A claimed job and the gate its transfers check."""

    job: Job
    manager: UploadManager
    futures: dict[int, Future[None]] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancel"
    permanent: str | None = None
    changed: str | None = None
    content_changed: str | None = None
    #: Why the inputs cannot be reached now (watch root or a folder of the set unavailable): retried.
    unreachable: str | None = None
    lost: bool = False
    #: What QC read (``qc_results.inputs``): path -> size, mtime_ns, sha256.
    qc_inputs: dict[str, Any] | None = None
    #: Outputs waiting until every input of their target is stored.
    held: list[UploadRow] = field(default_factory=list)

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.cancelled.set()

    def check(self) -> None:
        if self.manager._stopping.is_set():
            raise Interrupted("stop")
        if self.cancelled.is_set():
            raise Interrupted(self.reason)

    def between(self, target: str) -> Callable[[], None]:
        def gate() -> None:
            self.check()
            if not self.manager.window_open(target, self.manager.now()):
                raise Interrupted("pause")

        return gate

    def wait(self, seconds: float) -> None:
        self.cancelled.wait(seconds)


class UploadManager:
    """The ``uploads`` component (see the module docstring).

    Parameters
    ----------
    config : Config
    uploaders : mapping, optional
        Ready uploaders by target name (tests); others are built from the config.
    clock : callable, optional
        Seconds since the epoch; default the daemon's clock.
    tz : tzinfo, optional
        Time zone of the upload windows; default the PC's.
    max_jobs : int
        Jobs uploading at the same time.
    """

    name = "uploads"

    def __init__(
        self,
        config: Config,
        *,
        uploaders: Mapping[str, Uploader] | None = None,
        clock: Callable[[], float] | None = None,
        tz: tzinfo | None = None,
        max_jobs: int = 4,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.targets: dict[str, UploadTarget] = {t.name: t for t in config.upload if t.mode != "none"}
        self.windows = {n: UploadWindow.parse(t.window, tz) for n, t in self.targets.items()}
        self._uploaders: dict[str, Uploader] = dict(uploaders or {})
        self._owned: set[str] = set()
        self._clock = clock
        self.max_jobs = max_jobs
        self.rng = rng or random.Random()
        self._active: dict[int, _Active] = {}
        self._pools: dict[str, DaemonPool] = {}
        self._daemon: Any = None
        self._stopping = threading.Event()
        self._build_lock = threading.Lock()
        self._unplannable: set[int] = set()
        self._janitor: Future[None] | None = None
        self.store: Store | None = None
        self.owner = "uploads"
        self.lease_s = config.service.lease_seconds

    # -- component protocol -----------------------------------------------------

    def now(self) -> float:
        return (self._clock or time.time)()

    def start(self, daemon: Any) -> None:
        self.store = daemon.store
        self.owner = f"{daemon.owner}/uploads"
        self._daemon = daemon
        if self._clock is None:
            self._clock = daemon.clock
        self._pools = {n: DaemonPool(choose_concurrency(t.concurrency), f"upload-{n}") for n, t in self.targets.items()}
        if self._pools:
            self._janitor = next(iter(self._pools.values())).submit(self._clean_up_stale)

    def tick(self, now: float) -> None:
        if not self.targets or self.store is None or self._stopping.is_set():
            return
        self._reap(now)
        self._renew(now)
        if self._janitor is not None and not self._janitor.done():
            return
        self._plan_waiting(now)
        while len(self._active) < self.max_jobs and any(self.window_open(n, now) for n in self.targets):
            job = self.store.claim(
                self.owner, now=now, lease_s=self.lease_s, from_state=JobState.QC_DONE, to_state=JobState.UPLOADING
            )
            if job is None:
                break
            self._begin(job, now)

    def stop(self, deadline: float | None = None) -> None:
        """Stop the transfers: each saves its state at the next check and ends.

        Waits until ``deadline`` (a :func:`time.monotonic` value; default the
        daemon's shared ``stop_deadline``, else ``service.shutdown_timeout_s``
        from now), never longer: a request stuck on a server that trickles its
        answer is abandoned (its thread is a daemon thread) and its job
        released; the file resumes from its record at the next start.
        """
        if deadline is None:
            deadline = getattr(self._daemon, "stop_deadline", None)
        if deadline is None:
            deadline = time.monotonic() + self.config.service.shutdown_timeout_s
        self._stopping.set()
        for a in self._active.values():
            a.cancel("stop")
        futures = [f for a in self._active.values() for f in a.futures.values()]
        if self._janitor is not None:
            futures.append(self._janitor)
        _, stuck = wait_futures(futures, timeout=max(0.0, deadline - time.monotonic()))
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        if stuck:
            log.warning(
                "transfers still in flight at the stop deadline are abandoned; they resume at the next start",
                files=len(stuck),
                jobs=sorted(a.job.id for a in self._active.values() if any(f in stuck for f in a.futures.values())),
            )
        if self.store is not None:
            now = self.now()
            for a in list(self._active.values()):
                self._release(a, now, until=now, message="service stopping; the upload resumes at the next start")
        self._active.clear()
        for n in list(self._owned):
            try:
                self._uploaders.pop(n).close()
            except Exception as e:  # a client busy in an abandoned request
                log.warning("could not close an uploader at stop", target=n, error=str(e))
        self._owned.clear()

    def health(self) -> dict[str, Any]:
        backlog = self.store.upload_backlog() if self.store is not None else {}
        now = self.now()
        out: dict[str, Any] = {}
        for n, t in self.targets.items():
            b = backlog.get(n, {"files": 0, "bytes": 0})
            w = self.windows[n]
            up = self._uploaders.get(n)
            out[n] = {
                "type": t.type,
                "files": b["files"],
                "bytes": b["bytes"],
                "rate_bps": round(up.throttle.rate_bps()) if up is not None else 0,
                "sent_bytes": up.throttle.total if up is not None else 0,  # since the service started (/metrics)
                "window": t.window or None,
                "open": w is None or w.is_open(now),
                "next_open": None if w is None or w.is_open(now) else w.next_open(now),
            }
        return {"targets": out, "jobs": sorted(self._active)}

    # -- helpers ------------------------------------------------------------------

    def window_open(self, target: str, now: float) -> bool:
        w = self.windows.get(target)
        return w is None or w.is_open(now)

    def uploader(self, target: str) -> Uploader:
        """The target's uploader, built (credentials resolved) on first use."""
        with self._build_lock:
            up = self._uploaders.get(target)
            if up is None:
                up = make_uploader(self.targets[target], state_dir=self.config.state_dir)
                self._uploaders[target] = up
                self._owned.add(target)
            return up

    def _required(self, r: UploadRow) -> bool:
        t = self.targets.get(r.target)
        return t is not None and r.kind in kinds_for_mode(t.mode)

    # -- planning and claiming ------------------------------------------------------

    def _plan(self, job: Job, now: float) -> None:
        assert self.store is not None
        scan = self.store.get_scan_set(job.scan_set_id)
        planned = plan_job(
            self.config,
            chip=job.chip,
            root=scan.root,
            members=scan.members,
            result=self.store.get_result(job.id),
            targets=list(self.targets.values()),
        )
        self.store.plan_uploads(job.id, [p.as_row() for p in planned], now=now)

    def _plan_waiting(self, now: float) -> None:
        assert self.store is not None
        for job in self.store.jobs_without_uploads(limit=20 + len(self._unplannable)):
            if job.id in self._unplannable:
                continue
            try:
                self._plan(job, now)
            except (PlanError, OSError, ValueError):
                self._unplannable.add(job.id)  # the claim reports it

    def _begin(self, job: Job, now: float) -> None:
        assert self.store is not None
        a = _Active(job, self)
        self._active[job.id] = a
        with bind_job(job.id, job.chip):
            try:
                unchanged = self._inputs_unchanged(a, [r for r in self.store.uploads(job.id) if self._required(r)], now)
            except OSError as e:  # never leave a begun job with no transfers: it would be settled as done
                self._active.pop(job.id, None)
                recheck = max(60.0, 2 * self.config.discovery.rescan_interval_s)
                self._release(
                    a, now, until=now + recheck, message=f"cannot list the scan set's inputs ({e}); checked again later"
                )
                return
            if not unchanged:
                return
            try:
                self._plan(job, now)
            except (PlanError, OSError, ValueError) as e:
                self._unplannable.discard(job.id)
                if self._unreachable(a) is None:
                    a.permanent = f"cannot plan the upload: {e}"
                self._settle(a, now)
                return
            records = [r for r in self.store.uploads(job.id) if self._required(r)]
            for i, r in enumerate(records):  # what a previous attempt left unfinished starts again
                if r.state in (U.RETRY, U.ACTIVE, U.FAILED, U.CHANGED):
                    attempts = 0 if r.state == U.FAILED else r.attempts
                    self.store.update_upload(r.id, state=U.PENDING, attempts=attempts, now=now)
                    records[i] = replace(r, state=U.PENDING.value, attempts=attempts, updated_at=now)
            result = self.store.get_result(job.id)
            a.qc_inputs = (result or {}).get("inputs")
            a.held = [r for r in records if r.kind == "outputs" and r.state not in UPLOAD_FINISHED]
            for r in records:
                if r.kind == "inputs" and r.state not in UPLOAD_FINISHED and self.window_open(r.target, now):
                    a.futures[r.id] = self._pools[r.target].submit(self._run, a, r)
            self._release_outputs(a, now)
            log.info(
                "upload started",
                files=len(a.futures) + len(a.held),
                targets=sorted({r.target for r in records if r.id in a.futures or r in a.held}),
            )
            if not a.futures:
                self._settle(a, now)

    def _release_outputs(self, a: _Active, now: float) -> bool:
        """Start the held outputs of each target whose inputs are all stored; whether any started."""
        assert self.store is not None
        if (
            not a.held
            or a.changed
            or a.content_changed
            or a.unreachable
            or a.permanent
            or a.cancelled.is_set()
            or self._stopping.is_set()
        ):
            return False
        rows = self.store.uploads(a.job.id)
        waiting = {
            r.target for r in rows if r.kind == "inputs" and self._required(r) and r.state not in UPLOAD_FINISHED
        }
        ready = [r for r in a.held if r.target not in waiting and self.window_open(r.target, now)]
        for r in ready:
            a.held.remove(r)
            a.futures[r.id] = self._pools[r.target].submit(self._run, a, r)
        return bool(ready)

    def _inputs_unchanged(self, a: _Active, records: list[UploadRow], now: float) -> bool:
        assert self.store is not None
        inputs = [r for r in records if r.kind == "inputs" and r.state not in UPLOAD_FINISHED]
        wants_inputs = any("inputs" in kinds_for_mode(t.mode) for t in self.targets.values())
        if not inputs and (records or not wants_inputs):
            return True
        scan = self.store.get_scan_set(a.job.scan_set_id)
        try:
            check = check_inputs(scan.members)
        except OSError:
            if self._unreachable(a) is None:
                raise
            self._settle(a, now)
            return False
        if check.missing and self._unreachable(a) is not None:
            self._settle(a, now)
            return False
        if check.missing:
            a.permanent = f"input(s) gone before upload: {', '.join(check.missing[:3])}; nothing more of this scan set is uploaded"
            self._settle(a, now)
            return False
        if check.changed:
            a.changed = "; ".join(check.changed[:3])
            for r in inputs:
                self.store.update_upload(r.id, state=U.CHANGED, error=f"changed since QC: {a.changed}", now=now)
            self._settle(a, now)
            return False
        return True

    def _unreachable(self, a: _Active) -> str | None:
        """Why the job's inputs cannot be reached now for a reason that may pass, else None; kept on ``a``.

        The watch root or a folder of the set unavailable (:func:`daemon.jobs.unreachable`); asked
        when inputs are missing or cannot be read, never of a job that uploads no inputs.
        """
        assert self.store is not None
        if not any("inputs" in kinds_for_mode(t.mode) for t in self.targets.values()):
            return None
        scan = self.store.get_scan_set(a.job.scan_set_id)
        why = unreachable(scan.root, scan.members)
        if why is not None:
            a.unreachable = why
        return why

    def _paused_by_outage(self, a: _Active, r: UploadRow) -> bool:
        """After an input failed: if its folder is unavailable, :meth:`_pause` it and True."""
        if r.kind != "inputs" or self._unreachable(a) is None:
            return False
        self._pause(a, r)
        return True

    def _pause(self, a: _Active, r: UploadRow) -> None:
        """An input whose folder is unavailable waits for the job's retry, its attempts kept (an outage does
        not use them up); the job's other transfers stop."""
        assert self.store is not None
        self.store.update_upload(r.id, state=U.RETRY, attempts=r.attempts, error=a.unreachable)
        a.cancel("cancel")
        log.warning(
            "the scan set's folder is unavailable; the upload resumes when it is back",
            target=r.target,
            path=r.local_path,
            error=a.unreachable,
        )

    # -- one file (runs in a target's thread pool) ------------------------------------

    def _local(self, a: _Active, r: UploadRow, up: Uploader) -> LocalFile:
        assert self.store is not None
        path = Path(r.local_path)
        try:
            current = file_stat(path)
        except FileNotFoundError:
            raise InputChanged(path, "is gone") from None
        if r.size is not None and current != (r.size, r.mtime_ns):
            raise InputChanged(path, f"size/mtime {current} differ from {(r.size, r.mtime_ns)} recorded after QC")
        if up.streams:  # read once, while it is sent: the uploader computes the digests and compares QC's
            return LocalFile.pending(path, current[0], current[1], up.part_size_for(current[0]))
        digests = (r.parts or {}).get("local")
        if (
            r.sha256 and digests and r.kind != "inputs"
        ):  # an input is hashed again each time: it must still be what QC read
            local = LocalFile.from_record(path, current[0], current[1], r.sha256, digests)
            if up.reusable(local):
                return local
        local = up.digest(path, check=a.check, expect=current)
        state = (r.parts or {}).get("state") or {}
        if r.kind == "inputs" and changed_content(a.qc_inputs, path, local.sha256):
            if state:  # a multipart upload or checkpoint of an earlier attempt: its record goes with the old run
                try:
                    up.discard(r.remote_key, state)
                except (UploadError, OSError) as e:
                    log.warning(
                        "could not drop the resumable state of an earlier attempt", key=r.remote_key, error=str(e)
                    )
            raise ContentChanged(path, "changed after QC (content differs, same size and time)")
        self.store.update_upload(r.id, sha256=local.sha256, parts={"local": local.digests(), "state": state})
        return local

    @staticmethod
    def _qc_sha256(a: _Active, r: UploadRow) -> str | None:
        """The SHA-256 QC recorded for an input (its upload must carry exactly that content), else None."""
        if r.kind != "inputs":
            return None
        entry = (a.qc_inputs or {}).get(str(Path(r.local_path)))
        return str(entry["sha256"]) if entry and entry.get("sha256") else None

    def _check_sent(self, up: Uploader, transfer: Transfer, e: IntegrityError) -> None:
        """After an integrity error on an input: if the file changed while it was sent, remove what the
        transfer left (torn object, multipart upload) and raise :class:`InputChanged`; else return."""
        local = transfer.local
        try:
            now_sha = sha256_file(local.path, check=transfer.check)
            stat = file_stat(local.path)
        except FileNotFoundError:
            raise InputChanged(local.path, "is gone") from None
        if now_sha == local.sha256:
            return  # the file is as QC read it: a network or server fault, retried
        removed = False
        try:
            with transfer.lock:
                state = dict(transfer.state)
                transfer.state.clear()
            if state:
                up.discard(transfer.key, state)
            transfer.persist(0)
            removed = up.remove_if_torn(transfer.key, local)
        except (UploadError, OSError, NotImplementedError) as cleanup:
            log.warning(
                "could not remove what the interrupted transfer left; it is replaced when the file is sent again",
                key=transfer.key,
                error=str(cleanup),
            )
        torn = f"; the torn copy at {transfer.key} was deleted" if removed else ""
        log.warning("an input changed while it was uploaded", path=str(local.path), error=str(e), removed_torn=removed)
        if stat == (local.size, local.mtime_ns):
            raise ContentChanged(
                local.path, f"changed after QC, while it was uploaded (content differs, same size and time){torn}"
            )
        raise InputChanged(local.path, f"changed while it was uploaded{torn}")

    def _run(self, a: _Active, r: UploadRow) -> None:
        assert self.store is not None
        store, target = self.store, self.targets[r.target]
        with bind_job(a.job.id, a.job.chip):
            try:
                a.check()
                up = self.uploader(r.target)
                store.update_upload(r.id, state=U.ACTIVE, attempts=r.attempts + 1, error=None)
                local = self._local(a, r, up)
                digests = local.digests() if local.digested else {}

                def save(state: dict[str, Any], done: int) -> None:
                    store.update_upload(
                        r.id,
                        parts={"local": digests, "state": state},
                        upload_id=state.get("upload_id"),
                        bytes_done=done,
                    )

                transfer = Transfer(
                    local=local,
                    key=r.remote_key,
                    state=dict((r.parts or {}).get("state") or {}),
                    save=save,
                    check=a.check,
                    between=a.between(r.target),
                    wait=a.wait,
                    expect_sha256=self._qc_sha256(a, r) if up.streams else None,
                )

                def attempt() -> Any:
                    transfer.check()
                    try:
                        return up.send(transfer)
                    except IntegrityError as e:
                        if r.kind == "inputs" and not up.streams:  # a streamed file's digests are of the bytes sent
                            self._check_sent(up, transfer, e)
                        raise
                    except TransientUploadError:
                        if r.kind == "inputs" and self._unreachable(a) is not None:
                            raise _Outage from None  # not retried here: the job waits for the folder
                        raise

                def on_retry(n: int, delay: float, e: TransientUploadError) -> None:
                    log.warning(
                        "upload attempt failed; retrying",
                        target=r.target,
                        key=r.remote_key,
                        attempt=n,
                        retry_in_s=round(delay, 1),
                        error=str(e),
                    )

                outcome = retrying(
                    attempt,
                    attempts=target.max_attempts,
                    base=target.retry_base_s,
                    cap=target.retry_max_s,
                    wait=a.wait,
                    rng=self.rng,
                    on_retry=on_retry,
                )
                if r.kind == "inputs" and file_stat(local.path) != (local.size, local.mtime_ns):
                    raise InputChanged(local.path, "changed while it was uploaded")
                sent = outcome.local if outcome.local is not None else local
                store.update_upload(
                    r.id,
                    state=U.PRESENT if outcome.present else U.DONE,
                    checksum=outcome.checksum,
                    bytes_done=local.size,
                    upload_id=None,
                    parts={"local": sent.digests(), "state": {}},
                    error=None,
                )
                if sent.digested:
                    store.update_upload(r.id, sha256=sent.sha256)
                log.info(
                    "already present" if outcome.present else "uploaded",
                    target=r.target,
                    key=r.remote_key,
                    bytes=local.size,
                )
            except _Outage:
                self._pause(a, r)
            except Interrupted as e:
                store.update_upload(r.id, state=U.PENDING)
                log.info("upload interrupted", target=r.target, key=r.remote_key, reason=e.reason)
            except ContentChanged as e:
                store.update_upload(r.id, state=U.CHANGED, error=str(e))
                a.content_changed = a.content_changed or str(e)
                a.cancel("cancel")
                log.warning("input content changed since QC; QC runs again", target=r.target, path=e.path, what=e.what)
            except InputChanged as e:
                if self._paused_by_outage(a, r):
                    return
                store.update_upload(r.id, state=U.CHANGED, error=str(e))
                a.changed = str(e)
                a.cancel("cancel")
                log.warning("input changed since QC; not uploaded", target=r.target, path=e.path, what=e.what)
            except PermanentUploadError as e:
                if self._paused_by_outage(a, r):  # an input's folder gone or unreadable reads as refused
                    return
                store.update_upload(r.id, state=U.FAILED, error=str(e))
                a.permanent = a.permanent or str(e)
                a.cancel("cancel")
                log.error("upload failed permanently", target=r.target, key=r.remote_key, error=str(e))
            except (TransientUploadError, OSError) as e:
                if self._paused_by_outage(a, r):
                    return
                store.update_upload(r.id, state=U.RETRY, error=str(e))
                log.warning("upload failed; the job is retried later", target=r.target, key=r.remote_key, error=str(e))
            except Exception as e:  # a bug must not kill the pool thread silently
                store.update_upload(r.id, state=U.RETRY, error=f"{type(e).__name__}: {e}")
                log.exception("upload crashed", target=r.target, key=r.remote_key)

    # -- settling ------------------------------------------------------------------

    def _reap(self, now: float) -> None:
        for a in list(self._active.values()):
            if all(f.done() for f in a.futures.values()):
                with bind_job(a.job.id, a.job.chip):
                    if not self._release_outputs(a, now):
                        self._settle(a, now)

    def _renew(self, now: float) -> None:
        assert self.store is not None
        for a in self._active.values():
            if a.lost:
                continue
            if not self.store.renew_lease(a.job.id, self.owner, now=now, lease_s=self.lease_s):
                a.lost = True
                a.cancel("cancel")
                log.warning("upload lease lost (job cancelled or taken over); stopping its transfers", job_id=a.job.id)
                continue
            rows = [r for r in self.store.uploads(a.job.id) if self._required(r)]
            total = sum(r.size or 0 for r in rows)
            done = sum((r.size or 0) if r.state in UPLOAD_FINISHED else r.bytes_done for r in rows)
            self.store.set_progress(a.job.id, self.owner, "upload", 100.0 * done / total if total else None, now=now)

    def _settle(self, a: _Active, now: float) -> None:
        """All of a job's transfers have ended: decide its next state."""
        assert self.store is not None
        self._active.pop(a.job.id, None)
        if a.lost or self._stopping.is_set():
            if not a.lost:
                self._release(a, now, until=now, message="service stopping")
            return
        job_id, svc = a.job.id, self.config.service
        try:
            if a.permanent:
                self.store.transition(
                    job_id, JobState.FAILED, owner=self.owner, now=now, error=a.permanent, failed_stage="upload"
                )
                return
            if a.content_changed:
                self.store.send_back_to_qc(
                    job_id, owner=self.owner, now=now, reason=f"{a.content_changed}; QC runs again"
                )
                log.warning(
                    "inputs changed after QC with the same size and time; the job goes back to QC",
                    error=a.content_changed,
                )
                return
            if a.unreachable:
                streak = self._outage_streak(job_id) + 1
                delay = backoff(streak, base=svc.retry_base_s, cap=svc.retry_max_s, rng=self.rng)
                self.store.transition(
                    job_id,
                    JobState.FAILED,
                    owner=self.owner,
                    now=now,
                    error=(
                        f"{a.unreachable}: the scan set's files cannot be read now, so its upload is paused. What is "
                        "already uploaded stays; the upload is retried with backoff and resumes once the share or "
                        "folder is back; check the share or the folder's permissions"
                    ),
                    failed_stage="upload",
                    next_attempt_at=now + delay,
                    data={"unreachable": streak},
                )
                log.warning(
                    "scan set files unavailable; upload paused", error=a.unreachable, retry_in_s=round(delay, 1)
                )
                return
            if a.changed:
                recheck = max(60.0, 2 * self.config.discovery.rescan_interval_s)
                self._release(
                    a,
                    now,
                    until=now + recheck,
                    message=(
                        f"inputs changed since QC ({a.changed}); nothing more of this scan set is uploaded. Discovery queues "
                        "the new export as a new job, which supersedes this one; checked again later"
                    ),
                )
                return
            rows = [r for r in self.store.uploads(job_id) if self._required(r)]
            retry = [r for r in rows if r.state == U.RETRY]
            if retry:
                worst = max(retry, key=lambda r: r.attempts)
                if worst.attempts >= svc.max_attempts:
                    msg = f"gave up after {worst.attempts} attempts: {worst.error}. When fixed: imageqc retry {job_id}"
                    self.store.transition(
                        job_id, JobState.FAILED, owner=self.owner, now=now, error=msg, failed_stage="upload"
                    )
                else:
                    delay = backoff(worst.attempts, base=svc.retry_base_s, cap=svc.retry_max_s, rng=self.rng)
                    self.store.transition(
                        job_id,
                        JobState.FAILED,
                        owner=self.owner,
                        now=now,
                        error=worst.error,
                        failed_stage="upload",
                        next_attempt_at=now + delay,
                    )
                return
            waiting = sorted({r.target for r in rows if r.state not in UPLOAD_FINISHED})
            if not waiting:
                sent = sum(1 for r in rows if r.state == U.DONE)
                msg = f"uploaded {sent} file(s) to {', '.join(sorted({r.target for r in rows})) or 'no target'}"
                present = len(rows) - sent
                msg += f"; {present} already present" if present else ""
                msg += self._skipped_note(a.job)
                self.store.transition(job_id, JobState.DONE, owner=self.owner, now=now, message=msg)
                log.info("upload done", files=len(rows), sent=sent)
                return
            until = min(w.next_open(now) if (w := self.windows[t]) else now for t in waiting)
            self._release(a, now, until=until, message=f"waiting for the upload window of {', '.join(waiting)}")
        except IllegalTransition as e:  # cancelled or superseded meanwhile
            log.info("job changed hands before its upload ended", error=str(e))

    def _outage_streak(self, job_id: int) -> int:
        """How many upload attempts in a row found the job's files unreachable (0 when its last failure was not that)."""
        assert self.store is not None
        for e in reversed(self.store.events(job_id, kinds=["state"])):
            if e.to_state == JobState.FAILED.value:
                return int((e.data or {}).get("unreachable") or 0)
        return 0

    def _skipped_note(self, job: Job) -> str:
        """``"; not uploaded, ... never followed: <names>"`` for links and special files in the job's tile folders."""
        assert self.store is not None
        if not any("inputs" in kinds_for_mode(t.mode) for t in self.targets.values()):
            return ""
        scan = self.store.get_scan_set(job.scan_set_id)
        skipped = skipped_entries(scan.members, ignore_patterns(self.config, scan.root))
        if not skipped:
            return ""
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        return f"; not uploaded (links and special files in tile folders are never followed): {', '.join(skipped[:3])}{more}"

    def _release(self, a: _Active, now: float, *, until: float, message: str) -> None:
        assert self.store is not None
        with contextlib.suppress(IllegalTransition):
            self.store.defer(a.job.id, owner=self.owner, until=until, now=now, message=message)

    # -- stale resumable state ---------------------------------------------------------

    def _clean_up_stale(self) -> None:
        """Abort multipart uploads, delete checkpoints and partial copies no upload will resume."""
        try:
            self._discard_stale()
        except Exception:
            log.exception("clean-up of stale uploads failed; the service goes on")

    def _discard_stale(self) -> None:
        assert self.store is not None
        live = {JobState.QC_DONE.value, JobState.UPLOADING.value, JobState.FAILED.value}
        keep: dict[str, set[str]] = {n: set() for n in self.targets}
        jobs = {j.id: j.state for j in self.store.list_jobs()}
        for r in self.store.uploads():
            state = (r.parts or {}).get("state") or {}
            if r.target not in self.targets:
                continue
            if jobs.get(r.job_id) in live and r.state not in UPLOAD_FINISHED and r.state != U.CHANGED:
                if state.get("checkpoint"):
                    keep[r.target].add(state["checkpoint"])
                continue
            if state:
                try:
                    self.uploader(r.target).discard(r.remote_key, state)
                    self.store.update_upload(
                        r.id, upload_id=None, parts={"local": (r.parts or {}).get("local"), "state": {}}
                    )
                except Exception as e:
                    log.warning("could not clean up a stale upload", target=r.target, key=r.remote_key, error=str(e))
        for n, t in self.targets.items():
            if t.type != "oss":
                continue
            try:
                removed = self.uploader(n).sweep(keep[n], older_than_s=3600)  # type: ignore[attr-defined]
            except Exception as e:
                log.warning("could not sweep stale checkpoints", target=n, error=str(e))
            else:
                if removed:
                    log.info("stale checkpoints removed", target=n, count=len(removed))
