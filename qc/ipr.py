"""SAW's image process record (IPR, an HDF5 file): write one from a QC run, read one back.

SAW (STOmics' Stereo-seq Analysis Workflow) takes QC'd images as ``saw count
--image-tar <archive>.tar.gz``: the archive StereoMap's Image QC writes, with
an ``.ipr`` file beside the images. :func:`write_ipr` writes that file from a
:class:`~qc.report.QCReport`; :func:`read_ipr` reads one back and says clearly
what is missing or damaged. Sources: SAW's *IPR v0.2.1* schema and Table 2-6
of the *SAW File Format Manual A4.2* (STOmics/SAW), and the reader and writer
of cellbin2 1.2.1 (``cellbin2/utils/ipr.py``, IPR 0.3.0), the image engine
SAW 8 uses.

Layout
------
Root: attribute ``IPRVersion`` (:data:`IPR_VERSION`), dataset ``Preview``,
groups ``ManualState`` and ``StereoResepSwitch`` (boolean attributes, all
false: nothing was done by hand, nothing switched on), and one group per image,
named as SAW names stains: ``ssDNA``, ``DAPI`` or ``HE`` for the nuclear/H&E
image and ``<name>_IF`` for an immunofluorescence image ``<chip>_<name>_IF``.
Nothing else may sit at the root: cellbin2 reads every other root member as
an image group. Each image group holds ``ImageInfo``, ``QCInfo`` (with
``CrossPoints``), ``Stitch`` (``ScopeStitch``, ``BGIStitch``, ``StitchEval``),
``Register``, ``TissueSeg``, ``CellSeg``, and for IF images ``Calibration``
(``Scope``), with every attribute and dataset of the spec and cellbin2's
QC-stage additions (``ChipBBox``, ``ChipDetectQCPassFlag``, ...).
Registration-stage members that SAW fills itself are left out (cellbin2's
reader gives them its defaults).

Values
------
From the report and its artifacts (track fit, clarity, stitching,
calibration) and the scan set (tiles, pixel size, the files' own metadata).
A value imageqc does not have gets cellbin2's placeholder for its type:
``-999`` (int), ``-999.999`` (float), ``"-"`` (str), ``False`` (bool); an
empty dataset for arrays. An attribute keeps its type whether filled or not.
Pass flags are ``1`` only when the check ran and passed, else ``0`` (never a
placeholder: readers test flags for truth). ``QCInfo/QCPassFlag`` of the
nuclear/H&E group is the whole set's verdict (SAW checks this one); an IF
group's is its calibration (and its stitching when required). Where the spec
and cellbin2 spell a name differently both are written with the same value
(:data:`SPELLINGS`).

Conventions (checked against cellbin2's own code, see ``docs/INTEROP.md``)
    * The track fit (``Register``, ``TemplatePoint``, ``CrossPoints``) is
      written whenever a grid was fitted, also when its score fails, as
      cellbin2 does; ``QCInfo/TrackCrossQCPassFlag`` says whether to trust it.
    * ``Register/Rotation`` is :attr:`qc.track.TrackResult.angle_deg` (degrees,
      positive = clockwise on screen, y down), ``ScaleX``/``ScaleY`` are image
      px per DNB; ``Stitch/TemplatePoint`` rows are ``x, y, ix, iy`` for every
      fitted grid crossing inside the image, with ``ix``/``iy`` the template
      line index ``k mod 9`` of the x/y line (cellbin2's indexing: the gap
      after line ``i`` is ``template[i]``).
    * ``QCInfo/CrossPoints/<row>_<col>``: the crossings the track fit measured
      and confirmed, ``x, y, ix, iy`` in image px, grouped by FOV: the tiles
      of a tiled image (nearest tile centre), or for a stitched image cells of
      ``round(2000 * scale)`` px, the cut cellbin2 uses (``FOVWidth``/``Height``
      record the FOV size used). ``GoodFOVCount``: FOVs with more than 3.
    * ``Calibration/Scope/OffsetX, OffsetY`` is the shift that moves the IF
      image onto the DAPI image (cellbin2 applies it as a translation), so it
      is minus :attr:`qc.calibration.CalibrationResult.offset_px`;
      ``Confidence`` is the similarity.
    * ``Stitch/ScopeStitch/GlobalLoc``: the tiles' nominal (microscope)
      top-left positions, ``(rows, cols, 2)`` as ``x, y``, the frame every
      other coordinate in the file is in; ``Stitch/BGIStitch/StitchedGlobalLoc``:
      the positions imageqc's stitching evaluation registered, shifted so the
      smallest is 0. ``Stitch/StitchEval``: ``MaxDeviation`` (px),
      ``GlobalDeviation`` (per FOV, ``|registered - nominal|``), ``StitchEvalH``
      and ``StitchEvalV`` (each pair's deviation from its nominal offset, at
      the left/upper FOV); ``QCInfo/ScopeStitchQC*``: the stitching score,
      its pass flag, and each FOV's deviation from its neighbours. Unmeasured
      cells hold the float placeholder.

Naming (SAW)
------------
``ImageInfo/QCResultFile`` is the stem of the QC result: StereoMap writes
``<chip>_SC_<YYYYMMDD>_<HHMMSS>_<version>.tar.gz`` holding
``<chip>_SC_..._<version>.ipr`` at its root beside the stain folders. SAW 6/7
refused an archive whose name was not ``<QCResultFile>.tar.gz`` (``SAW-A40002:
The tar package name is inconsistent with the QCResultFile name``), SAW 7
refused ``IPRVersion`` 0.1.0 (``SAW-A40001``), and SAW 8 refuses a nuclear
group whose ``QCInfo/QCPassFlag`` is below 1 (``SAW-A40004``). So name the
archive ``<qc_result_file>.tar.gz`` and the IPR ``<qc_result_file>.ipr``;
:func:`saw_refusals` lists what SAW would refuse.
"""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from qc.chip import parse_chip, template_for
from qc.errors import QCError
from qc.filenames import writer_tag
from qc.io.model import Image, ScanSet, Tile
from qc.io.tiffcheck import walk_tiff
from qc.report import ImageReport, QCReport, run_stem

if TYPE_CHECKING:
    from qc.calibration import CalibrationResult
    from qc.clarity import ClarityResult
    from qc.stitching import FovResult, StitchingResult
    from qc.track import TrackResult

__all__ = [
    "CUT_DNB",
    "FLOAT_PLACEHOLDER",
    "GOOD_FOV_CROSSINGS",
    "INT_PLACEHOLDER",
    "IPR_VERSION",
    "MIN_SAW_IPR_VERSION",
    "SPELLINGS",
    "STR_PLACEHOLDER",
    "IPRError",
    "IPRImage",
    "IPRRecord",
    "default_qc_result_file",
    "ipr_group_name",
    "read_ipr",
    "saw_refusals",
    "write_ipr",
]

#: Written to ``IPRVersion``: the version cellbin2 1.2.1 writes and reads.
IPR_VERSION = "0.3.0"
#: SAW 7 refused older IPRs (``SAW-A40001``).
MIN_SAW_IPR_VERSION = "0.2.0"
INT_PLACEHOLDER = -999
FLOAT_PLACEHOLDER = -999.999
STR_PLACEHOLDER = "-"
#: (group, spec name, cellbin2 name): written twice, same value.
SPELLINGS: tuple[tuple[str, str, str], ...] = (
    ("ImageInfo", "Manufacture", "Manufacturer"),
    ("ImageInfo", "StereoResepVersion", "RegisterVersion"),
    ("QCInfo", "GoodFOVCount", "GoodFovCount"),
    ("QCInfo", "TotalFOVCount", "TotalFovCount"),
    ("QCInfo", "ClarityArr", "ClarityPreds"),
    ("Register", "RegistrationScore", "RegisterScore"),
)
#: The FOV cut cellbin2 uses for stitched images, in DNB (scaled to px by the fitted scale).
CUT_DNB = 2000
#: Spec: a good FOV has *more than* this many track crossings.
GOOD_FOV_CROSSINGS = 3
_ROOT_GROUPS = ("ManualState", "StereoResepSwitch")
_COMPRESS_MIN = 64  # elements; smaller datasets are stored plainly (gzip otherwise, never LZF)
_I, _F, _S = INT_PLACEHOLDER, FLOAT_PLACEHOLDER, STR_PLACEHOLDER


class IPRError(QCError):
    """An IPR file is not HDF5, is damaged, or lacks something required."""

    hint = "Re-write the IPR with imageqc (or re-run StereoMap Image QC); a truncated copy cannot be repaired"

    def __init__(self, path: str | Path, where: str, problem: str, *, hint: str = "") -> None:
        self.path = Path(path)
        self.where = where
        self.problem = problem
        super().__init__(f"{self.path}: {where}: {problem}", hint=hint)


@dataclass(frozen=True)
class IPRImage:
    """One image group of an IPR, as read.

    Each mapping holds the group's attributes (Python scalars, tuples for
    array attributes), datasets (ndarrays) and subgroups (nested mappings).
    ``calibration`` is ``None`` for groups without a ``Calibration`` group.
    """

    name: str
    image_info: Mapping[str, Any]
    qc_info: Mapping[str, Any]
    stitch: Mapping[str, Any]
    register: Mapping[str, Any]
    tissue_seg: Mapping[str, Any]
    cell_seg: Mapping[str, Any]
    calibration: Mapping[str, Any] | None

    @property
    def qc_passed(self) -> bool:
        """``QCInfo/QCPassFlag == 1`` (what SAW requires)."""
        return self.qc_info.get("QCPassFlag") == 1

    @property
    def cross_points(self) -> Mapping[str, np.ndarray]:
        """``QCInfo/CrossPoints``: ``"<row>_<col>"`` -> (n, 4) ``x, y, ix, iy``."""
        points: Mapping[str, np.ndarray] = self.qc_info.get("CrossPoints", {})
        return points


@dataclass(frozen=True)
class IPRRecord:
    """An IPR file as read by :func:`read_ipr`."""

    path: Path
    ipr_version: str
    manual_state: Mapping[str, Any]
    stereo_resep_switch: Mapping[str, Any]
    preview: np.ndarray
    images: Mapping[str, IPRImage]


# -- naming ----------------------------------------------------------------


def default_qc_result_file(report: QCReport) -> str:
    """The run stem ``<chip>_<YYYYMMDD>_<HHMMSS>_<version>`` (:func:`qc.report.run_stem`).

    The archive SAW gets must then be ``<stem>.tar.gz``; when the output
    writer had to pick another name (``<stem>-2`` on a collision) pass that one.
    """
    return run_stem(report.chip, report.started_at, report.software_version)


def ipr_group_name(chip: str, image: ImageReport | str, stain: str) -> str:
    """SAW's group name of an image: ``DAPI``/``ssDNA``/``HE`` or ``<name>_IF``.

    Parameters
    ----------
    chip : str
        The scan set's chip serial.
    image : ImageReport or str
        The image (its ``name`` and ``role``), or an image name.
    stain : str
        The report's stain (``DAPI``, ``ssDNA``, ``HE``, ``DAPI+mIF``).
    """
    name = image if isinstance(image, str) else image.name
    role = "" if isinstance(image, str) else image.role
    if role == "HE" or (not role and stain == "HE"):
        return "HE"
    if role == "IF" or (not role and name.endswith("_IF")):
        rest = name[len(chip) + 1 :] if name.startswith(f"{chip}_") else name
        return rest if rest.endswith("_IF") else f"{rest}_IF"
    return "DAPI" if stain == "DAPI+mIF" else stain


# -- writing -----------------------------------------------------------------


def write_ipr(
    report: QCReport,
    scan_set: ScanSet | None,
    path: str | Path,
    *,
    qc_result_file: str | None = None,
) -> Path:
    """Write SAW's IPR for a QC run.

    Parameters
    ----------
    report : QCReport
        From :func:`qc.pipeline.run_qc`, with its ``artifacts`` (the track fit,
        clarity, stitching and calibration results); without them the scalar
        values come from the report's blocks and the point sets stay empty.
    scan_set : ScanSet or None
        The images QC'd (tiles, pixel size and the files' metadata); ``None``
        uses the report alone.
    path : str or Path
        The ``.ipr`` file, or a folder (an existing one, or a path without a
        suffix) to write ``<qc_result_file>.ipr`` in. Written atomically (a
        temporary name, then renamed); parent folders are created.
    qc_result_file : str, optional
        ``ImageInfo/QCResultFile``: the stem SAW requires the archive to be
        named after (``<qc_result_file>.tar.gz``). Default
        :func:`default_qc_result_file`.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    ValueError
        ``qc_result_file`` is not a plain file stem, ``path`` does not end in
        ``.ipr``, or the scan set is another chip's.
    """
    stem = default_qc_result_file(report) if qc_result_file is None else qc_result_file
    if not stem or stem != Path(stem).name or stem.endswith((".tar.gz", ".ipr")) or stem in (".", ".."):
        example = default_qc_result_file(report)
        msg = f"qc_result_file must be a file stem without folders or suffix (e.g. {example!r}), got {stem!r}"
        raise ValueError(msg)
    target = Path(path)
    if target.is_dir() or not target.suffix:
        target = target / f"{stem}.ipr"
    if target.suffix != ".ipr":
        msg = f"{target}: an IPR file must end in .ipr (SAW looks for *.ipr); name it {stem}.ipr"
        raise ValueError(msg)
    if scan_set is not None and scan_set.chip != report.chip:
        msg = (
            f"the scan set is chip {scan_set.chip!r} but the report is chip {report.chip!r}; "
            "pass the scan set the report was made from"
        )
        raise ValueError(msg)
    sources = {img.name: img for img in (scan_set.images if scan_set is not None else [])}
    groups: dict[str, Any] = {}
    for im in report.images:
        name = ipr_group_name(report.chip, im, report.stain)
        if name in groups:
            msg = f"two images of {report.chip} map to the IPR group {name!r}; SAW allows one image per stain"
            raise ValueError(msg)
        groups[name] = _image_tree(report, im, sources.get(im.name), stem, name)
    tree: dict[str, Any] = {
        "IPRVersion": IPR_VERSION,
        "Preview": np.zeros(0, np.uint8),
        "ManualState": dict.fromkeys(("calibration", "cellseg", "register", "stitch", "tissueseg"), False),
        "StereoResepSwitch": dict.fromkeys(("cellseg", "register", "stitch", "tissueseg"), False),
        **groups,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.partial-{writer_tag()}")
    try:
        with h5py.File(part, "w") as f:
            _write_tree(f, tree)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return target


def _write_tree(group: h5py.Group, tree: Mapping[str, Any]) -> None:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _write_tree(group.create_group(key), value)
        elif isinstance(value, np.ndarray):
            opts = {"compression": "gzip", "compression_opts": 4} if value.size >= _COMPRESS_MIN else {}
            group.create_dataset(key, data=value, **opts)
        elif isinstance(value, (list, tuple)):
            group.attrs[key] = np.asarray(value) if len(value) else np.zeros(0, np.int64)
        else:
            group.attrs[key] = value


def _image_tree(report: QCReport, im: ImageReport, img: Image | None, stem: str, group: str) -> dict[str, Any]:
    art = report.artifacts or {}
    track = art.get("track", {}).get(im.name)
    clarity = art.get("clarity", {}).get(im.name)
    stitching = art.get("stitching", {}).get(im.name)
    tiles = list(img.tiles) if img is not None and img.tiles else []
    fovs = _fovs(im, track, tiles)
    tree = {
        "ImageInfo": _image_info(report, im, img, stem, tiles, fovs),
        "QCInfo": _qc_info(report, im, group, track, clarity, stitching, fovs),
        "Stitch": _stitch(im, track, stitching, tiles),
        "Register": _register(im, track),
        "TissueSeg": {"TissueSegScore": _I, "TissueSegShape": [], "TissueMask": np.zeros(0, np.int64)},
        "CellSeg": {"CellSegShape": [], "CellMask": np.zeros(0, np.int64), "CellSegTrace": np.zeros(0, np.int32)},
    }
    if im.role == "IF":
        tree["Calibration"] = _calibration(im, art.get("calibration", {}).get(im.name))
    return tree


def _spell(group: str, values: dict[str, Any]) -> dict[str, Any]:
    """Add cellbin2's spelling of every name the spec spells differently."""
    for g, spec, other in SPELLINGS:
        if g == group and spec in values:
            values[other] = values[spec]
    return values


def _num(value: Any, default: float = _F) -> float:
    """A finite float, or the placeholder."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _image_info(
    report: QCReport, im: ImageReport, img: Image | None, stem: str, tiles: list[Tile], fovs: _Fovs | None
) -> dict[str, Any]:
    meta = _file_metadata(img)
    pitch = parse_chip(report.chip)
    channel = im.channels[0] if len(im.channels) == 1 and not re.fullmatch(r"gray|C\d+", im.channels[0]) else _S
    bits = np.dtype(im.dtype).itemsize * 8 if np.dtype(im.dtype).kind in "ui" else _I
    info: dict[str, Any] = {
        "AppFileVer": meta.get("AppFileVer", _S), "BackgroundBalance": False, "BitDepth": bits, "Brightness": _I,
        "ChannelCount": len(im.channels) or _I, "ColorEnhancement": False, "Contrast": False,
        "DeviceSN": meta.get("DeviceSN", _S), "DistortionCorrection": False, "ExposureTime": _F,
        "FOVHeight": fovs.height if fovs else _I, "FOVWidth": fovs.width if fovs else _I, "Gain": _S, "Gamma": _F,
        "GammaShift": False, "Illuminance": _S, "Manufacture": meta.get("Manufacture", _S),
        "Model": meta.get("Model", _S), "Overlap": _overlap(tiles),
        "Pitch": int(template_for(pitch).pitch_nm) if pitch is not None else _I,
        "PixelSizeX": _num(im.pixel_size_um), "PixelSizeY": _num(im.pixel_size_um), "QCResultFile": stem,
        "RGBScale": np.full(3, _I, np.int64), "STOmicsChipSN": report.chip, "ScanChannel": channel,
        "ScanCols": im.fov_grid[1] if im.fov_grid else _I, "ScanObjective": _num(meta.get("ScanObjective")),
        "ScanRows": im.fov_grid[0] if im.fov_grid else _I, "ScanTime": meta.get("ScanTime", _S), "Sharpness": _F,
        "StereoResepVersion": _S, "StitchedImage": not tiles, "WhiteBalance": _S,
        "STOmicsChipFovCol": _S, "STOmicsChipFovRow": _S,
    }  # fmt: skip
    return _spell("ImageInfo", info)


def _overlap(tiles: list[Tile]) -> float:
    """Mean nominal overlap between neighbouring tiles, as a fraction of the tile size."""
    by_cell = {(t.row, t.col): t for t in tiles}
    fractions = []
    for t in tiles:
        right, below = by_cell.get((t.row, t.col + 1)), by_cell.get((t.row + 1, t.col))
        if right is not None:
            fractions.append(1.0 - (right.x - t.x) / t.width)
        if below is not None:
            fractions.append(1.0 - (below.y - t.y) / t.height)
    return round(float(np.mean(fractions)), 6) if fractions else _F


def _flag(block: Mapping[str, Any] | None) -> int:
    return 1 if block is not None and block.get("passed") is True else 0


def _qc_info(
    report: QCReport,
    im: ImageReport,
    group: str,
    track: TrackResult | None,
    clarity: ClarityResult | None,
    stitching: StitchingResult | None,
    fovs: _Fovs | None,
) -> dict[str, Any]:
    mine = [r for r in report.reasons if r.startswith(f"{im.name}:")]
    if im.role == "IF":
        stitched_ok = im.stitching is None or _flag(im.stitching) or not im.stitching.get("required")
        passed = _flag(im.calibration) and stitched_ok
    else:
        passed = report.verdict == "pass"
    tb = im.track or {}
    cb = im.clarity or {}
    qc: dict[str, Any] = {
        "QCPassFlag": int(bool(passed)), "TrackCrossQCPassFlag": _flag(im.track), "ChipDetectQCPassFlag": 0,
        "TrackLineScore": _num(getattr(track, "score", tb.get("score"))), "TrackLineChannel": 0 if im.track else _I,
        "TemplateRecall": _num(tb.get("template_recall")),
        "TemplateValidArea": _num(getattr(track, "area_share", tb.get("area_share"))),
        "ClarityScore": _num(cb.get("score")),
        "ClarityCounts": json.dumps(dict(cb["counts"]), sort_keys=True) if cb.get("counts") else _S,
        "ClarityCutSize": [_I, _I], "ClarityOverlap": _I, "ClarityArr": np.zeros(0, np.int8),
        "Experimenter": report.operator or _S, "ImageQCVersion": f"imageqc {report.software_version}",
        "RemarkInfo": "; ".join(mine) if mine else _S, "StainType": group,
        "GoodFOVCount": _I, "TotalFOVCount": _I,
        "ScopeStitchQCScore": _F, "ScopeStitchQCPassFlag": 0, "ScopeStitchQCMatrix": np.zeros(0),
        "CrossPoints": {},
        "ChipBBox": {
            "LeftTop": np.full(2, _F), "LeftBottom": np.full(2, _F), "RightTop": np.full(2, _F),
            "RightBottom": np.full(2, _F), "ChipSize": np.full(2, _F), "ScaleX": _F, "ScaleY": _F, "Rotation": _F,
            "IsAvailable": False,
        },
    }  # fmt: skip
    if clarity is not None:
        window = int(clarity.grid.window)
        qc.update(ClarityCutSize=[window, window], ClarityOverlap=0, ClarityArr=np.asarray(clarity.class_map, np.int8))
    if fovs is not None:
        qc["TotalFOVCount"] = fovs.count
    if fovs is not None and (track is not None or im.track):
        points = _cross_points(track, fovs)
        qc["CrossPoints"] = points
        qc["GoodFOVCount"] = sum(1 for p in points.values() if len(p) > GOOD_FOV_CROSSINGS)
    if stitching is not None:
        qc.update(ScopeStitchQCScore=float(stitching.score), ScopeStitchQCPassFlag=int(stitching.passed),
                  ScopeStitchQCMatrix=_fov_matrix(stitching, lambda f: f.deviation_from_neighbours_px))  # fmt: skip
    return _spell("QCInfo", qc)


@dataclass(frozen=True)
class _Fovs:
    """The FOV cells CrossPoints are grouped by: tiles (nearest centre) or a regular cut grid."""

    rows: int
    cols: int
    width: int
    height: int
    cells: np.ndarray | None  # (n, 2) row, col of each tile; None for a cut grid
    centres: np.ndarray | None  # (n, 2) x, y of each tile's centre

    @property
    def count(self) -> int:
        return self.rows * self.cols if self.cells is None else len(self.cells)

    def assign(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.centres is None or self.cells is None:
            r = np.clip((xy[:, 1] // self.height).astype(int), 0, self.rows - 1)
            c = np.clip((xy[:, 0] // self.width).astype(int), 0, self.cols - 1)
            return r, c
        d = ((xy[:, None, :] - self.centres[None, :, :]) ** 2).sum(axis=2)
        k = np.argmin(d, axis=1)
        return self.cells[k, 0], self.cells[k, 1]


def _fovs(im: ImageReport, track: TrackResult | None, tiles: list[Tile]) -> _Fovs | None:
    if tiles:
        cells = np.array([[t.row, t.col] for t in tiles], int)
        centres = np.array([[t.x + t.width / 2.0, t.y + t.height / 2.0] for t in tiles])
        rows, cols = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
        return _Fovs(rows, cols, int(tiles[0].width), int(tiles[0].height), cells, centres)
    scale: Sequence[Any] = getattr(track, "scale", None) or (im.track or {}).get("scale") or ()
    if len(scale) != 2 or _F in (_num(scale[0]), _num(scale[1])):
        return None
    side = max(1, round(CUT_DNB * float(np.mean(scale))))
    return _Fovs(math.ceil(im.height / side), math.ceil(im.width / side), side, side, None, None)


def _cross_points(track: TrackResult | None, fovs: _Fovs) -> dict[str, np.ndarray]:
    crossings = np.asarray(getattr(track, "crossings", np.zeros((0, 4))), float).reshape(-1, 4)
    if track is None or not len(crossings):
        return {}
    n = len(template_for(track.template).offsets)
    pts = np.column_stack([crossings[:, :2], np.mod(crossings[:, 2], n), np.mod(crossings[:, 3], n)])
    rows, cols = fovs.assign(pts[:, :2])
    return {
        f"{r}_{c}": pts[(rows == r) & (cols == c)]
        for r, c in sorted(set(zip(rows.tolist(), cols.tolist(), strict=False)))
    }


def _template_points(track: TrackResult | None) -> np.ndarray:
    """Every fitted grid crossing inside the image: ``x, y, ix, iy`` (template line indices)."""
    if track is None or track.grid is None:
        return np.zeros((0, 4))
    grid = track.grid
    w, h = track.image_size
    kx, ky = grid.lines_in_image(0, w, h), grid.lines_in_image(1, w, h)
    gx, gy = np.meshgrid(kx, ky, indexing="ij")  # x line outer, y line inner (cellbin2's order)
    gx, gy = gx.ravel(), gy.ravel()
    xy = grid.chip_to_image(grid.line_positions(gx), grid.line_positions(gy)).reshape(-1, 2)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)  # cellbin2's bounds
    n = len(grid.template.offsets)
    return np.column_stack([xy[inside], np.mod(gx[inside], n), np.mod(gy[inside], n)]).astype(np.float64)


def _fov_matrix(stitching: StitchingResult, value: Callable[[FovResult], float | None]) -> np.ndarray:
    rows, cols = stitching.grid
    out = np.full((rows, cols), _F)
    for f in stitching.fovs:
        v = value(f)
        if v is not None:
            out[f.row, f.col] = float(v)
    return out


def _deviation_from_nominal(fov: FovResult) -> float | None:
    d = fov.deviation_from_nominal
    return None if d is None else math.hypot(*d)


def _stitch(
    im: ImageReport, track: TrackResult | None, stitching: StitchingResult | None, tiles: list[Tile]
) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "GlobalHeight": int(im.height), "GlobalWidth": int(im.width), "GlobalLoc": np.zeros(0, np.int64),
        "ScopeJitterDiff": np.zeros(0), "ScopeHorizontalJitter": np.zeros(0), "ScopeVerticalJitter": np.zeros(0),
    }  # fmt: skip
    bgi: dict[str, Any] = {
        "StitchedGlobalHeight": _I, "StitchedGlobalWidth": _I, "StitchedGlobalLoc": np.zeros(0, np.int64),
    }  # fmt: skip
    evaluation: dict[str, Any] = {
        "MaxDeviation": _F,
        "GlobalDeviation": np.zeros(0),
        "StitchEvalH": np.zeros(0),
        "StitchEvalV": np.zeros(0),
    }
    score = _F
    if tiles:
        rows, cols = max(t.row for t in tiles) + 1, max(t.col for t in tiles) + 1
        loc = np.full((rows, cols, 2), _I, np.int64)
        for t in tiles:
            loc[t.row, t.col] = (round(t.x), round(t.y))
        scope["GlobalLoc"] = loc
    if stitching is not None:
        score = float(stitching.score)
        pos = stitching.registered_positions
        sizes = {t.name: (t.width, t.height) for t in tiles}
        xy = np.array([pos[f.name] for f in stitching.fovs], float)
        xy = np.round(xy - xy.min(axis=0)).astype(np.int64)
        rows, cols = stitching.grid
        reg = np.full((rows, cols, 2), _I, np.int64)
        for f, p in zip(stitching.fovs, xy, strict=False):
            reg[f.row, f.col] = p
        bgi["StitchedGlobalLoc"] = reg
        if all(f.name in sizes for f in stitching.fovs):
            ends = xy + np.array([sizes[f.name] for f in stitching.fovs], np.int64)
            bgi["StitchedGlobalWidth"], bgi["StitchedGlobalHeight"] = (int(v) for v in ends.max(axis=0))
        h = np.full((rows, cols), _F)
        v = np.full((rows, cols), _F)
        where = {f.name: (f.row, f.col) for f in stitching.fovs}
        for p in stitching.pairs:
            if p.deviation_px is not None:
                (h if p.direction == "right" else v)[where[p.a]] = float(p.deviation_px)
        evaluation.update(
            MaxDeviation=float(stitching.max_deviation_px), StitchEvalH=h, StitchEvalV=v,
            GlobalDeviation=_fov_matrix(stitching, _deviation_from_nominal),
        )  # fmt: skip
    elif im.stitching:
        score = _num(im.stitching.get("score"))
        evaluation["MaxDeviation"] = _num(im.stitching.get("max_deviation_px"))
    return {
        "StitchingScore": score, "TemplateSource": _S, "WhichStitch": _S,
        "TemplatePoint": _template_points(track), "TransformTemplate": np.zeros(0),
        "ScopeStitch": scope, "BGIStitch": bgi, "StitchEval": evaluation,
    }  # fmt: skip


def _register(im: ImageReport, track: TrackResult | None) -> dict[str, Any]:
    tb = im.track or {}
    angle = getattr(track, "angle_deg", tb.get("angle_deg"))
    scale = getattr(track, "scale", None) or tb.get("scale") or (None, None)
    reg: dict[str, Any] = {
        "Rotation": _num(angle), "ScaleX": _num(scale[0]), "ScaleY": _num(scale[1]),
        "CounterRot90": _I, "Flip": False, "MatrixShape": [], "OffsetX": _F, "OffsetY": _F, "RegistrationScore": _I,
        "XStart": _I, "YStart": _I, "ManualRotation": _F, "ManualScaleX": _F, "ManualScaleY": _F,
        "MatrixTemplate": np.zeros(0), "Method": _S,
    }  # fmt: skip
    return _spell("Register", reg)


def _calibration(im: ImageReport, result: CalibrationResult | None) -> dict[str, Any]:
    block = im.calibration or {}
    offset = getattr(result, "offset_px", None) or block.get("offset_px")
    similarity = getattr(result, "similarity", block.get("similarity"))
    scope = {"Confidence": _num(similarity), "OffsetX": _F, "OffsetY": _F}
    if offset is not None and all(v is not None and math.isfinite(v) for v in offset):
        scope.update(OffsetX=-float(offset[0]), OffsetY=-float(offset[1]))
    return {"CalibrationQCPassFlag": _flag(im.calibration), "Scope": scope}


# -- file metadata -------------------------------------------------------------


def _file_metadata(img: Image | None) -> dict[str, Any]:
    """Microscope facts the image file itself states (TIFF tags, OME-XML, CZI XML); {} when none.

    Metadata is optional: an unreadable header leaves the placeholders.
    """
    path = Path(getattr(img, "path", "") or "")
    fmt = getattr(img, "format", "")
    if not path.is_file() or fmt not in ("tiff", "czi"):
        return {}
    try:
        return _czi_metadata(path) if fmt == "czi" else _tiff_metadata(path)
    except (OSError, ValueError, ET.ParseError, QCError):
        return {}


def _tiff_metadata(path: Path) -> dict[str, Any]:
    import tifffile

    walk_tiff(path)  # bounded: refuses looping or too deeply nested SubIFDs before tifffile follows them
    out: dict[str, Any] = {}
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        # not Software: it names whatever program wrote the file, seldom the microscope's
        for tag, key in (("Make", "Manufacture"), ("Model", "Model"), ("DateTime", "ScanTime")):
            if tag in tags and str(tags[tag].value).strip():
                out[key] = str(tags[tag].value).strip()
        ome = tif.ome_metadata if tif.is_ome else None
    if ome:
        root = ET.fromstring(ome)
        found = {e.tag.rsplit("}", 1)[-1]: e for e in root.iter()}
        scope, objective, acquired = found.get("Microscope"), found.get("Objective"), found.get("AcquisitionDate")
        if scope is not None:
            for attr, key in (("Manufacturer", "Manufacture"), ("Model", "Model"), ("SerialNumber", "DeviceSN")):
                if scope.get(attr):
                    out[key] = scope.get(attr)
        if objective is not None and (magnification := objective.get("NominalMagnification")):
            out["ScanObjective"] = float(magnification)
        if acquired is not None and (acquired.text or "").strip():
            out["ScanTime"] = (acquired.text or "").strip()
    return out


def _czi_metadata(path: Path) -> dict[str, Any]:
    from qc.io.czidir import CziDirectory

    with path.open("rb") as fh:
        xml = CziDirectory(fh, path).metadata_xml()
    if not xml:
        return {}
    info = ET.fromstring(xml).find("Metadata/Information")
    if info is None:
        return {}
    out: dict[str, Any] = {}

    def text(elem: ET.Element | None, child: str) -> str:
        return "" if elem is None else (elem.findtext(child) or "").strip()

    scope = info.find("Instrument/Microscopes/Microscope")
    if scope is not None and scope.get("Name"):
        out["Model"] = scope.get("Name")
    for child, key in (("Manufacturer/Manufacturer", "Manufacture"), ("Manufacturer/SerialNumber", "DeviceSN")):
        if text(scope, child):
            out[key] = text(scope, child)
    ref = info.find("Image/ObjectiveSettings/ObjectiveRef")
    objectives = info.findall("Instrument/Objectives/Objective")
    used = [o for o in objectives if ref is not None and o.get("Id") == ref.get("Id")]
    chosen = next(iter(used or objectives), None)
    if text(chosen, "NominalMagnification"):
        out["ScanObjective"] = float(text(chosen, "NominalMagnification"))
    if text(info, "Image/AcquisitionDateAndTime"):
        out["ScanTime"] = text(info, "Image/AcquisitionDateAndTime")
    app = " ".join(v for v in (text(info, "Application/Name"), text(info, "Application/Version")) if v)
    if app:
        out["AppFileVer"] = app
    return out


# -- reading -------------------------------------------------------------------

_REQUIRED_IMAGE_GROUPS = ("ImageInfo", "QCInfo")
_REQUIRED_ATTRS = {"ImageInfo": ("QCResultFile", "STOmicsChipSN"), "QCInfo": ("QCPassFlag",)}


def read_ipr(path: str | Path) -> IPRRecord:
    """Read an IPR file.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    IPRRecord

    Raises
    ------
    IPRError
        The file is missing, not HDF5 or truncated, or lacks ``IPRVersion``,
        an image group, an image's ``ImageInfo``/``QCInfo`` (with
        ``QCResultFile``, ``STOmicsChipSN``, ``QCPassFlag``), or an IF image's
        ``Calibration/Scope``; or a member cannot be read. The error names the
        group or attribute.
    """
    path = Path(path)
    if not path.is_file():
        raise IPRError(path, "the file", "does not exist", hint="Check the path; SAW needs the .ipr beside the images")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise IPRError(path, "the file", f"is not a readable HDF5 file ({e})") from e
    with f:
        version = _attr(f, path, "/", "IPRVersion")
        images = {}
        for name in f:
            if name in _ROOT_GROUPS or not isinstance(f.get(name, getlink=False), h5py.Group):
                continue
            images[name] = _read_image(f, path, name)
        if not images:
            raise IPRError(path, "the root", "holds no image group (ssDNA, DAPI, HE or <name>_IF)")
        preview = _member(f, path, "Preview") if "Preview" in f else np.zeros(0, np.uint8)
        return IPRRecord(
            path=path, ipr_version=str(version), images=images, preview=np.asarray(preview),
            manual_state=_read_group(f, path, "ManualState") if "ManualState" in f else {},
            stereo_resep_switch=_read_group(f, path, "StereoResepSwitch") if "StereoResepSwitch" in f else {},
        )  # fmt: skip


def _read_image(f: h5py.File, path: Path, name: str) -> IPRImage:
    for sub in _REQUIRED_IMAGE_GROUPS:
        if sub not in f[name]:
            raise IPRError(path, f"{name}/{sub}", "group is missing", hint="Not a complete IPR: re-write it")
        for attr in _REQUIRED_ATTRS[sub]:
            _attr(f[name][sub], path, f"{name}/{sub}", attr)
    parts = {sub: _read_group(f, path, f"{name}/{sub}") if sub in f[name] else {} for sub in
             ("ImageInfo", "QCInfo", "Stitch", "Register", "TissueSeg", "CellSeg")}  # fmt: skip
    calibration = None
    if "Calibration" in f[name] or name.endswith("_IF"):
        if "Calibration/Scope" not in f[name]:
            raise IPRError(path, f"{name}/Calibration/Scope", "group is missing (every IF image needs one)")
        calibration = _read_group(f, path, f"{name}/Calibration")
    return IPRImage(
        name=name, image_info=parts["ImageInfo"], qc_info=parts["QCInfo"], stitch=parts["Stitch"],
        register=parts["Register"], tissue_seg=parts["TissueSeg"], cell_seg=parts["CellSeg"], calibration=calibration,
    )  # fmt: skip


def _attr(group: h5py.Group, path: Path, where: str, name: str) -> Any:
    label = name if where == "/" else f"{where}/{name}"
    try:
        value = group.attrs[name]
    except KeyError:
        raise IPRError(path, label, "attribute is missing") from None
    except (OSError, RuntimeError) as e:
        raise IPRError(path, label, f"attribute cannot be read ({e}); the file is damaged or truncated") from e
    return _plain(value)


def _member(group: h5py.Group, path: Path, where: str) -> Any:
    try:
        return group[where][()]
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise IPRError(path, where, f"cannot be read ({e}); the file is damaged or truncated") from e


def _read_group(f: h5py.File, path: Path, where: str) -> dict[str, Any]:
    try:
        group = f[where]
        out: dict[str, Any] = {k: _plain(v) for k, v in group.attrs.items()}
        for key in group:
            member = group.get(key, getlink=False)
            if isinstance(member, h5py.Group):
                out[key] = _read_group(f, path, f"{where}/{key}")
            else:
                out[key] = np.asarray(_member(f, path, f"{where}/{key}"))
    except IPRError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise IPRError(path, where, f"cannot be read ({e}); the file is damaged or truncated") from e
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return tuple(_plain(v) for v in value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# -- SAW's checks ----------------------------------------------------------------


def saw_refusals(record: IPRRecord, archive_name: str | None = None) -> tuple[str, ...]:
    """Why SAW would refuse this IPR (and its archive), each as one line; empty when none.

    Checks what SAW's published errors show it checks: ``IPRVersion`` at
    least :data:`MIN_SAW_IPR_VERSION` (SAW-A40001), ``QCPassFlag == 1`` in
    the nuclear/H&E group (SAW-A40004), and, with ``archive_name``, that the
    archive is ``<QCResultFile>.tar.gz`` (SAW-A40002).
    """
    problems = []
    if _version(record.ipr_version) < _version(MIN_SAW_IPR_VERSION):
        problems.append(f"IPRVersion {record.ipr_version} is older than {MIN_SAW_IPR_VERSION} (SAW-A40001)")
    for name, image in record.images.items():
        if image.calibration is None and not image.qc_passed:
            flag = image.qc_info.get("QCPassFlag")
            problems.append(f'{name}/QCInfo attribute "QCPassFlag" is {flag}, not 1 (SAW-A40004)')
        stem = image.image_info.get("QCResultFile")
        if archive_name is not None and archive_name != f"{stem}.tar.gz":
            problems.append(
                f"the archive is named {archive_name!r} but {name}/ImageInfo/QCResultFile "
                f"asks for '{stem}.tar.gz' (SAW-A40002)"
            )
    return tuple(dict.fromkeys(problems))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text))[:3]) or (0,)
