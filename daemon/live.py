"""Live QC: per-FOV checks of a tile folder while the microscope is still writing it.

A microscope that writes a chip's FOV tiles one by one (Motic, STOmics Go
Optical, Leica) takes 10 to 30 minutes per chip. Discovery holds such a folder
in ``settling`` until it has been quiet for the settle time; the ``live``
component looks at the same folders meanwhile (:meth:`Discovery.growing_tile_folders`)
and checks each tile once its own file is written:

* a tile is *written* when its size and modification time stayed the same for
  ``live.tile_settle_s`` and, for a TIFF, its structure is whole
  (:func:`qc.io.tiffcheck.check_tiff_whole`);
* each written tile is decoded once and gets its per-FOV checks
  (:func:`qc.live.check_fov`: track lines, focus, exposure, clarity) and is
  registered against each neighbour already checked (stitching's own pair
  registration, under the same keys, through the service's pair cache);
* an IF image's tile folder gets no per-FOV checks (the final QC checks the
  nuclear image's FOVs only): its tiles are read once each and registered
  against their neighbours, so the final QC finds its pairs cached too;
* the FOVs so far are judged (:func:`qc.live.assess`) once the first share of
  the grid is in (``live.start_share`` of the tiles or ``live.start_rows``
  rows, whichever comes first) and after every tile since: a problem that
  would fail QC raises one warning per set and problem (log, ``imageqc
  status``, the notification event ``early_warning``), and one more message
  when it clears.

The final QC of the completed set runs as before, in the QC worker, and finds
every pair and per-FOV result computed here in the same cache (its report
counts them as ``pairs_cached`` / ``fovs_cached``): what is left is the tiles
written after the last look and the whole-chip fits.

Acquisition PCs come first: the work runs in one thread of the service at the
lowest priority the OS gives a thread (nice 19 and idle I/O on Linux), with
``live.threads`` threads for OpenCV and onnxruntime (default 1: at most one
core), and a bounded memory of decoded tiles (``live.memory_mb``, the tiles
whose neighbours are still to come). A tile whose read was slow (a busy disk)
makes the thread pause for as long again. When more written tiles wait than
two rows of the grid, it skips ahead to the newest and leaves the skipped ones
to the final QC. A tile rewritten during the scan (its content digest
changes) drops its own checks and pairs, and only those.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from daemon.config import Config, WatchRoot
from daemon.logging import get_logger

__all__ = ["EVENT", "LiveQC"]

log = get_logger("imageqc.live")

#: The notification event of an early warning (and of its clearing).
EVENT = "early_warning"
#: Live sets shown in health/status at most (the newest first).
_SHOWN = 20
#: A finished live set stays in health this long (seconds) so status still shows what it found.
_KEEP_FINISHED_S = 600.0


@dataclass(frozen=True)
class Growing:
    """A tile folder discovery still holds in ``settling``: what live QC looks at."""

    chip: str
    folder: str  #: the tile folder
    watch: WatchRoot
    since: float  #: when the set started settling (its identity for warnings)
    #: per-FOV checks and early warnings (the nuclear or H&E image); False for an IF image's folder, whose tiles
    #: are only registered against their neighbours (the final QC checks the nuclear image's FOVs only)
    fov_checks: bool = True


@dataclass
class _Seen:
    sig: tuple[int, int]  #: (size, mtime_ns) at the last look
    stable_since: float  #: when that signature was first seen
    checked: tuple[int, int] | None = None  #: the signature the checks were made on
    digest: str | None = None


@dataclass
class _LiveSet:
    g: Growing
    started: float
    tiles: dict[str, _Seen] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  #: checked FOVs in the order they were checked
    checks: dict[str, Any] = field(default_factory=dict)  #: name -> qc.live.FovCheck
    done: dict[str, str] = field(
        default_factory=dict
    )  #: name -> digest of every tile read (checked or only registered)
    pairs: dict[tuple[str, str], Any] = field(default_factory=dict)  #: (a, b) -> qc.live.LivePair
    active: dict[str, Any] = field(default_factory=dict)  #: problem code -> qc.live.LiveProblem
    raised: dict[str, float] = field(default_factory=dict)  #: problem code -> when first raised
    cleared: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  #: raised/cleared, in order
    grid: tuple[int, int] | None = None  #: the expected grid (rows, cols), from the folder's metadata
    seen_grid: tuple[int, int] = (0, 0)
    fovs_computed: int = 0
    fovs_cached: int = 0
    pairs_computed: int = 0
    pairs_cached: int = 0
    skipped: int = 0
    rewritten: int = 0
    last_error: str | None = None
    finished_at: float | None = None
    decoded: collections.OrderedDict[str, Any] = field(default_factory=collections.OrderedDict)  #: name -> pixels

    @property
    def decoded_bytes(self) -> int:
        return sum(int(p.nbytes) for p in self.decoded.values())

    def row(self) -> dict[str, Any]:
        rows, cols = self.grid if self.grid else self.seen_grid
        return {
            "chip": self.g.chip,
            "folder": self.g.folder,
            "since": self.started,
            "finished_at": self.finished_at,
            "tiles_seen": len(self.tiles),
            "grid": [rows, cols],
            "grid_known": self.grid is not None,
            "fov_checks": self.g.fov_checks,
            "fovs_checked": len(self.checks) if self.g.fov_checks else len(self.done),
            "fovs_with_lines": sum(1 for c in self.checks.values() if c.track_found),
            "fovs_computed": self.fovs_computed,
            "fovs_cached": self.fovs_cached,
            "pairs": len(self.pairs),
            "pairs_computed": self.pairs_computed,
            "pairs_cached": self.pairs_cached,
            "skipped": self.skipped,
            "rewritten": self.rewritten,
            "warnings": [
                {"code": p.code, "reason": p.reason, "fovs": list(p.fovs), "since": self.raised.get(code)}
                for code, p in sorted(self.active.items())
            ],
            "cleared": [
                {"code": code, "at": at} for code, at in sorted(self.cleared.items()) if code not in self.active
            ],
            "history": self.history[-50:],
            "error": self.last_error,
        }


def lower_thread_priority(level: str) -> None:
    """Lower the calling thread's CPU (and, on Linux, I/O) priority: ``low``, ``below_normal`` or ``normal``.

    Best effort, like :func:`daemon.worker.apply_priority` for the QC worker, but for one thread of the service.
    """
    if level == "normal":
        return
    if sys.platform.startswith("linux"):
        import psutil

        try:
            me = psutil.Process(threading.get_native_id())  # a Linux thread is a schedulable task of its own
            me.nice(19 if level == "low" else 10)
            if level == "low":
                me.ionice(psutil.IOPRIO_CLASS_IDLE)
        except (psutil.Error, OSError, AttributeError, ValueError):  # pragma: no cover - permission quirks
            pass
    elif sys.platform == "win32":  # pragma: no cover - Windows only
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        # THREAD_PRIORITY_IDLE (-15) or THREAD_PRIORITY_BELOW_NORMAL (-1)
        kernel32.SetThreadPriority(kernel32.GetCurrentThread(), -15 if level == "low" else -1)


def _whole(path: Path) -> bool:
    """Whether a tile file is complete: a TIFF structurally whole; other formats by their settled size alone."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return True
    from qc.errors import QCError
    from qc.io.tiffcheck import check_tiff_whole

    try:
        check_tiff_whole(path)
    except (QCError, OSError, ValueError):
        return False  # not whole yet: its signature will change, or the final QC says why
    return True


class _OneRead:
    """A tile file read from disk once: its SHA-256 (the tile-folder reader's digest) and its pixels share the bytes."""

    def __init__(self, path: Path, limits: Any, shape: tuple[int, int]) -> None:
        self.path, self.limits, self.shape = path, limits, shape
        self._data: bytes | None = None
        self.decoded: Any = None

    def _bytes(self) -> bytes:
        if self._data is None:
            self._data = self.path.read_bytes()
        return self._data

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(self._bytes()).hexdigest()

    def pixels(self) -> Any:
        if self.decoded is None:
            from qc.errors import CorruptImageError
            from qc.io.tiles import read_tile_file

            arr = read_tile_file(self.path, self.limits, data=self._bytes())
            if arr.shape[:2] != self.shape:
                problem = f"tile is {arr.shape[1]} x {arr.shape[0]} px but the folder's first tile is {self.shape[1]} x {self.shape[0]}"
                raise CorruptImageError(self.path, problem, hint="Re-export the tile folder; all tiles must match")
            self.decoded = arr
            self._data = None  # decoded: the bytes are not needed any more
        return self.decoded


class LiveQC:
    """The ``live`` component (see the module docstring).

    Parameters
    ----------
    config : Config
    growing : callable, optional
        ``growing() -> list[Growing]``, called from the service thread on each
        tick; default: the service's discovery component.
    """

    name = "live"

    def __init__(self, config: Config, *, growing: Callable[[], list[Growing]] | None = None) -> None:
        self.config = config
        self._growing = growing
        self._store: Any = None
        self._clock: Callable[[], float] = time.time
        self._lock = threading.Lock()
        self._wanted: dict[str, Growing] = {}
        self._sets: dict[str, _LiveSet] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._daemon: Any = None
        self._notify_events = {e for r in config.notify.rule for e in r.events}
        self._prepared: dict[str, Any] | None = None

    # -- component ---------------------------------------------------------------

    def start(self, daemon: Any) -> None:
        self._daemon = daemon
        self._store = daemon.store
        self._clock = getattr(daemon, "clock", time.time)
        if self._growing is None:
            disc = next((c for c in getattr(daemon, "components", []) if getattr(c, "name", "") == "discovery"), None)
            if disc is not None:
                self._growing = disc.growing_tile_folders
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="imageqc-live", daemon=True)
        self._thread.start()

    def tick(self, now: float) -> None:
        if self._growing is None:
            return
        wanted = {g.folder: g for g in self._growing()}
        with self._lock:
            changed = wanted.keys() != self._wanted.keys()
            self._wanted = wanted
        if changed:
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None:
            deadline = getattr(self._daemon, "stop_deadline", None)
            t.join(timeout=max(0.0, deadline - time.monotonic()) if deadline else 10.0)
            self._thread = None

    def health(self) -> dict[str, Any]:
        with self._lock:
            sets = sorted(self._sets.values(), key=lambda s: s.started, reverse=True)[:_SHOWN]
            return {"sets": [s.row() for s in sets], "enabled": self.config.live.enabled}

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        lower_thread_priority(self.config.live.priority)
        poll = self.config.live.poll_s
        while not self._stop.is_set():
            did = False
            try:
                did = self._round()
            except Exception:
                log.exception("live QC round failed; trying again")
                self._stop.wait(poll * 5)
            if not did:
                self._wake.wait(poll)
                self._wake.clear()

    def _round(self) -> bool:
        now = self._clock()
        with self._lock:
            wanted = dict(self._wanted)
            for folder, s in list(self._sets.items()):
                if folder not in wanted and s.finished_at is None:
                    s.finished_at = now
                    s.decoded.clear()
                    log.info("live QC of a tile folder ended", **self._summary(s))
                if s.finished_at is not None and now - s.finished_at > _KEEP_FINISHED_S and folder not in wanted:
                    del self._sets[folder]
            for folder, g in wanted.items():
                known = self._sets.get(folder)
                if known is None or known.finished_at is not None or known.g.since != g.since:
                    self._sets[folder] = _LiveSet(g, now)
                    log.info("live QC of a growing tile folder started", chip=g.chip, folder=folder)
        did = False
        for folder in wanted:
            if self._stop.is_set():
                break
            ls = self._sets.get(folder)
            if ls is not None and ls.finished_at is None:
                try:
                    did |= self._step(ls)
                    ls.last_error = None
                except Exception as e:  # one folder's trouble never stops the others
                    msg = f"{type(e).__name__}: {e}"
                    if msg != ls.last_error:
                        log.warning(
                            "live QC of a tile folder failed; the final QC will still run", folder=folder, error=msg
                        )
                    ls.last_error = msg
        return did

    # -- one folder ------------------------------------------------------------------

    def _prepare(self) -> dict[str, Any]:
        """Imports and the clarity model, once (in the live thread, with bounded threads)."""
        if self._prepared is None:
            import cv2

            from daemon.paircache import StorePairCache
            from daemon.qcsettings import qc_settings
            from qc.clarity import load_clarity_model
            from qc.live import WarningRules
            from qc.stitching import StitchingParams

            threads = self.config.live.threads
            cv2.setNumThreads(threads)
            settings = qc_settings(self.config)
            try:
                model = load_clarity_model(settings.clarity_model, threads=threads)
            except Exception as e:  # a bad model fails the final QC with its own message; live goes on without
                log.warning("live QC runs without clarity: the clarity model cannot be loaded", error=str(e))
                model = None
            lc = self.config.live
            self._prepared = {
                "settings": settings,
                "cache": StorePairCache(self._store),
                "model": model,
                "stitching": StitchingParams(stage_limit_px=settings.stitching_stage_limit_px),
                "rules": WarningRules(start_share=lc.start_share, start_rows=lc.start_rows),
            }
        return self._prepared

    def _step(self, s: _LiveSet) -> bool:
        from qc.io.tilenames import inspect_tile_folder

        g, lc = s.g, self.config.live
        folder = Path(g.folder)
        info = inspect_tile_folder(folder, pattern=g.watch.tile_pattern or None)
        if info.convention is None or not info.tiles:
            return False
        meta = info.metadata
        with self._lock:
            s.grid = (meta.rows, meta.cols) if meta.rows and meta.cols else None
            s.seen_grid = (info.rows, info.cols)
        now = self._clock()
        ready: list[tuple[int, str]] = []
        for t in info.tiles:
            try:
                st = (folder / t.file).stat()
            except OSError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            seen = s.tiles.get(t.file)
            if seen is None or seen.sig != sig:
                with self._lock:
                    s.tiles[t.file] = _Seen(sig, now, seen.checked if seen else None, seen.digest if seen else None)
                continue
            if seen.checked == sig or now - seen.stable_since < lc.tile_settle_s or st.st_size == 0:
                continue
            ready.append((st.st_mtime_ns, t.file))
        ready = [(m, name) for m, name in sorted(ready) if _whole(folder / name)]
        if not ready or not _whole(folder / info.tiles[0].file):  # the reader takes the grid's first tile's shape
            return False
        cols = max(1, (s.grid or s.seen_grid)[1])
        if len(ready) > 2 * cols:  # fallen behind: the newest tiles matter most while the scan runs
            skip, ready = ready[: -2 * cols], ready[-2 * cols :]
            for _, name in skip:
                s.tiles[name].checked = s.tiles[name].sig
            with self._lock:
                s.skipped += len(skip)
            log.info("live QC fell behind; skipped to the newest tiles", folder=g.folder, skipped=len(skip))
        prep = self._prepare()
        from qc.io import open_image

        image = open_image(
            folder,
            tile_pattern=g.watch.tile_pattern or None,
            tile_overlap=g.watch.tile_overlap_xy,
            limits=prep["settings"].limits,
        )
        try:
            tiles = {t.name: t for t in image.tiles or ()}
            px = image.pixel_size_um
            did = False
            for _, name in ready:
                if self._stop.is_set():
                    break
                tile = tiles.get(name)
                if tile is None:
                    continue
                self._check_tile(s, tile, tiles, px, prep)
                did = True
        finally:
            image.close()
        return did

    def _check_tile(
        self, s: _LiveSet, tile: Any, tiles: dict[str, Any], px: float | None, prep: dict[str, Any]
    ) -> None:
        from qc.live import check_fovs
        from qc.pipeline import chip_template, fov_params_for

        seen = s.tiles[tile.name]
        once = _OneRead(Path(s.g.folder) / tile.name, prep["settings"].limits, (tile.height, tile.width))
        one = replace(tile, digest_fn=once.digest, loader=once.pixels)
        hits: list[bool] = []
        t0 = time.monotonic()
        check = None
        if s.g.fov_checks:
            # the same parameters, template and model as the final QC's (qc.pipeline): the same cache keys
            (check,) = check_fovs(
                [one],
                cache=prep["cache"],
                template=chip_template(s.g.chip)[0],
                params=fov_params_for(prep["settings"].fov_params, px),
                clarity_model=prep["model"],
                on_result=lambda _c, hit: hits.append(hit),
            )
            digest = check.digest
        else:  # an IF folder: its pairs only; the digest memoised as the stitching would (check_fovs does it above)
            from qc.stitching.pair_cache import digest_key

            digest = once.digest()
            if tile.identity:
                prep["cache"].put(digest_key(tile.identity), digest.encode("ascii"))
            one = replace(one, digest_fn=lambda: digest)
        read_s = time.monotonic() - t0
        rewritten = seen.digest is not None and seen.digest != digest
        with self._lock:
            if check is None:
                pass
            elif hits and hits[0]:
                s.fovs_cached += 1
            else:
                s.fovs_computed += 1
            if rewritten:
                s.rewritten += 1
                for k in [k for k in s.pairs if tile.name in k]:
                    del s.pairs[k]
                log.info(
                    "live QC: a tile was rewritten; its checks and pairs are redone", folder=s.g.folder, tile=tile.name
                )
            seen.checked, seen.digest = seen.sig, digest
            s.done[tile.name] = digest
            if check is not None:
                s.checks[tile.name] = check
                if tile.name in s.order:
                    s.order.remove(tile.name)
                s.order.append(tile.name)
        self._remember(s, tile.name, once.decoded)
        self._pairs(s, one, tiles, prep)
        if s.g.fov_checks:
            self._judge(s)
        if read_s > 2.0 * max(self.config.live.tile_settle_s, 0.5):  # a slow read: a busy disk, give way
            self._stop.wait(min(read_s, 10.0))

    def _remember(self, s: _LiveSet, name: str, pixels: Any) -> None:
        """Keep a decoded tile for its neighbours still to come, the oldest dropped beyond ``live.memory_mb``."""
        if pixels is None:
            return
        cap = self.config.live.memory_mb * 1024 * 1024
        s.decoded.pop(name, None)
        s.decoded[name] = pixels
        while len(s.decoded) > 1 and s.decoded_bytes > cap:
            s.decoded.popitem(last=False)

    def _pairs(self, s: _LiveSet, tile: Any, tiles: dict[str, Any], prep: dict[str, Any]) -> None:
        """Register the new tile against each neighbour already checked, through the pair cache."""
        from qc.live import LivePair
        from qc.stitching.pairs import run_pairs

        params = prep["stitching"]
        near = [
            t
            for n, t in tiles.items()
            if n != tile.name and n in s.done and abs(t.x - tile.x) < tile.width and abs(t.y - tile.y) < tile.height
        ]  # footprints that overlap the new tile's; plan_pairs keeps the side contacts
        if not near:
            return
        subset = [*(self._decoded_tile(s, t) for t in near), tile]  # the new tile's loader already holds its pixels
        plans = [p for p in params.plan(subset) if tile.name in (subset[p.a].name, subset[p.b].name)]
        if not plans:
            return
        meas, cached = run_pairs(subset, plans, params.pair_params(), cache=prep["cache"], pool=None, progress=None)
        with self._lock:
            for p, m, c in zip(plans, meas, cached, strict=True):
                a, b = subset[p.a].name, subset[p.b].name
                s.pairs[(a, b)] = LivePair(a=a, b=b, status=m.status, shift=m.shift, ncc=m.ncc)
                if c:
                    s.pairs_cached += 1
                else:
                    s.pairs_computed += 1

    def _decoded_tile(self, s: _LiveSet, tile: Any) -> Any:
        """The tile with a loader that serves its decoded pixels from memory when they are still there."""
        pixels = s.decoded.get(tile.name)
        if pixels is None:
            return tile
        return replace(tile, loader=lambda: pixels)

    def _judge(self, s: _LiveSet) -> None:
        from qc.live import assess

        rules = self._prepare()["rules"]
        grid = s.grid or s.seen_grid
        with self._lock:
            seen = [s.checks[n] for n in s.order]
            pairs = list(s.pairs.values())
        problems = {p.code: p for p in assess(seen, pairs, grid, rules)}
        now = self._clock()
        for code, p in problems.items():
            if code not in s.active:
                self._raise(s, p, now)
        for code in list(s.active):
            if code not in problems:
                self._clear(s, code, now)
        with self._lock:
            s.active = problems

    def _key(self, s: _LiveSet, code: str) -> str:
        return f"live:{s.g.folder}:{s.g.since:.3f}:{code}"

    def _raise(self, s: _LiveSet, p: Any, now: float) -> None:
        first = p.code not in s.raised
        with self._lock:
            s.raised.setdefault(p.code, now)
            s.cleared.pop(p.code, None)
            s.history.append({"code": p.code, "event": "raised", "at": now, "fovs_checked": len(s.checks)})
        fovs = ", ".join(p.fovs[:8]) + (" ..." if len(p.fovs) > 8 else "")
        log.warning(
            "early warning: the scan so far would fail QC",
            chip=s.g.chip,
            folder=s.g.folder,
            problem=p.code,
            reason=p.reason,
            fovs=list(p.fovs),
            checked=len(s.checks),
        )
        if first and EVENT in self._notify_events:
            title = f"imageqc: early warning {s.g.chip}: {p.code.replace('_', ' ')}"
            body = (
                f"{p.reason}\nFOVs: {fovs}\nFolder: {s.g.folder}\n"
                f"{len(s.checks)} FOV(s) checked so far; the scan is still running: fix it while the chip is on the stage."
            )
            self._store.outbox_add(
                [{"event": EVENT, "key": self._key(s, p.code), "title": title, "body": body}], now=now
            )

    def _clear(self, s: _LiveSet, code: str, now: float) -> None:
        with self._lock:
            s.cleared[code] = now
            s.history.append({"code": code, "event": "cleared", "at": now, "fovs_checked": len(s.checks)})
        log.info("early warning cleared: later FOVs are fine", chip=s.g.chip, folder=s.g.folder, problem=code)
        if EVENT in self._notify_events:
            title = f"imageqc: early warning cleared {s.g.chip}: {code.replace('_', ' ')}"
            body = f"The latest FOVs no longer show it ({len(s.checks)} FOV(s) checked so far).\nFolder: {s.g.folder}"
            self._store.outbox_add(
                [{"event": EVENT, "key": self._key(s, code) + ":cleared", "title": title, "body": body}], now=now
            )

    def _summary(self, s: _LiveSet) -> dict[str, Any]:
        r = s.row()
        return {
            "chip": r["chip"],
            "folder": r["folder"],
            "fovs_checked": r["fovs_checked"],
            "pairs": r["pairs"],
            "skipped": r["skipped"],
            "warnings": [w["code"] for w in r["warnings"]],
            "cleared": [c["code"] for c in r["cleared"]],
        }
