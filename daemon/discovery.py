"""Discovery: the service component that turns export folders into queued jobs.

Every tick it

1. supervises the observers (a dead one is recreated and a rescan asked for);
2. applies finished rescans: the diff of each root's fresh snapshot against
   the members it knows marks paths to look at;
3. drains the observers' hints (paths events were about);
4. probes every marked path once (:func:`daemon.snapshot.probe`): new,
   changed and vanished members update their scan set's ``last_change``;
5. judges the sets that are due (:class:`daemon.completion.Judge`): a
   complete set is recorded (``scan_sets``) and queued as a job, superseding
   the chip's older unfinished jobs; a set that stays incomplete past
   ``incomplete_timeout_s`` is reported once as a ``failed`` job whose error
   says why.

Members and sets are persisted (``discovery_members``, ``discovery_sets``) so a
restart resumes settle timing, and the start-up rescan finds what arrived
while the service was down. The same fingerprint is queued once, ever (the
jobs table's unique fingerprint); a set that changes after it was queued
settles again and becomes a new job. A set deleted or renamed before it is
queued is dropped with one log line; once queued, its job is the QC run's to
fail ("file not found") if the files are gone when it runs.

A scan set is a chip's members in one folder (``<chip>`` and its
``<chip>_<IF>_IF`` images); a QC archive is a set on its own.

The rescans run in discovery's own thread (:class:`daemon.watcher.Rescanner`),
not as an APScheduler job: the service starts components before its
scheduler exists and waits for scheduler jobs before it stops components, so
a long walk of a slow share would hold up shutdown; the thread checks its
stop event between folders. Latency from a set's last write to ``queued``:
settle time plus up to two ticks with native events, plus up to one polling
interval (at most one rescan interval) without them; the grouping window
counts from the newest member's arrival, so it adds to that only for sets
written faster than ``grouping_window_s - settle_seconds``.
"""

from __future__ import annotations

import math
import os
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon.completion import (
    Judge,
    MemberState,
    SetView,
    Verdict,
    check_member_whole,
    fingerprint,
    member_files,
    open_for_writing,
)
from daemon.config import Config, WatchRoot
from daemon.errors import IllegalTransition
from daemon.fsinfo import folder_problem, is_network_path
from daemon.jobs import FILES_STAGE, unreachable
from daemon.live import Growing
from daemon.logging import bind_job, get_logger
from daemon.naming import parse_name
from daemon.snapshot import (
    NOT_REGULAR,
    NOT_SERIAL,
    Found,
    MemberStat,
    Rejected,
    ScanResult,
    WalkPolicy,
    deepest_root,
    diff_snapshots,
    is_under,
    probe,
    scan_tree,
)
from daemon.store import JobState, Store
from daemon.watcher import HINT_DEEP, HINT_DIR, ObserverFactory, Rescanner, RootMissing, RootWatcher

__all__ = ["Discovery"]

log = get_logger("imageqc.discovery")

_SETTLING, _QUEUED, _REPORTED = "settling", "queued", "reported"
_REJECT_EVENTS = {
    NOT_SERIAL: "names are not chip serials; ignored (naming = strict)",
    NOT_REGULAR: "not regular files (FIFO, socket or device); skipped, never opened: only regular files are read",
}
_MAX_DEBUG_NAMES = 50_000


@dataclass
class _Set:
    key: str
    root: str
    chip: str
    folder: str
    first_seen: float
    last_change: float
    settling_since: float
    members: set[str] = field(default_factory=set)
    fp: str | None = None  #: the identity its job has (see :meth:`Discovery._identify`)
    ident: str | None = None  #: the fingerprint with paths, as last computed
    state: str = ""  # "" until the first judgement after a (re)start
    job_id: int | None = None
    next_check: float = 0.0
    verdict: Verdict | None = None

    def row(self) -> dict[str, Any]:
        return {
            "set_key": self.key,
            "root": self.root,
            "chip": self.chip,
            "folder": self.folder,
            "first_seen": self.first_seen,
            "last_change": self.last_change,
            "settling_since": self.settling_since,
        }


@dataclass
class _Root:
    watch: WatchRoot
    policy: WalkPolicy
    judge: Judge
    watcher: RootWatcher
    last_rescan: float | None = None
    files: int | None = None


def _set_key(found_path: str, chip: str, fmt: str) -> tuple[str, str]:
    folder = os.path.dirname(found_path)
    return (found_path if fmt == "tar.gz" else f"{folder}{os.sep}{chip}#set"), folder


class Discovery:
    """The ``discovery`` component (see the module docstring).

    Parameters
    ----------
    config : Config
    observer_factory : callable, optional
        ``factory(mode, policy, poll_s)`` -> unstarted watchdog observer (tests).
    is_network : callable
        Decides which roots poll under ``observer = "auto"``.
    open_check : callable
        ``open_check(paths) -> set | None``: files held open for writing.
    whole_check : callable
        ``whole_check(policy, member) -> reason | None``: the structural check.
    """

    name = "discovery"
    #: Seconds of file-system work one tick may do before leaving the rest to the next.
    tick_budget_s = 3.0

    def __init__(
        self,
        config: Config,
        *,
        observer_factory: ObserverFactory | None = None,
        is_network: Callable[[str], bool] = is_network_path,
        open_check: Callable[[Iterable[str]], set[str] | None] = open_for_writing,
        whole_check: Callable[[WalkPolicy, MemberState], str | None] = check_member_whole,
    ) -> None:
        self.config = config
        self._factory = observer_factory
        self._is_network = is_network
        self._open_check = open_check
        self._whole_check = whole_check
        self._store: Store | None = None
        self._clock: Callable[[], float] = time.time
        self._roots: list[_Root] = []
        self._rescanner: Rescanner | None = None
        self._members: dict[str, tuple[MemberState, str, str]] = {}  # path -> (state, root, set key)
        self._sets: dict[str, _Set] = {}
        self._save_members: set[str] = set()
        self._drop_members: set[str] = set()
        self._save_sets: set[str] = set()
        self._drop_sets: set[str] = set()
        self._debugged: set[str] = set()
        self._backlog: dict[str, int] = {}  # paths still to look at (hints, rescan diffs)
        self._misnamed: dict[str, dict[str, tuple[str, float]]] = {}  # root -> path -> (reason, first seen)

    # -- lifecycle -------------------------------------------------------------

    def start(self, daemon: Any) -> None:
        """Load the persisted state, start one observer per root and the rescanner (first rescan now)."""
        try:
            self._start(daemon)
        except BaseException:
            self.stop()  # the service does not stop a component whose start failed
            raise

    def _start(self, daemon: Any) -> None:
        cfg = self.config
        self._store = daemon.store
        self._clock = getattr(daemon, "clock", time.time)
        exclude = [cfg.output_dir, cfg.state_dir]
        d = cfg.discovery
        for w in cfg.watch:
            policy = WalkPolicy.from_config(w, exclude=exclude)
            grouping = 0.0 if w.stain in ("ssDNA", "HE") else d.grouping_window_s
            judge = Judge(
                policy,
                settle_s=w.settle_seconds,
                grouping_s=grouping,
                marker=w.marker,
                recheck_s=max(0.2, min(5.0, w.settle_seconds or 5.0)),
                whole=self._whole_check,
            )
            watcher = RootWatcher(
                policy,
                configured=w.observer,
                poll_s=d.poll_interval_s,
                factory=self._factory,
                is_network=self._is_network,
            )
            self._roots.append(_Root(w, policy, judge, watcher))
        self._load()
        for r in self._roots:
            r.watcher.start()
            log.info(
                "watching",
                root=r.policy.root,
                observer=r.watcher.mode,
                health=r.watcher.health(),
                settle_s=r.watch.settle_seconds,
                naming=r.watch.naming,
                marker=r.watch.marker or None,
            )
        self._rescanner = Rescanner([r.policy for r in self._roots], interval_s=d.rescan_interval_s, clock=self._clock)
        self._rescanner.start()

    def stop(self) -> None:
        """Stop the rescanner and every observer, joining their threads."""
        if self._rescanner is not None:
            self._rescanner.stop()
            self._rescanner = None
        for r in self._roots:
            r.watcher.stop()
        if self._store is not None:
            try:
                self._flush()
            except Exception:
                log.exception("could not save discovery state on stop")

    def rescan(self, root: str | None = None) -> None:
        """Ask for a full rescan now (all roots when ``root`` is None)."""
        if self._rescanner is not None:
            self._rescanner.request(root)

    def health(self) -> dict[str, Any]:
        roots = []
        for r in self._roots:
            root = r.policy.root
            last = self._rescanner.last.get(root, {}) if self._rescanner else {}
            pending = sum(1 for s in self._sets.values() if s.root == root and s.state in ("", _SETTLING))
            roots.append(
                {
                    "path": root,
                    "observer": r.watcher.mode,
                    "health": r.watcher.health(),
                    "last_rescan": last.get("at"),
                    "rescan_s": last.get("duration_s"),
                    "files": last.get("files"),
                    "members": sum(1 for _, rt, _ in self._members.values() if rt == root),
                    "pending": pending,
                }
            )
        return {"roots": roots, "waiting": self.waiting()}

    #: At most this many waiting sets and misnamed names in the heartbeat (the total is given too).
    waiting_limit = 50

    def waiting(self) -> dict[str, Any]:
        """Sets that are not queued yet and why, oldest first, and names ignored as not chip serials.

        What `imageqc status` lists under "waiting": a set still being written or
        settling, IF images without their nuclear image, a tile grid with holes, a
        marker not there yet, each with the judge's reason and since when.
        """
        sets = sorted((s for s in self._sets.values() if s.state in ("", _SETTLING)), key=lambda s: s.settling_since)
        rows = [
            {
                "chip": s.chip,
                "folder": s.folder,
                "root": s.root,
                "since": s.settling_since,
                "stage": s.verdict.stage if s.verdict else "settling",
                "reason": s.verdict.reason
                if s.verdict and s.verdict.reason
                else "waiting for the files to stay unchanged",
            }
            for s in sets[: self.waiting_limit]
        ]
        names = sorted(
            ((p, why, at, root) for root, d in self._misnamed.items() for p, (why, at) in d.items()), key=lambda t: t[2]
        )
        misnamed = [
            {"path": p, "root": root, "reason": why, "since": at} for p, why, at, root in names[: self.waiting_limit]
        ]
        return {"sets": rows, "sets_total": len(sets), "misnamed": misnamed, "misnamed_total": len(names)}

    def growing_tile_folders(self) -> list[Growing]:
        """Tile folders of sets not queued yet (still being written or settling): what live QC looks at. An IF
        image's folder gets its pairs only (``fov_checks`` False: the final QC checks the nuclear image's FOVs only).

        Called from the service thread (the tick), like every other use of the sets.
        """
        out = []
        for s in self._sets.values():
            if s.state not in ("", _SETTLING):
                continue
            r = self._root_of(s.root)
            if r is None:
                continue
            for p in sorted(s.members):
                known = self._members.get(p)
                if known is not None and known[0].format == "tiles":
                    out.append(
                        Growing(
                            chip=s.chip,
                            folder=p,
                            watch=r.watch,
                            since=s.settling_since,
                            fov_checks=known[0].role != "IF",
                        )
                    )
        return out

    # -- persistence -----------------------------------------------------------

    def _load(self) -> None:
        assert self._store is not None
        members, sets = self._store.discovery_load()
        roots = {r.policy.root for r in self._roots}
        for row in sets:
            if row["root"] in roots:
                self._sets[row["set_key"]] = _Set(
                    row["set_key"],
                    row["root"],
                    row["chip"],
                    row["folder"],
                    row["first_seen"],
                    row["last_change"],
                    row["settling_since"],
                )
        for row in members:
            s = self._sets.get(row["set_key"])
            if s is None:
                continue
            stat = _stat_of(row)
            ms = MemberState(
                row["path"],
                row["name"],
                row["chip"],
                row["format"],
                row["role"],
                row["stain"],
                stat,
                row["first_seen"],
                row["last_change"],
            )
            self._members[row["path"]] = (ms, row["root"], row["set_key"])
            s.members.add(row["path"])
        for key in [k for k, s in self._sets.items() if not s.members]:
            del self._sets[key]
            self._drop_sets.add(key)
        if self._members:
            log.info("resuming discovery state", members=len(self._members), sets=len(self._sets))

    def _flush(self) -> None:
        assert self._store is not None
        members = [_member_row(*self._members[p]) for p in self._save_members if p in self._members]
        sets = [self._sets[k].row() for k in self._save_sets if k in self._sets]
        self._store.discovery_save(
            members=members, drop_members=sorted(self._drop_members), sets=sets, drop_sets=sorted(self._drop_sets)
        )
        self._save_members.clear()
        self._drop_members.clear()
        self._save_sets.clear()
        self._drop_sets.clear()

    # -- the tick ---------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self._store is None:
            return
        for r in self._roots:
            why = r.watcher.supervise()
            if why:
                self.rescan(r.policy.root)
            if why == "folder back":
                self._requeue_reachable(r, now)
        dirty = self._backlog
        touched: set[str] = set()
        self._apply_rescans(dirty, now)
        for r in self._roots:
            for path, flags in r.watcher.hints.drain().items():
                dirty[path] = dirty.get(path, 0) | flags
        deadline = time.monotonic() + self.tick_budget_s
        self._refresh(dirty, touched, now, deadline)
        self._judge(touched, now, deadline)
        self._flush()

    def _root_of(self, path: str) -> _Root | None:
        by_path = {r.policy.root: r for r in reversed(self._roots)}  # the first of equal roots wins, as before
        root = deepest_root(path, by_path)
        return None if root is None else by_path[root]

    def _apply_rescans(self, dirty: dict[str, int], now: float) -> None:
        if self._rescanner is None:
            return
        while True:
            try:
                res = self._rescanner.results.get_nowait()
            except queue.Empty:
                return
            if isinstance(res, RootMissing):
                continue  # members stay: a share that went away is not a deletion
            known = {p: ms.stat for p, (ms, root, _) in self._members.items() if root == res.root}
            diff = diff_snapshots(known, res.stats(), unreadable=res.unreadable)
            for p in diff.paths:
                dirty.setdefault(p, 0)
            root = self._root_of(res.root)
            if root is not None:
                self._note(root, res, now, whole=res.start == root.policy.root and res.complete)
                self._requeue_reachable(root, now)
            if diff:
                log.debug(
                    "rescan found changes",
                    root=res.root,
                    created=len(diff.created),
                    deleted=len(diff.deleted),
                    modified=len(diff.modified),
                )

    def _note(self, r: _Root, res: ScanResult, now: float, *, whole: bool = False) -> None:
        """Report rejected names once (persisted) and ignored names once per run (debug).

        Every reject is also kept for `status` ("waiting"); ``whole``: ``res`` is a
        full walk of the root, so rejects it no longer holds are gone.
        """
        assert self._store is not None
        known = self._misnamed.setdefault(r.policy.root, {})
        if whole:
            for path in set(known) - {x.path for x in res.rejected}:
                del known[path]
        for x in res.rejected:
            known.setdefault(x.path, (x.reason, now))
        for kind, event in _REJECT_EVENTS.items():
            fresh = [
                x for x in res.rejected if x.kind == kind and self._store.note_once(f"{kind}:{x.path}", kind, now=now)
            ]
            if fresh:
                log.warning(
                    event,
                    root=r.policy.root,
                    count=len(fresh),
                    names=[os.path.relpath(x.path, r.policy.root) for x in fresh[:10]],
                    reason=fresh[0].reason,
                )
        for path, reason in res.ignored:
            if path not in self._debugged and len(self._debugged) < _MAX_DEBUG_NAMES:
                self._debugged.add(path)
                log.debug("not a scan-set member; ignored", path=path, reason=reason)

    def _requeue_reachable(self, r: _Root, now: float) -> None:
        """Jobs of this root that failed because their files could not be reached: queued again once they can be.

        Called when the root comes back and after each of its rescans (a
        folder's permissions restored, a share remounted between retries).
        """
        store = self._store
        assert store is not None
        root = str(r.watch.path)
        for job in store.list_jobs(states=[JobState.FAILED.value], newest_first=False):
            if job.failed_stage != FILES_STAGE:
                continue
            scan = store.get_scan_set(job.scan_set_id)
            if scan.root != root or unreachable(root, scan.members) is not None:
                continue
            if not all(os.path.lexists(str(m["path"])) for m in scan.members):
                continue  # moved or deleted meanwhile: QC would fail for good; leave the error as it is
            try:
                store.transition(
                    job.id, JobState.QUEUED, now=now, message="the scan set's files can be read again; queued again"
                )
            except IllegalTransition:
                continue
            with bind_job(job.id, job.chip):
                log.info("scan set files are reachable again; job queued again", root=root)

    def _container(self, path: str) -> str | None:
        """The known member that is ``path`` or contains it."""
        if path in self._members:
            return path
        r = self._root_of(path)
        if r is None:
            return None
        q = path
        while len(q) > len(r.policy.root):
            q = os.path.dirname(q)
            if q in self._members:
                return q
        return None

    def _refresh(self, dirty: dict[str, int], touched: set[str], now: float, deadline: float = math.inf) -> None:
        """Probe every path worth a look, once; update members and their sets.

        Paths left when the tick's time budget is spent (a first look at a
        large tree, a slow share) stay in ``dirty`` for the next tick.
        """
        to_probe: dict[str, _Root] = {}
        rejected: dict[str, list[Rejected]] = {}
        present = {r.policy.root: folder_problem(r.policy.root) is None for r in self._roots}
        for i, path in enumerate(list(dirty)):
            if i and time.monotonic() > deadline:
                break
            flags = dirty.pop(path)
            r = self._root_of(path)
            # A missing root (share gone) says nothing about its members: leave them be.
            if r is None or not present[r.policy.root] or path == r.policy.root or r.policy.excluded(path):
                continue
            inside = self._container(path)
            if inside is not None:
                to_probe[inside] = r
                continue
            if flags & HINT_DEEP and os.path.isdir(path):
                res = scan_tree(r.policy, path)
                to_probe.update(dict.fromkeys(res.members, r))
                rejected.setdefault(r.policy.root, []).extend(res.rejected)
                continue
            to_probe[path] = r
            if flags & HINT_DIR and not os.path.isdir(path):  # a folder went away
                to_probe.update({p: r for p in self._members if is_under(p, path)})
            name, parent = os.path.basename(path), os.path.dirname(path)
            if r.judge.marker and (chip := r.judge.marker.chip_of(name)) is not None:
                key = _set_key(os.path.join(parent, chip), chip, "")[0]
                if key in self._sets:
                    touched.add(key)
            elif (
                parent != r.policy.root
                and parent not in self._members
                and parse_name(os.path.basename(parent), is_dir=True).member is not None
            ):
                to_probe[parent] = r  # a tile in a folder not yet known as a tile folder
        for i, (path, r) in enumerate(to_probe.items()):
            if i and time.monotonic() > deadline:
                dirty.setdefault(path, 0)  # next tick
                continue
            try:
                got = probe(r.policy, path)
            except OSError as e:
                log.debug("cannot look at path now; will retry", path=path, error=str(e))
                continue
            if isinstance(got, Found):
                observed = self._observe(r, got, now)
                if observed:
                    touched.add(observed)
            else:
                if isinstance(got, Rejected):
                    rejected.setdefault(r.policy.root, []).append(got)
                if path in self._members:
                    touched.add(self._forget(path, now))
        for root, items in rejected.items():
            rt = self._root_of(root)
            if rt is not None:
                self._note(rt, ScanResult(root, root, {}, rejected=tuple(items)), now)

    def _observe(self, r: _Root, found: Found, now: float) -> str | None:
        """Record a member as found on disk; returns its set key when something changed."""
        m = found.member
        key, folder = _set_key(found.path, m.chip, m.format)
        old = self._members.get(found.path)
        if old is not None and old[0].stat == found.stat and old[2] == key:
            return None
        if old is not None and old[2] != key:
            self._forget(found.path, now)
            old = None
        if (
            old is None
            and not found.serial
            and self._store is not None
            and self._store.note_once(f"lenient:{found.path}", "lenient", now=now)
        ):
            log.warning("accepted a name that is not a chip serial (naming = lenient)", path=found.path, chip=m.chip)
        first = old[0].first_seen if old is not None else now
        state = MemberState(found.path, m.name, m.chip, m.format, m.role, m.stain, found.stat, first, now)
        self._members[found.path] = (state, r.policy.root, key)
        self._save_members.add(found.path)
        s = self._sets.get(key)
        if s is None:
            s = self._sets[key] = _Set(key, r.policy.root, m.chip, folder, now, now, now, state=_SETTLING)
            log.info("scan set found", chip=m.chip, folder=folder, member=os.path.basename(found.path))
        elif old is None:
            log.info("scan set member added", chip=m.chip, folder=folder, member=os.path.basename(found.path))
        s.members.add(found.path)
        s.last_change = now
        self._save_sets.add(key)
        return key

    def _forget(self, path: str, now: float) -> str:
        """A member is gone; drop its set when it was the last one. Returns the set key."""
        _state, root, key = self._members.pop(path)
        self._save_members.discard(path)
        self._drop_members.add(path)
        r = self._root_of(root)
        if r is not None:
            r.judge.forget([path])
        s = self._sets.get(key)
        if s is None:
            return key
        s.members.discard(path)
        s.last_change = now
        self._save_sets.add(key)
        if not s.members:
            del self._sets[key]
            self._save_sets.discard(key)
            self._drop_sets.add(key)
            if s.state == _QUEUED:
                log.info(
                    "files of a queued scan set were removed; its job fails if they are still gone when it runs",
                    chip=s.chip,
                    folder=s.folder,
                    job_id=s.job_id,
                )
            elif s.state != _REPORTED:
                log.info("scan set disappeared before it was complete; dropped", chip=s.chip, folder=s.folder)
        return key

    # -- judging -----------------------------------------------------------------

    def _view(self, s: _Set) -> SetView:
        members = tuple(sorted((self._members[p][0] for p in s.members), key=lambda m: m.name))
        return SetView(s.chip, s.folder, members, s.last_change)

    def _judge(self, touched: set[str], now: float, deadline: float = math.inf) -> None:
        assert self._store is not None
        timeout = self.config.discovery.incomplete_timeout_s
        ready: list[tuple[_Root, _Set]] = []
        for key, s in list(self._sets.items()):
            if key in touched:
                s.next_check = 0.0
            if s.next_check > now:
                continue
            r = self._root_of(s.root)
            if r is None:
                continue
            self._identify(s, now)
            if s.state == _QUEUED:
                s.next_check = math.inf
                continue
            v = r.judge.timing(self._view(s), now)
            if v is not None:
                self._hold(r, s, v, now, timeout)
            else:
                ready.append((r, s))
        if not ready:
            return
        # Look again right before deciding: nothing may have changed since the last look.
        still: list[tuple[_Root, _Set]] = []
        for i, (r, s) in enumerate(ready):
            if folder_problem(r.policy.root) is not None:
                s.next_check = now + r.judge.recheck_s
                continue
            if i and time.monotonic() > deadline:
                s.next_check = now  # out of time: next tick
                continue
            changed = False
            for path in sorted(s.members):
                try:
                    got = probe(r.policy, path)
                except OSError:
                    changed = True  # cannot tell now: try later
                    continue
                if isinstance(got, Found):
                    changed |= self._observe(r, got, now) is not None
                else:
                    self._forget(path, now)
                    changed = True
            if s.key in self._sets and not changed:
                still.append((r, s))
            elif s.key in self._sets:
                s.next_check = 0.0 if s.last_change != now else now + r.judge.settle_s
        paths = [p for r, s in still for m in self._view(s).members for p in member_files(r.policy, m)]
        try:
            held = self._open_check(paths) if paths else set()
        except Exception:
            log.exception("open-for-writing check failed; relying on settle time and structure")
            held = None
        for r, s in still:
            self._identify(s, now)
            view = self._view(s)
            v = r.judge.checks(view, now, held)
            if v.complete:
                self._queue(r, s, view, now, v)
            else:
                self._hold(r, s, v, now, timeout)

    def _identify(self, s: _Set, now: float) -> None:
        """Fingerprint the set; look up its job. A changed queued set starts settling again."""
        assert self._store is not None
        members = self._view(s).members
        ident = fingerprint(members, s.root)
        if ident == s.ident:
            return
        s.ident = s.fp = ident
        job = self._store.find_job(ident)
        if job is None:  # queued before member paths were part of the identity: the same set only if in the same place
            legacy = self._store.find_job(fingerprint(members))
            recorded = self._store.get_scan_set(legacy.scan_set_id).members if legacy is not None else []
            if legacy is not None and {str(m.get("path")) for m in recorded} == {m.path for m in members}:
                s.fp, job = legacy.fingerprint, legacy
        previous = s.state
        if job is None:
            s.state, s.job_id = _SETTLING, None
        elif job.state == JobState.FAILED.value and job.failed_stage == "discovery":
            s.state, s.job_id = _REPORTED, job.id
        else:
            s.state, s.job_id = _QUEUED, job.id
        if s.state == _SETTLING and previous in (_QUEUED, _REPORTED):
            s.settling_since = now
            self._save_sets.add(s.key)
            log.info("scan set changed after it was queued or reported; settling again", chip=s.chip, folder=s.folder)

    def _hold(self, r: _Root, s: _Set, v: Verdict, now: float, timeout: float) -> None:
        """Not complete yet: remember why, report once past the timeout, plan the next look."""
        s.verdict = v
        due = s.settling_since + timeout
        if s.state == _SETTLING and now >= due:
            self._report(r, s, v, now)
        nxt = v.recheck_at if v.recheck_at is not None else math.inf
        if s.state == _SETTLING:
            nxt = min(nxt, due)
        s.next_check = nxt

    def _record(self, r: _Root, s: _Set, view: SetView, now: float) -> int:
        assert self._store is not None and s.fp is not None
        ssid, _ = self._store.add_scan_set(  # the root as configured: the QC job looks its settings up by it
            chip=s.chip,
            root=str(r.watch.path),
            fingerprint=s.fp,
            members=[m.job_member() for m in view.members],
            now=now,
        )
        return ssid

    def _queue(self, r: _Root, s: _Set, view: SetView, now: float, v: Verdict) -> None:
        store = self._store
        assert store is not None and s.fp is not None
        ssid = self._record(r, s, view, now)
        existing = store.find_job(s.fp)
        names = [os.path.basename(m.path) for m in view.members]
        if existing is None:
            job_id = store.create_job(
                ssid,
                state=JobState.QUEUED,
                now=now,
                message=f"{s.chip}: {len(names)} member(s) complete ({v.reason or 'settled'}); queued",
            )
        elif existing.state == JobState.FAILED.value and existing.failed_stage == "discovery":
            job_id = store.transition(
                existing.id, JobState.QUEUED, now=now, message="scan set completed after it was reported incomplete"
            ).id
        else:
            job_id = None
        s.state, s.next_check = _QUEUED, math.inf
        if job_id is None:
            s.job_id = existing.id if existing is not None else None
            log.info("scan set already processed (same fingerprint); not queued again", chip=s.chip, job_id=s.job_id)
            return
        s.job_id = job_id
        superseded = store.supersede_older(s.chip, job_id, now=now)
        with bind_job(job_id, s.chip):
            log.info(
                "scan set queued",
                folder=s.folder,
                members=names,
                waited_s=round(now - s.settling_since, 1),
                superseded=superseded or None,
            )

    def _report(self, r: _Root, s: _Set, v: Verdict, now: float) -> None:
        store = self._store
        assert store is not None
        view = self._view(s)
        ssid = self._record(r, s, view, now)
        waited = now - s.settling_since
        why = v.reason or v.stage
        error = (
            f"scan set {s.chip} in {s.folder} is still incomplete after {waited:.0f} s: {why}. "
            "It is queued by itself once it completes; re-export it if it was cut short"
        )
        job_id = store.create_job(ssid, state=JobState.SETTLING, now=now, message=f"{s.chip}: found, not complete")
        if job_id is not None:
            store.transition(job_id, JobState.FAILED, now=now, error=error, failed_stage="discovery")
            for old in store.list_jobs(chip=s.chip, states=[JobState.FAILED.value]):  # an older report of this set
                if old.id < job_id and old.failed_stage == "discovery" and old.scan_set_id != ssid:
                    members = store.get_scan_set(old.scan_set_id).members
                    if members and os.path.dirname(str(members[0].get("path", ""))) == s.folder:
                        store.transition(old.id, JobState.SUPERSEDED, now=now, message=f"superseded by report {job_id}")
        s.state, s.job_id = _REPORTED, job_id
        with bind_job(job_id, s.chip):
            log.warning("scan set never completed; reported", folder=s.folder, stage=v.stage, reason=why)


def _stat_of(row: dict[str, Any]) -> MemberStat:
    return MemberStat(int(row["size"]), int(row["mtime_ns"]), int(row["files"]), str(row["sig"]))


def _member_row(state: MemberState, root: str, key: str) -> dict[str, Any]:
    return {
        "path": state.path,
        "root": root,
        "set_key": key,
        "name": state.name,
        "chip": state.chip,
        "format": state.format,
        "role": state.role,
        "stain": state.stain,
        "size": state.stat.size,
        "mtime_ns": state.stat.mtime_ns,
        "files": state.stat.files,
        "sig": state.stat.sig,
        "first_seen": state.first_seen,
        "last_change": state.last_change,
    }
