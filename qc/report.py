"""The QC report (JSON contract ``imageqc.report/1``), its output folder and archive.

An output folder per run holds::

    <stem>/report.json
    <stem>/<stem>.ipr                      SAW's image record (when an IPR writer is given)
    <stem>/pictures/*.png                   overlays a person would rather look at than read
    <stem>/pictures/<chip>_summary.png      one sheet: verdict, every metric, the reasons (a notification attaches it)
    <stem>/stitching/<image>/TileConfiguration.registered.txt
    <stem>/<group>_fov_stitched.tif         a tile set's stitched image, when asked for (``outputs`` lists it)

and ``<stem>.tar.gz`` beside it is the archive SAW takes (``saw count
--image-tar``), laid out as StereoMap's: the IPR at its root, the input images
in their stain folders (:mod:`qc.saw_archive`), and the folder's other files
under ``imageqc/``. ``<stem>`` is ``<chip>_<YYYYMMDD>_<HHMMSS>_<version>``
and is also the IPR's ``QCResultFile``. :mod:`qc.io` reads these archives
back for a re-QC.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from qc.filenames import MAX_NAME_BYTES, fit_name, host_tag, writer_tag

__all__ = [
    "REPORT_SCHEMA",
    "ImageReport",
    "OutputPaths",
    "QCReport",
    "abandoned_outputs",
    "remove_abandoned_outputs",
    "run_stem",
    "write_outputs",
]

REPORT_SCHEMA = "imageqc.report/1"

#: The archive's default gzip level: 0 stores the images as they are in a
#: valid gzip stream (writing costs about what copying them does); 1-3 compress
#: with ISA-L on ``threads`` threads (about a third smaller for raw 8-bit
#: images, at several times the cost of a copy).
ARCHIVE_LEVEL = 0


@dataclass(frozen=True)
class ImageReport:
    """One image's part of the report: its facts and its metric results (any may be None)."""

    name: str
    role: str
    format: str
    width: int
    height: int
    dtype: str
    fov_grid: tuple[int, int] | None
    channels: tuple[str, ...] = ()
    pixel_size_um: float | None = None
    track: Mapping[str, Any] | None = None
    clarity: Mapping[str, Any] | None = None
    stitching: Mapping[str, Any] | None = None
    calibration: Mapping[str, Any] | None = None
    #: Tiled images: each FOV checked on its own (:func:`qc.live.fov_summary`): counts and one entry per FOV.
    fov_checks: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "dtype": self.dtype,
            "fov_grid": list(self.fov_grid) if self.fov_grid else None,
            "channels": list(self.channels),
            "pixel_size_um": self.pixel_size_um,
            "track": _plain(self.track),
            "clarity": _plain(self.clarity),
            "stitching": _plain(self.stitching),
            "calibration": _plain(self.calibration),
            "fov_checks": _plain(self.fov_checks),
        }


@dataclass(frozen=True)
class QCReport:
    """The result of one QC run (see ARCHITECTURE.md for the contract)."""

    chip: str
    stain: str
    verdict: str
    reasons: tuple[str, ...]
    images: tuple[ImageReport, ...]
    duration_s: float
    software_version: str
    started_at: float
    operator: str = ""
    site: str = ""
    thresholds: Mapping[str, float] = field(default_factory=dict)
    #: Every metric of every image, judged: ``metric``, ``image``, ``value``,
    #: ``threshold`` (as text, e.g. ">= 60"), ``passed``, ``required`` (false:
    #: advisory), ``reason`` (None when passed). What `imageqc show` lists.
    checks: tuple[Mapping[str, Any], ...] = ()
    #: Seconds spent in each stage of :func:`qc.pipeline.run_qc` (read, track, clarity, stitching,
    #: calibration, verdict); only the stages that ran.
    stage_s: Mapping[str, float] = field(default_factory=dict)
    #: Files of the output folder that a setting asked for besides report.json, the IPR and the
    #: pictures: ``fused_images``, one entry per tiled image with ``image``, ``file`` (relative to the
    #: folder), ``positions`` (``registered`` by stitching, or ``nominal``) and ``blend``. Serialised
    #: as ``outputs`` only when there are any.
    outputs: Mapping[str, Any] = field(default_factory=dict)
    #: Raw metric results and views kept for the pictures (not serialised).
    artifacts: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        doc = {
            "schema": REPORT_SCHEMA,
            "chip": self.chip,
            "stain": self.stain,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "images": [im.as_dict() for im in self.images],
            "duration_s": round(self.duration_s, 3),
            "software": {"name": "imageqc", "version": self.software_version},
            "started_at": datetime.fromtimestamp(self.started_at, tz=timezone.utc).isoformat(),
            "operator": self.operator,
            "site": self.site,
            "thresholds": dict(self.thresholds),
            "checks": [_plain(c) for c in self.checks],
            "stage_s": dict(self.stage_s),
        }
        if self.outputs:
            doc["outputs"] = _plain(self.outputs)
        return doc

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, allow_nan=False)


@dataclass(frozen=True)
class OutputPaths:
    """What :func:`write_outputs` wrote: the folder, its report.json, pictures and ``files``, and the archive.

    ``document`` is report.json's content (what a caller stores or prints as the report).
    """

    folder: Path
    report: Path
    pictures: tuple[Path, ...]
    archive: Path | None
    files: tuple[Path, ...] = ()
    document: Mapping[str, Any] = field(default_factory=dict, repr=False)


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, tuples to lists, NaN to None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return None if f != f or f in (float("inf"), float("-inf")) else round(f, 4)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def run_stem(chip: str, started_at: float, version: str) -> str:
    """``<chip>_<YYYYMMDD>_<HHMMSS>_<version>`` in UTC."""
    ts = datetime.fromtimestamp(started_at, tz=timezone.utc).strftime("%Y%m%d_%H%M%S")
    return f"{chip}_{ts}_{version}"


def _fitted_stem(report: QCReport, tag: str) -> str:
    """The run's stem, its chip part shortened (:func:`~qc.filenames.fit_name`) when a name made from it would not fit.

    The longest of those names is the archive's temporary one,
    ``.<stem>-<n>.tar.gz.partial-<host>-<pid>``; the date and version are kept.
    """
    rest = run_stem("", report.started_at, report.software_version)
    longest_extra = len(f".{rest}-99999.tar.gz.partial-{tag}")
    chip = fit_name(report.chip, limit=MAX_NAME_BYTES - longest_extra)
    return run_stem(chip, report.started_at, report.software_version)


def write_outputs(
    report: QCReport,
    out_dir: str | Path,
    *,
    pictures: Callable[[QCReport, Path], Sequence[Path]] | None = None,
    extra_files: Mapping[str, str] | None = None,
    files: Mapping[str, Callable[[Path], object]] | None = None,
    images: Sequence[tuple[Path, str]] | Callable[[], Sequence[tuple[Path, str]]] = (),
    archive: bool = True,
    ipr: Callable[[Path, str], Any] | None = None,
    threads: int = 1,
    level: int = ARCHIVE_LEVEL,
    on_verdict: Callable[[OutputPaths], object] | None = None,
) -> OutputPaths:
    """Write the run's folder (and archive) under ``out_dir``; returns what was written.

    Parameters
    ----------
    report : QCReport
    out_dir : path
    pictures : callable, optional
        ``pictures(report, folder)`` draws the pictures into ``folder``.
    extra_files : mapping, optional
        Relative path -> text, written into the folder.
    files : mapping, optional
        Relative path -> ``writer(path)``, called to write a large file (e.g. a
        fused image) straight into the folder; it must write atomically (a
        hidden temporary name renamed to ``path``, as
        :func:`qc.stitching.fuse_tiles` does).
    images : sequence of (path, archive name), or a callable returning one
        Input image files to store in the archive under those names (never
        copied into the folder); a callable is called only when the archive
        is written, after the verdict.
    archive : bool
        Write ``<stem>.tar.gz``.
    ipr : callable, optional
        ``ipr(path, qc_result_file)`` writes SAW's IPR to ``path``
        (``<stem>.ipr`` in the folder, the archive's root), atomically as
        :func:`qc.ipr.write_ipr` does.
    threads : int
        Compression threads for the archive.
    level : int
        gzip level of the archive: 0 (stored, :data:`ARCHIVE_LEVEL`) to 3.
    on_verdict : callable, optional
        Called with what is written so far (``archive`` None, ``files`` empty)
        as soon as the folder holds report.json, the pictures and
        ``extra_files``: the verdict and what a person looks at, before the
        slow part SAW needs (the ``files``, the IPR and the archive).

    Written in two steps, each atomic: the folder with report.json, the
    pictures and ``extra_files`` is built under a hidden temporary name and
    renamed into place; then each of ``files`` and the IPR is written into it
    (each writer atomic), and the archive beside it under a hidden temporary
    name, renamed into place. A crash never leaves a half-written file that looks
    finished (a folder without its IPR is a run whose SAW part was not
    written). The temporary names carry the writer's host and process id, so
    :func:`remove_abandoned_outputs` can tell the leftovers of a killed writer
    from a write still under way.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = _writer_tag()
    stem = _fitted_stem(report, tag)
    final = out_dir / stem
    n = 1
    while final.exists() or (out_dir / f"{final.name}.tar.gz").exists():
        n += 1
        final = out_dir / f"{stem}-{n}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{tag}.", dir=out_dir))
    ipr_name = f"{final.name}.ipr"
    document = report.as_dict()
    try:
        (tmp / "report.json").write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")
        pics: list[Path] = []
        if pictures is not None:
            (tmp / "pictures").mkdir()
            pics = [Path(p) for p in pictures(report, tmp / "pictures")]
        for rel, text in (extra_files or {}).items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pics = [final / "pictures" / p.name for p in pics]
    if on_verdict is not None:
        on_verdict(
            OutputPaths(
                folder=final, report=final / "report.json", pictures=tuple(pics), archive=None, document=document
            )
        )
    for rel, write in (files or {}).items():
        (final / rel).parent.mkdir(parents=True, exist_ok=True)
        write(final / rel)
    if ipr is not None:
        ipr(final / ipr_name, final.name)
    arc: Path | None = None
    if archive:
        arc = out_dir / f"{final.name}.tar.gz"
        part = out_dir / f".{arc.name}.partial-{tag}"
        try:
            members = images() if callable(images) else images
            _write_archive(part, final, ipr_name, members, threads, level)
            os.replace(part, arc)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    return OutputPaths(
        folder=final,
        report=final / "report.json",
        pictures=tuple(pics),
        archive=arc,
        files=tuple(final / rel for rel in files or {}),
        document=document,
    )


class _StoredGzip:
    """A gzip file of deflate's stored blocks: a valid ``.gz`` that costs a copy and a CRC to write.

    (zlib's level 0 does the same with a CRC several times slower; ISA-L computes it here.)
    """

    _BLOCK = 65535

    def __init__(self, path: Path) -> None:
        from isal import isal_zlib

        self._crc32 = isal_zlib.crc32
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        # magic, deflate, no flags, no mtime (reproducible), no extra flags, unknown OS
        self._fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
        self._crc = 0
        self._size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self._crc = self._crc32(view, self._crc)
        self._size += len(view)
        parts: list[Any] = []
        for k in range(0, len(view), self._BLOCK):
            chunk = view[k : k + self._BLOCK]
            n = len(chunk)
            parts += (b"\x00" + n.to_bytes(2, "little") + (n ^ 0xFFFF).to_bytes(2, "little"), chunk)
        if hasattr(os, "writev") and len(parts) > 2:  # one system call, no copy (POSIX)
            self._fh.flush()
            for k in range(0, len(parts), 512):  # IOV_MAX is 1024 on Linux
                batch = parts[k : k + 512]
                done, want = os.writev(self._fh.fileno(), batch), sum(len(b) for b in batch)
                if done != want:  # a short write: finish it plainly
                    rest = b"".join(bytes(b) for b in batch)[done:]
                    self._fh.write(rest)
                    self._fh.flush()
        else:
            for part in parts:
                self._fh.write(part)
        return len(view)

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.write(b"\x01\x00\x00\xff\xff")  # the final (empty) stored block
        self._fh.write((self._crc & 0xFFFFFFFF).to_bytes(4, "little") + (self._size & 0xFFFFFFFF).to_bytes(4, "little"))
        self._fh.close()

    def __enter__(self) -> _StoredGzip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Counted:
    """A write-only file that knows its position (tarfile's "w" mode asks; compressed streams cannot say)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.n = raw, 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.n += len(data)
        return len(data)

    def tell(self) -> int:
        return self.n


def _write_archive(
    part: Path,
    folder: Path,
    ipr_name: str,
    images: Sequence[tuple[Path, str]],
    threads: int,
    level: int = ARCHIVE_LEVEL,
) -> None:
    """The SAW layout: the IPR at the root, the images, then the folder's other files under imageqc/."""
    from isal import igzip_threaded

    if level == 0:
        raw_cm: Any = _StoredGzip(part)
    else:
        raw_cm = igzip_threaded.open(  # type: ignore[no-untyped-call]  # isal leaves this function unannotated
            part, "wb", compresslevel=min(int(level), 3), threads=max(1, int(threads))
        )
    from qc.saw_archive import IMAGEQC_FOLDER

    # "w", not the stream mode "w|": the stream re-slices its buffer per 10 KiB record
    # typeshed's tarfile file object also asks for read, seek and close, which writing never calls
    with raw_cm as raw, tarfile.open(fileobj=_Counted(raw), mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tar.copybufsize = 4 << 20  # whole blocks of the images, not 16 KiB at a time
        ipr_path = folder / ipr_name
        if ipr_path.exists():
            tar.add(ipr_path, arcname=ipr_name, recursive=False, filter=_clean_member)
        for src, name in images:
            tar.add(src, arcname=name, recursive=False, filter=_clean_member)
        for p in sorted(folder.rglob("*")):
            if p == ipr_path or p.is_dir() or p.is_symlink():
                continue
            tar.add(
                p,
                arcname=f"{IMAGEQC_FOLDER}/{p.relative_to(folder).as_posix()}",
                recursive=False,
                filter=_clean_member,
            )


_PARTIAL = re.compile(r"^\..+\.partial-(?P<host>[A-Za-z0-9-]*?)-(?P<pid>\d+)(?:\.[A-Za-z0-9_]+)?$")


_host_tag = host_tag
_writer_tag = writer_tag


def abandoned_outputs(out_dir: str | Path) -> list[Path]:
    """The half-written outputs in ``out_dir`` whose writer, on this host, is no longer running.

    Only the temporary names :func:`write_outputs` makes are considered, in
    ``out_dir`` and inside its finished run folders (a fused image or an IPR
    being written after the verdict); a writer on another host (a shared
    output folder) or one still alive is left alone.
    """
    import psutil

    out_dir = Path(out_dir)
    try:
        entries = list(out_dir.iterdir())
    except FileNotFoundError:
        return []
    host = _host_tag()

    def dead(entry: Path) -> bool:
        m = _PARTIAL.match(entry.name)
        return m is not None and m["host"] == host and not psutil.pid_exists(int(m["pid"]))

    candidates: list[Path] = []
    for entry in entries:
        if entry.name.startswith(".") or not (entry / "report.json").is_file():
            candidates.append(entry)
        else:  # a finished run folder
            candidates += [p for p in entry.iterdir() if p.name.startswith(".")]
    return sorted(e for e in candidates if dead(e))


def remove_abandoned_outputs(out_dir: str | Path) -> list[Path]:
    """Delete :func:`abandoned_outputs` (never a finished run); returns what was removed."""
    removed = []
    for path in abandoned_outputs(out_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(path)
    return removed


def _clean_member(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if info.issym() or info.islnk() or info.isdev():
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
