"""The QC job: what the worker child runs for each queued scan set.

``run_qc_job(ctx)`` opens the scan set's files as recorded at discovery,
checks they are still the files that were queued, runs :func:`qc.pipeline.run_qc`
with the site's settings and the SQLite pair cache, writes the output folder
and archive, stores the report, and returns the job's next state.

A failed QC verdict is a successful job (``qc_done``: the outputs are uploaded
too). The job itself fails when QC cannot run: permanently for bad input (a
corrupt image, files gone), transiently for causes that may pass (a network
share briefly away, a full disk).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from daemon.config import Config, WatchRoot
from daemon.logging import get_logger
from daemon.paircache import StorePairCache
from daemon.worker import JobContext, JobOutcome

__all__ = ["run_qc_job", "qc_settings", "clarity_spec", "member_changes"]

log = get_logger("imageqc.jobs")

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.EIO, errno.ENOSPC, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.ECONNRESET, errno.ESTALE if hasattr(errno, "ESTALE") else errno.EIO}


def clarity_spec(config: Config) -> Any:
    """The clarity model spec the config asks for (None = the shipped model)."""
    qc = config.qc
    if not qc.model:
        return None
    from qc.clarity_model import STOMICS_4CLASS, ClarityModel

    path = Path(qc.model)
    if path.suffix.lower() == ".json":
        return ClarityModel.from_sidecar(path)
    mapping: dict[str, Any] = dict(STOMICS_4CLASS) if qc.model_preset == "stomics-4class" else {}
    mapping["path"] = str(path)
    if qc.model_classes:
        mapping["class_map"] = dict(qc.model_classes)
        mapping.setdefault("name", path.stem)
    return ClarityModel.from_mapping(mapping)


def qc_settings(config: Config, *, stain: str = "auto") -> Any:
    """:class:`qc.pipeline.QCSettings` from the service config."""
    from qc.io import ReadLimits
    from qc.pipeline import QCSettings
    from qc.rules import Thresholds

    t = config.qc.thresholds
    return QCSettings(
        stain=stain,
        thresholds=Thresholds(
            track=t.track, clarity=t.clarity, stitching=t.stitching,
            calibration_offset_px=t.calibration_offset_px, calibration_similarity=t.calibration_similarity,
        ),
        stitching_required=config.qc.stitching_required,
        stitching_stage_limit_px=config.qc.stitching_stage_limit_px,
        threads=config.qc.threads,
        limits=ReadLimits(max_dimension=config.qc.max_dimension, max_pixels=config.qc.max_pixels),
        clarity_model=clarity_spec(config),
        site=config.site.name,
        operator=config.site.operator,
    )


def _tree_state(path: Path) -> tuple[int, int]:
    """(total size, newest mtime_ns) of a file, or of every file under a folder."""
    if path.is_dir():
        size, newest = 0, 0
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                size += st.st_size
                newest = max(newest, st.st_mtime_ns)
        return size, newest
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


def run_qc_job(ctx: JobContext) -> JobOutcome:
    """The worker child's job function for QC."""
    from qc.errors import QCError
    from qc.io import open_scan_set
    from qc.pipeline import run_qc, write_run_outputs

    config, job = ctx.config, ctx.job
    with ctx.open_store() as store:
        scan = store.get_scan_set(job.scan_set_id)
        gone = [m for m in scan.members if not Path(m["path"]).exists()]
        if gone:
            names = ", ".join(m.get("name", m["path"]) for m in gone)
            return JobOutcome(
                state="failed",
                error=f"files of the scan set vanished after it was queued ({names}); "
                "if they were moved or renamed, the new location is discovered as a new scan set",
            )
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
            paths = [(Path(m["path"]), m.get("name")) for m in scan.members]
            with open_scan_set(
                [p for p, _ in paths],
                chip=scan.chip,
                limits=settings.limits,
                tile_pattern=watch.tile_pattern or None,
                tile_overlap=watch.tile_overlap_xy,
            ) as scan_set:
                report = run_qc(scan_set, settings, StorePairCache(store), progress=ctx.progress)
                out = write_run_outputs(
                    report, config.output_dir, pictures=config.output.pictures, archive=config.output.archive,
                    scan_set=scan_set, include_images=config.output.include_images, threads=settings.threads,
                    level=config.output.archive_level,
                )  # fmt: skip
        except QCError as e:
            log.error("QC could not run", error=str(e))
            return JobOutcome(state="failed", error=str(e))
        except OSError as e:
            transient = e.errno in _TRANSIENT_ERRNOS
            what = _disk_full(e, config) if e.errno == errno.ENOSPC else str(e)
            log.error("QC failed on a file-system error", error=str(e), transient=transient)
            return JobOutcome(state="failed", error=f"{type(e).__name__}: {what}", transient=transient)
        except MemoryError:
            return JobOutcome(state="failed", error="QC ran out of memory; raise qc.memory_limit_mb or free memory")
        store.save_result(
            job.id,
            owner=ctx.owner,
            verdict=report.verdict,
            report=report.as_dict(),
            output_dir=str(out.folder),
            archive=str(out.archive) if out.archive else None,
        )
    ctx.progress("done", 100.0)
    summary = f"QC {report.verdict}" + (f": {report.reasons[0]}" if report.reasons else "")
    log.info("QC finished", verdict=report.verdict, reasons=list(report.reasons), output=str(out.folder),
             duration_s=round(report.duration_s, 2))
    return JobOutcome(state="qc_done", message=summary, data={"verdict": report.verdict, "archive": str(out.archive)})
