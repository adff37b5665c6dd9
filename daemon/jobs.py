"""The QC job: what the worker child runs for each queued scan set.

``run_qc_job(ctx)`` opens the scan set's files as recorded at discovery,
checks they are still the files that were queued, runs :func:`qc.pipeline.run_qc`
with the site's settings and the SQLite pair cache, writes the output folder
(report and pictures), then stores and announces the verdict with the SHA-256
of every input it read (the uploads check the files against them;
:mod:`daemon.inputs`) so notifications go out while it writes what SAW needs
(IPR, fused image, archive), and returns the job's next state. An input
written or replaced while QC read it, even with its size and mtime put back,
fails the run transiently: QC runs again.

A failed QC verdict is a successful job (``qc_done``: the outputs are uploaded
too). The job itself fails when QC cannot run: permanently for bad input (a
corrupt image, files deleted), transiently for causes that may pass (a full
disk; the watch root or a folder of the set missing, replaced or unreadable,
failed in stage ``files``: discovery queues such a job again as soon as the
folder is back). A set whose folder was renamed or moved inside the root is
a new scan set where it is now; its old job says where it went.
"""

from __future__ import annotations

import errno
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import Config, WatchRoot
from daemon.errors import DaemonError
from daemon.fsinfo import FOLDER_MISSING, folder_problem
from daemon.inputs import InputsChanged, identity, input_files, record_inputs
from daemon.logging import get_logger
from daemon.paircache import StorePairCache
from daemon.qcsettings import clarity_spec, qc_settings
from daemon.upload.plan import ignore_patterns
from daemon.worker import JobContext, JobOutcome
from qc.io.listing import regular_files

__all__ = [
    "FILES_STAGE",
    "clarity_spec",
    "files_problem",
    "member_changes",
    "moved_to",
    "qc_settings",
    "run_qc_job",
    "unreachable",
]

#: ``failed_stage`` of a job whose files could not be reached (root or folder missing or unreadable): retried.
FILES_STAGE = "files"

log = get_logger("imageqc.jobs")

_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.EIO,
    errno.ENOSPC,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ECONNRESET,
    errno.ESTALE if hasattr(errno, "ESTALE") else errno.EIO,
}


def _tree_state(path: Path) -> tuple[int, int]:
    """(total size, newest mtime_ns) of a file, or of every file under a folder."""
    if path.is_dir():
        return regular_files(path).totals()  # as discovery lists it: no link followed, nothing special opened
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def member_changes(members: list[dict[str, Any]]) -> list[str]:
    """What differs between the recorded members and the disk now (empty when unchanged)."""
    changes = []
    for m in members:
        path = Path(m["path"])
        if not path.exists():
            changes.append(f"{m.get('name', path.name)}: {path} is gone")
            continue
        size, mtime = _tree_state(path)
        if "size" in m and m["size"] is not None and size != m["size"]:
            changes.append(f"{m.get('name', path.name)}: size changed from {m['size']} to {size} bytes")
        elif "mtime_ns" in m and m["mtime_ns"] is not None and mtime != m["mtime_ns"]:
            changes.append(f"{m.get('name', path.name)}: modified after it was queued")
    return changes


def unreachable(root: str, members: Sequence[dict[str, Any]]) -> str | None:
    """Why the set's files cannot be reached now for a reason that may pass, or None.

    The watch root missing, not a folder or unreadable; a folder of the set
    (between the root and a member) unreadable, or missing with its files (a
    share under the root unmounted, a folder renamed and about to be renamed
    back). A file missing from a folder that is there is no such reason: it
    was deleted.
    """
    problem = folder_problem(root)
    if problem is not None:
        return f"the watch root {root} is unavailable ({problem})"
    top = os.path.realpath(root).rstrip(os.sep) + os.sep  # discovery records real paths
    checked: set[str] = set()
    for m in members:
        folder, missing = os.path.dirname(str(m["path"])), None
        while folder.startswith(top) and folder not in checked:
            checked.add(folder)
            problem = folder_problem(folder)
            if problem is None:
                break
            if problem != FOLDER_MISSING:
                return f"the scan set's folder {folder} is unavailable ({problem})"
            missing, folder = folder, os.path.dirname(folder)
        if missing is not None:
            return f"the scan set's folder {missing} is missing"
    return None


def moved_to(store: Any, root: str, members: Sequence[dict[str, Any]]) -> str | None:
    """Where discovery now sees the set's files (same names, sizes and times elsewhere under the root), or None."""
    try:
        known, _ = store.discovery_load()
    except DaemonError:  # the database cannot be read now: no answer is not an error
        return None
    wanted = {(os.path.basename(str(m["path"])), m.get("size"), m.get("mtime_ns")) for m in members}
    old = {str(m["path"]) for m in members}
    inside = os.path.realpath(root).rstrip(os.sep) + os.sep  # discovery keeps real paths
    for row in known:
        if row["path"] in old or not str(row["path"]).startswith(inside):
            continue
        if (os.path.basename(row["path"]), row["size"], row["mtime_ns"]) in wanted:
            return os.path.dirname(str(row["path"]))
    return None


def files_problem(store: Any, root: str, members: Sequence[dict[str, Any]]) -> JobOutcome | None:
    """The failure when the set's files are not all where they were queued, or None.

    Moved within the root (discovery sees them elsewhere): permanent, the
    moved set is its own job. Unreachable for a reason that may pass (see
    :func:`unreachable`): transient, stage ``files``. Deleted: permanent.
    """
    gone = [m for m in members if not os.path.lexists(str(m["path"]))]
    names = ", ".join(str(m.get("name", m["path"])) for m in gone)
    where = moved_to(store, root, members) if gone else None
    if where is not None:
        return JobOutcome(
            state="failed",
            error=(
                f"the scan set moved to {where} after it was queued ({names} no longer in its old folder); "
                "it is QC'd there as a new scan set"
            ),
        )
    why = unreachable(root, members)
    if why is not None:
        return _files_failure(why, members)
    if gone:
        return JobOutcome(
            state="failed",
            error=(
                f"files of the scan set vanished after it was queued ({names}); "
                "if they were moved or renamed, the new location is discovered as a new scan set"
            ),
        )
    return None


def _files_failure(why: str, members: Sequence[dict[str, Any]]) -> JobOutcome:
    names = ", ".join(str(m.get("name", m["path"])) for m in members)
    return JobOutcome(
        state="failed",
        transient=True,
        stage=FILES_STAGE,
        error=f"{why}: the scan set's files ({names}) cannot be read now. QC is retried, and the set is queued "
        "again as soon as the folder is back; check the share or the folder's permissions",
    )


def _disk_full(e: OSError, config: Config) -> str:
    """The ENOSPC message: which file could not be written, where to free space, that QC is retried."""
    where = f" writing {e.filename}" if e.filename else f" writing the QC outputs to {config.output_dir}"
    return (
        f"disk full{where} ({e.strerror or 'No space left on device'}): free space in the output folder "
        f"{config.output_dir} or the state folder {config.state_dir}; QC is retried"
    )


def _watch_root(config: Config, root: str) -> WatchRoot:
    """The scan set's root settings (defaults if the root left the config since it was queued)."""
    for w in config.watch:
        if str(w.path) == root:
            return w
    return WatchRoot(path=Path(root))


def _memoised_digests(cache: StorePairCache, scan_set: Any, before: dict[Path, Any]) -> dict[Path, str]:
    """Tile files' SHA-256s that live QC or the stitching already took (a tile set is not hashed twice)."""
    if not any(img.format == "tiles" for img in scan_set.images):
        return {}
    from qc.stitching import memoised_file_digests

    return memoised_file_digests(cache, before)


#: What a QC job imports lazily (with onnxruntime, scipy, h5py and ISA-L behind them): about 0.5 s.
_QC_MODULES = (
    "qc.io",
    "qc.io.tiff",
    "qc.io.tiles",
    "qc.io.czi",
    "qc.pipeline",
    "qc.calibration",
    "qc.track",
    "qc.clarity",
    "qc.live",
    "qc.stitching",
    "qc.ipr",
    "qc.pictures",
    "qc.saw_archive",
    "onnxruntime",
    "isal.igzip_threaded",
    "scipy.fft",  # qc.registration imports it when it first transforms
)


def warm(config: Config) -> None:
    """Called once by a warm QC worker before its first job (:mod:`daemon.worker`): the imports every QC job
    needs, so that the first job after the service starts is not the one that pays for them."""
    for name in _QC_MODULES:
        importlib.import_module(name)


def run_qc_job(ctx: JobContext) -> JobOutcome:
    """The worker child's job function for QC."""
    from qc.errors import QCError
    from qc.io import open_scan_set
    from qc.pipeline import run_qc, write_run_outputs

    config, job = ctx.config, ctx.job
    with ctx.open_store() as store:
        scan = store.get_scan_set(job.scan_set_id)
        problem = files_problem(store, scan.root, scan.members)
        if problem is not None:
            log.warning(
                "scan set files are not where they were queued", error=problem.error, transient=problem.transient
            )
            return problem
        changed = member_changes(scan.members)
        if changed:
            return JobOutcome(
                state="failed",
                error="the scan set changed after it was queued (" + "; ".join(changed) + "); "
                "the new version is queued as its own job once it settles",
            )
        try:
            watch = _watch_root(config, scan.root)
            settings = qc_settings(config, stain=watch.stain)
            ctx.progress("read", 0.0)
            # who each input is before QC reads it: its digest, taken after QC, must be of this file
            before = {p: identity(p) for p in input_files(scan.members, ignore=ignore_patterns(config, scan.root))}
            paths = [(Path(m["path"]), m.get("name")) for m in scan.members]
            with open_scan_set(
                [p for p, _ in paths],
                chip=scan.chip,
                limits=settings.limits,
                tile_pattern=watch.tile_pattern or None,
                tile_overlap=watch.tile_overlap_xy,
                scratch_dir=config.output_dir,  # archive members spill here, never to the system's temp folder
            ) as scan_set:
                cache = StorePairCache(store)
                report = run_qc(scan_set, settings, cache, progress=ctx.progress)
                ctx.progress("digest", None)
                inputs = record_inputs(before, known=_memoised_digests(cache, scan_set, before))

                def announce(written: Any) -> None:
                    """The verdict reaches people now; what SAW needs (IPR, fused image, archive) follows."""
                    store.save_result(
                        job.id, owner=ctx.owner, verdict=report.verdict, report=dict(written.document),
                        output_dir=str(written.folder), inputs=inputs, announce=True,
                    )  # fmt: skip
                    log.info(
                        "QC verdict", verdict=report.verdict, reasons=list(report.reasons), output=str(written.folder)
                    )
                    ctx.progress("archive", None)

                out = write_run_outputs(
                    report, config.output_dir, pictures=config.output.pictures, archive=config.output.archive,
                    scan_set=scan_set, include_images=config.output.include_images, threads=settings.threads,
                    level=config.output.archive_level, fused_image=config.output.fused_image, on_verdict=announce,
                )  # fmt: skip
        except (InputsChanged, QCError, OSError) as e:
            problem = files_problem(store, scan.root, scan.members)  # the folder went away while QC read it
            if problem is not None:
                log.warning(
                    "scan set files went away during QC", error=problem.error, transient=problem.transient, cause=str(e)
                )
                return problem
            if isinstance(e, InputsChanged):
                log.warning("an input changed while QC read it; QC runs again", path=e.path, what=e.what)
                return JobOutcome(
                    state="failed",
                    transient=True,
                    error=f"{e.path}: {e.what}, so the verdict would not be for the file as it is now; QC runs again",
                )
            if not isinstance(e, OSError):
                log.error("QC could not run", error=str(e))
                return JobOutcome(state="failed", error=str(e))
            transient = e.errno in _TRANSIENT_ERRNOS
            what = _disk_full(e, config) if e.errno == errno.ENOSPC else str(e)
            log.error("QC failed on a file-system error", error=str(e), transient=transient)
            return JobOutcome(state="failed", error=f"{type(e).__name__}: {what}", transient=transient)
        except MemoryError:
            return JobOutcome(state="failed", error="QC ran out of memory; raise qc.memory_limit_mb or free memory")
        store.set_archive(job.id, str(out.archive) if out.archive else None, owner=ctx.owner)
    ctx.progress("done", 100.0)
    summary = f"QC {report.verdict}" + (f": {report.reasons[0]}" if report.reasons else "")
    log.info(  # the verdict and its reasons were logged with "QC verdict" when they were announced
        "QC outputs written",
        output=str(out.folder),
        archive=str(out.archive) if out.archive else None,
        qc_s=round(report.duration_s, 2),
    )
    return JobOutcome(state="qc_done", message=summary, data={"verdict": report.verdict, "archive": str(out.archive)})
