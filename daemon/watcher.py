"""Watching the export folders: observers give hints, rescans give the truth.

Per watch root a :class:`RootWatcher` runs one watchdog observer whose events
only record *hints* (paths worth a look soon); a :class:`Rescanner` thread
walks every root each ``rescan_interval_s`` (:func:`daemon.snapshot.scan_tree`)
and discovery diffs that snapshot against what it knows. Nothing depends on
events arriving: on network shares they often do not.

The observer is ``native`` (inotify, ReadDirectoryChangesW, FSEvents) or
``polling``. ``auto`` picks polling for network paths (UNC, SMB/CIFS, NFS,
:func:`daemon.fsinfo.is_network_path`); a native observer that fails to start
falls back to polling. The polling observer lists folders and member names
only (never the tiles inside a tile folder, whose folder mtime tells when a
tile is added), so it stays cheap with 100,000 files under watch.

:meth:`RootWatcher.supervise` (called every service tick) notices an observer
that died (an emitter thread that raised, a watched folder that vanished, an
inotify queue overflow), recreates it, logs it and asks for a full rescan.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from daemon.fsinfo import FOLDER_MISSING, folder_problem, is_network_path
from daemon.logging import get_logger
from daemon.naming import parse_name
from daemon.snapshot import RoleCache, ScanResult, WalkPolicy, cached_folder_role, is_under, scan_tree

__all__ = [
    "HINT_DEEP",
    "HINT_DIR",
    "Hints",
    "ObserverFactory",
    "PollLister",
    "Rescanner",
    "RootMissing",
    "RootWatcher",
    "choose_observer",
    "default_observer",
]

log = get_logger("imageqc.watcher")

#: Hint flags: the event was about a folder / a folder that appeared (walk all of it).
HINT_DIR, HINT_DEEP = 1, 2

ObserverFactory = Callable[[str, WalkPolicy, float], BaseObserver]


def choose_observer(configured: str, path: str, *, is_network: Callable[[str], bool] = is_network_path) -> str:
    """``native`` or ``polling`` for a root: ``auto`` means polling on network file systems."""
    if configured in ("native", "polling"):
        return configured
    try:
        return "polling" if is_network(path) else "native"
    except Exception:  # psutil quirk: be safe, polling always works
        return "polling"


class Hints(FileSystemEventHandler):
    """Collects the paths events were about; the tick drains them. Never raises."""

    _IGNORED = frozenset({"opened", "closed_no_write"})  # reads, including our own checks

    def __init__(self, exclude: Sequence[str] = ()) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, int] = {}
        self._exclude = tuple(exclude)
        self.events = 0

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in self._IGNORED:
            return
        flags = HINT_DIR if event.is_directory else 0
        paths = [(os.fsdecode(event.src_path), flags)]
        if event.event_type == "moved" and event.dest_path:
            paths.append((os.fsdecode(event.dest_path), flags | (HINT_DEEP if event.is_directory else 0)))
        elif event.event_type == "created" and event.is_directory:
            paths[0] = (paths[0][0], flags | HINT_DEEP)
        with self._lock:
            self.events += 1
            for p, f in paths:
                if p and not any(is_under(p, x) for x in self._exclude):
                    self._paths[p] = self._paths.get(p, 0) | f

    def add(self, path: str, flags: int = 0) -> None:
        with self._lock:
            self._paths[path] = self._paths.get(path, 0) | flags

    def drain(self) -> dict[str, int]:
        with self._lock:
            out, self._paths = self._paths, {}
        return out


class PollLister:
    """What the polling observer sees of a folder: sub-folders, member-shaped names and markers.

    Inside a tile folder it sees nothing: the folder's own mtime changes when
    tiles come and go, and the rescan checks the rest. Which folders are tile
    folders is remembered per folder mtime, so a poll lists each folder once.
    """

    def __init__(self, policy: WalkPolicy) -> None:
        self.policy = policy
        self._roles: RoleCache = {}

    def _is_tile_folder(self, path: str) -> bool:
        info = parse_name(os.path.basename(path), is_dir=True)
        if info.member is None:
            return False
        try:
            return cached_folder_role(self.policy, path, info, self._roles) == "tiles"
        except OSError:
            return False

    def __call__(self, path: str | None) -> Iterator[os.DirEntry[str]]:
        assert path is not None
        policy = self.policy
        if path != policy.root and (policy.excluded(path) or self._is_tile_folder(path)):
            return
        with os.scandir(path) as it:
            entries = list(it)
        for e in entries:
            if policy.skips(e.name) or e.is_symlink():
                continue
            if e.is_dir(follow_symlinks=False) or parse_name(e.name).member is not None or policy.is_marker(e.name):
                yield e


def default_observer(mode: str, policy: WalkPolicy, poll_s: float) -> BaseObserver:
    """A not-yet-started observer of ``mode`` for ``policy.root``."""
    if mode == "native":
        return Observer()
    return PollingObserverVFS(
        stat=lambda p: os.stat(p, follow_symlinks=False),
        listdir=PollLister(policy),
        polling_interval=poll_s,
    )


# -- inotify overflow: watchdog handles it internally and only logs; we want a rescan ----

_overflow_watchers: weakref.WeakSet[RootWatcher] = weakref.WeakSet()


class _OverflowFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in str(record.msg).lower():
            for w in list(_overflow_watchers):
                w.overflowed = True
        return True


_OVERFLOW_FILTER = _OverflowFilter()
for _name in (
    "watchdog.observers.inotify_c",
    "watchdog.observers.inotify",
    "watchdog.observers.read_directory_changes",
):
    logging.getLogger(_name).addFilter(_OVERFLOW_FILTER)


class RootWatcher:
    """The observer of one watch root, and its supervisor.

    Parameters
    ----------
    policy : WalkPolicy
    configured : {"auto", "native", "polling"}
    poll_s : float
        Polling observer interval.
    factory : callable, optional
        ``factory(mode, policy, poll_s)`` returns an unstarted observer (tests inject failures).
    is_network : callable
        Decides ``auto`` mode.
    """

    def __init__(
        self,
        policy: WalkPolicy,
        *,
        configured: str = "auto",
        poll_s: float = 5.0,
        factory: ObserverFactory | None = None,
        is_network: Callable[[str], bool] = is_network_path,
    ) -> None:
        self.policy = policy
        self.configured = configured
        self.poll_s = poll_s
        self._factory = factory or default_observer
        self.network = choose_observer("auto", policy.root, is_network=is_network) == "polling"
        self.mode = choose_observer(configured, policy.root, is_network=is_network)
        self.hints = Hints(policy.exclude)
        self.observer: BaseObserver | None = None
        self.restarts = 0
        self.native_error: str | None = None
        self.missing = False
        self.overflowed = False
        self.problem: str | None = None
        self._retry_at = 0.0
        _overflow_watchers.add(self)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> bool:
        """Start the observer; False (with :attr:`problem` set) when the root cannot be watched now."""
        root = self.policy.root
        problem = folder_problem(root)
        if problem is not None:
            self.missing = True
            self.problem = self._worded(problem)
            return False
        self.missing = False
        if self.mode == "native":
            try:
                self.observer = self._started("native")
                self.problem = None
                return True
            except Exception as e:  # inotify limits, unsupported file system, ...
                self.native_error = f"{type(e).__name__}: {e}"
                log.warning("native file events unavailable; polling instead", root=root, error=self.native_error)
                self.mode = "polling"
        try:
            self.observer = self._started("polling")
            self.problem = None
            return True
        except Exception as e:
            self.observer = None
            self.problem = f"cannot watch: {type(e).__name__}: {e}"
            log.error("cannot watch folder; only rescans will find scan sets", root=root, error=str(e))
            return False

    def _started(self, mode: str) -> BaseObserver:
        obs = self._factory(mode, self.policy, self.poll_s)
        obs.name = f"imageqc-{mode}-observer"
        try:
            obs.schedule(self.hints, self.policy.root, recursive=self.policy.recursive)
            obs.start()
        except BaseException:
            _stop_observer(obs)
            raise
        return obs

    def stop(self) -> None:
        obs, self.observer = self.observer, None
        if obs is not None:
            _stop_observer(obs)
        _overflow_watchers.discard(self)

    def alive(self) -> bool:
        obs = self.observer
        return obs is not None and obs.is_alive() and all(e.is_alive() for e in list(obs.emitters))

    def supervise(self) -> str | None:
        """Keep the observer alive; returns why a full rescan is needed, or None."""
        now = time.monotonic()
        root = self.policy.root
        if self.overflowed:
            self.overflowed = False
            log.warning("file events were lost (queue overflow); rescanning", root=root)
            return "events lost"
        problem = folder_problem(root)
        if problem is not None:
            worded = self._worded(problem)
            if not self.missing or worded != self.problem:
                self.missing = True
                self.problem = worded
                log.warning(
                    "watch folder cannot be used; waiting for it to come back",
                    root=root,
                    problem=self.problem,
                    advice="scan sets under it are kept and their QC is retried once it is back",
                )
                obs, self.observer = self.observer, None
                if obs is not None:
                    _stop_observer(obs)
            return None
        if self.alive():
            return None
        if now < self._retry_at:
            return None
        self._retry_at = now + max(1.0, self.poll_s)
        was_missing, had = self.missing, self.observer is not None
        obs, self.observer = self.observer, None
        if obs is not None:
            _stop_observer(obs)
        if not self.start():
            return None
        if was_missing:
            log.info("watch folder is back; observer restarted", root=root, observer=self.mode)
            return "folder back"
        if had:
            self.restarts += 1
            log.warning("observer died; restarted", root=root, observer=self.mode, restarts=self.restarts)
            return "observer restarted"
        return "observer started"

    def _worded(self, problem: str) -> str:
        """:func:`~daemon.fsinfo.folder_problem`'s words; a missing network root is a missing share."""
        return "share missing" if problem == FOLDER_MISSING and self.network else problem

    def health(self) -> str:
        if self.problem:
            return self.problem
        if not self.alive():
            return "observer down"
        parts = []
        if self.restarts:
            parts.append(f"restarted {self.restarts}x")
        if self.native_error and self.mode == "polling":
            parts.append("native failed")
        return ", ".join(parts) or "ok"


def _stop_observer(obs: BaseObserver, timeout: float = 10.0) -> None:
    try:
        obs.stop()
    except Exception:  # a dead observer may fail to stop; join anyway
        log.debug("observer stop failed", exc_info=True)
    for t in [obs, *list(obs.emitters)]:
        if t.ident is not None and t is not threading.current_thread():
            t.join(timeout)


@dataclass(frozen=True)
class RootMissing:
    """A rescan found the root missing (share gone): nothing under it is judged deleted."""

    root: str
    at: float


class Rescanner:
    """A thread that walks every root each ``interval_s`` (and on request) and queues the results.

    Results (:class:`~daemon.snapshot.ScanResult` or :class:`RootMissing`)
    go to :attr:`results`; the service tick applies them. Walking happens
    here, not in the tick, so a slow share never delays the heartbeat; the
    stop event is checked between folders so :meth:`stop` is quick.
    """

    def __init__(
        self, policies: Sequence[WalkPolicy], *, interval_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.policies = {p.root: p for p in policies}
        self.interval_s = interval_s
        self.clock = clock
        self.results: queue.SimpleQueue[ScanResult | RootMissing] = queue.SimpleQueue()
        self.last: dict[str, dict[str, float]] = {}
        self._requested: set[str] = set(self.policies)
        self._roles: dict[str, RoleCache] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imageqc-rescan", daemon=True)
        self._thread.start()

    def request(self, root: str | None = None) -> None:
        """Ask for a rescan of ``root`` (all roots when None) as soon as possible."""
        with self._lock:
            self._requested.update(self.policies if root is None else [root])
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        next_due = {r: time.monotonic() + self.interval_s for r in self.policies}
        while not self._stop.is_set():
            with self._lock:
                due = set(self._requested)
                self._requested.clear()
            now = time.monotonic()
            due.update(r for r, t in next_due.items() if t <= now)
            for root in sorted(due):
                if self._stop.is_set():
                    return
                self._scan(root)
                next_due[root] = time.monotonic() + self.interval_s
            wait = max(0.0, min(next_due.values(), default=now + 60) - time.monotonic())
            self._wake.wait(wait)
            self._wake.clear()

    def _scan(self, root: str) -> None:
        policy = self.policies[root]
        started = time.monotonic()
        try:
            if folder_problem(root) is not None:  # missing, replaced by a file, unreadable: nothing under it is judged
                self.results.put(RootMissing(root, self.clock()))
                return
            result = scan_tree(policy, stop=self._stop, roles=self._roles.setdefault(root, {}))
        except Exception:  # never let the thread die: the next interval tries again
            log.exception("rescan failed", root=root)
            return
        if result.complete:
            self.results.put(result)
            self.last[root] = {
                "at": self.clock(),
                "duration_s": round(time.monotonic() - started, 3),
                "files": result.files,
            }
