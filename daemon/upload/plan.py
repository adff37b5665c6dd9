"""Which files a job uploads, under which keys, and whether its inputs are still the ones QC saw.

Each planned input carries the size and mtime discovery recorded (what QC
read) when the scan set has them, so a file changed before planning is still
caught before it is sent.

Inputs are the scan set's members: a file, or every regular file of a tile
folder (keeping its relative path, temp and hidden names left out; links and
special files are never followed and are named in the job's done message). Outputs are the
QC archive plus ``report.json`` beside it; with no archive, every file of
the output folder. ``run`` in the key is the archive's stem
(``<chip>_<YYYYMMDD>_<HHMMSS>_<version>``), or ``<chip>_<YYYYMMDD>_<HHMMSS>``
from the QC result's time.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Any

from daemon.config import Config, UploadTarget
from daemon.errors import DaemonError
from daemon.upload.policy import kinds_for_mode, render_key, run_id
from qc.io.listing import file_totals, regular_files

__all__ = [
    "DEFAULT_IGNORE",
    "InputCheck",
    "PlanError",
    "PlannedFile",
    "check_inputs",
    "ignore_patterns",
    "list_folder",
    "plan_job",
    "skipped_entries",
]

DEFAULT_IGNORE = ("~*", ".*", "*.tmp", "*.part")


class PlanError(DaemonError):
    """A job's files cannot be planned (QC archive or an input missing); the job fails without retry."""


@dataclass(frozen=True)
class PlannedFile:
    target: str
    kind: str
    local_path: str
    remote_key: str
    size: int
    mtime_ns: int

    def as_row(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "local_path": self.local_path,
            "remote_key": self.remote_key,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
        }


def _ignored(rel: Path, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(part, p) for part in rel.parts for p in patterns)


def list_folder(folder: Path, ignore: Sequence[str] = DEFAULT_IGNORE) -> list[tuple[Path, os.stat_result]]:
    """Every regular file under ``folder`` (sorted), temp/hidden names skipped; no link is followed.

    Links, junctions and special files are left out (:func:`skipped_entries`
    names them), so a link loop cannot fail the listing and a link out of the
    watch root is never uploaded.
    """
    out = []
    for name, st in regular_files(folder).files:
        p = Path(name)
        if not _ignored(p.relative_to(folder), ignore):
            out.append((p, st))
    return out


def skipped_entries(members: Iterable[dict[str, Any]], ignore: Sequence[str] = DEFAULT_IGNORE) -> list[str]:
    """``<folder>/<relative path>`` of each link or special file in the tile-folder members (not uploaded)."""
    out = []
    for m in members:
        path = Path(m["path"])
        try:
            if not path.is_dir() or path.is_symlink():
                continue
            skipped = regular_files(path).skipped
        except OSError:
            continue
        out += [
            f"{path.name}/{Path(p).relative_to(path).as_posix()}"
            for p in skipped
            if not _ignored(Path(p).relative_to(path), ignore)
        ]
    return out


def ignore_patterns(config: Config, root: str) -> Sequence[str]:
    """The ignore patterns of the watch root a scan set was found under."""
    for w in config.watch:
        try:
            if Path(root).resolve() == w.path.resolve():
                return w.ignore
        except OSError:
            continue
    return DEFAULT_IGNORE


def _recorded(st: os.stat_result, entry: dict[str, Any] | None) -> tuple[int, int]:
    """``(size, mtime_ns)`` as discovery recorded them (what QC saw), else as now."""
    if entry and entry.get("size") is not None and entry.get("mtime_ns") is not None:
        return int(entry["size"]), int(entry["mtime_ns"])
    return st.st_size, st.st_mtime_ns


def _inputs(members: Iterable[dict[str, Any]], ignore: Sequence[str]) -> list[tuple[Path, str, tuple[int, int]]]:
    files = []
    for m in members:
        path = Path(m["path"])
        if path.is_dir():
            listing = list_folder(path, ignore)
            if not listing:
                skipped = skipped_entries([m], ignore)
                msg = (
                    f"tile folder {path} holds no regular file to upload"
                    + (f" (links and special files are never followed: {', '.join(skipped[:3])})" if skipped else "")
                    + "; nothing of it can be uploaded"
                )
                raise PlanError(msg)
            for p, st in listing:
                rel = p.relative_to(path).as_posix()
                files.append((p, f"{path.name}/{rel}", _recorded(st, None)))
        elif path.is_file():
            files.append((path, path.name, _recorded(path.stat(), m)))
        else:
            raise PlanError(f"input {path} of the scan set is gone; nothing of it can be uploaded")
    return files


def _outputs(result: dict[str, Any]) -> list[tuple[Path, str, tuple[int, int]]]:
    archive = result.get("archive")
    out_dir = Path(result["output_dir"]) if result.get("output_dir") else None
    files = []
    if archive:
        a = Path(archive)
        if not a.is_file():
            raise PlanError(f"the QC archive {a} is missing; run QC again (`imageqc retry`) to recreate it")
        files.append((a, a.name, _recorded(a.stat(), None)))
        report = (out_dir or a.parent) / "report.json"
        if report.is_file():
            files.append((report, "report.json", _recorded(report.stat(), None)))
    elif out_dir is not None and out_dir.is_dir():
        files += [(p, p.relative_to(out_dir).as_posix(), _recorded(st, None)) for p, st in list_folder(out_dir)]
    if not files:
        raise PlanError("the QC result names no archive and no output folder with files; nothing to upload as outputs")
    return files


def plan_job(
    config: Config,
    *,
    chip: str,
    root: str,
    members: Sequence[dict[str, Any]],
    result: dict[str, Any] | None,
    targets: Sequence[UploadTarget] | None = None,
    tz: tzinfo | None = None,
) -> list[PlannedFile]:
    """The upload records of one job: a file per target and kind the target's mode asks for."""
    targets = [t for t in (config.upload if targets is None else targets) if t.mode != "none"]
    wanted = {k for t in targets for k in kinds_for_mode(t.mode)}
    if not wanted:
        return []
    if result is None:
        raise PlanError("the job has no QC result; run QC again (`imageqc retry`)")
    run, date = run_id(chip, result.get("archive"), float(result.get("created_at") or 0), tz)
    files: dict[str, list[tuple[Path, str, tuple[int, int]]]] = {}
    if "inputs" in wanted:
        files["inputs"] = _inputs(members, ignore_patterns(config, root))
    if "outputs" in wanted:
        files["outputs"] = _outputs(result)
    planned = []
    for t in targets:
        for kind in kinds_for_mode(t.mode):
            for path, name, (size, mtime_ns) in files[kind]:
                key = render_key(
                    t.key_template,
                    prefix=t.prefix,
                    site=config.site.name,
                    chip=chip,
                    run=run,
                    name=name,
                    kind=kind,
                    date=date,
                )
                planned.append(PlannedFile(t.name, kind, str(path), key, size, mtime_ns))
    return planned


@dataclass(frozen=True)
class InputCheck:
    """Differences between the scan set recorded at discovery and the files now."""

    changed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.changed and not self.missing


def check_inputs(members: Sequence[dict[str, Any]]) -> InputCheck:
    """Compare each member with the file system now.

    A file member must have the recorded ``size`` and ``mtime_ns``. For a
    tile folder, as the QC worker reads it, ``size`` is the total and
    ``mtime_ns`` the newest of every file under it, and ``files`` (optional)
    their count. Fields the member does not carry are not compared.
    """
    changed: list[str] = []
    missing: list[str] = []
    for m in members:
        path = Path(m["path"])
        if path.is_file():
            st = path.stat()
            for fld, now in (("size", st.st_size), ("mtime_ns", st.st_mtime_ns)):
                if m.get(fld) is not None and int(m[fld]) != now:
                    changed.append(f"{path}: {fld} {m[fld]} -> {now}")
        elif path.is_dir():
            changed += _folder_changes(path, m)
        else:
            missing.append(str(path))
    return InputCheck(tuple(changed), tuple(missing))


def _folder_changes(path: Path, m: dict[str, Any]) -> list[str]:
    everything = list_folder(path, ())
    out = []
    total, newest = file_totals(everything)
    for fld, now in (("size", total), ("mtime_ns", newest)):
        if m.get(fld) is not None and int(m[fld]) != now:
            out.append(f"{path}: {'total size' if fld == 'size' else 'newest mtime_ns'} {m[fld]} -> {now}")
    recorded = m.get("files")
    if recorded is not None and int(recorded) != len(everything):
        out.append(f"{path}: {recorded} files -> {len(everything)}")
    return out
