"""``run_qc(scan_set, settings, cache) -> QCReport``: every metric a scan set needs, judged.

The steps, with the stage names the progress callback receives:

``read``
    Decide the stain; decode the nuclear/H&E plane once when a metric needs
    it (in parallel, ``settings.threads``) and reduce its thumbnail from it;
    stream a thumbnail of every other image (never the full resolution twice).
``track``
    Track-line grid and chip template fit on the nuclear/H&E image, with the
    template chosen from the chip serial.
``clarity``
    The ONNX clarity classifier on the nuclear/H&E image.
``stitching``
    For each image that comes as tiles: FOV-pair registration through the
    pair cache; for the nuclear image, each FOV checked on its own too
    (:func:`qc.live.check_fovs`: track lines, clarity, exposure) through the
    same cache, for the report's ``fov_checks`` and the per-FOV map.
``calibration``
    For DAPI+mIF: each IF image against the nuclear image.
``verdict``
    :mod:`qc.rules` turns the results into pass/fail and reasons.

A problem that stops a metric (an unreadable image, no nuclear image) does
not raise: it becomes a failed verdict with the reason, so the technician
always gets an answer. Programming errors still raise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qc import __version__
from qc.chip import ChipTemplate, parse_chip, template_for
from qc.errors import QCError
from qc.io import Image, ReadLimits, ScanSet
from qc.pictures import take_calibration_crops, take_track_insets, thumb_factor
from qc.report import ImageReport, QCReport
from qc.rules import (
    MetricCheck,
    Thresholds,
    check_calibration,
    check_clarity,
    check_stitching,
    check_track,
    decide,
    metrics_for,
)

if TYPE_CHECKING:  # qc.live imports qc.stitching (and scipy): half a second of imports a grey image never needs
    from qc.live import FovParams

__all__ = [
    "DEFAULT_TEMPLATE",
    "Progress",
    "QCSettings",
    "chip_template",
    "decide_stain",
    "fov_params_for",
    "fused_images",
    "run_qc",
    "write_run_outputs",
]

#: Called with (stage, percent 0-100 of the whole run).
Progress = Callable[[str, float], None]
#: Template assumed when the chip name is not a serial (lenient naming).
DEFAULT_TEMPLATE = "SS2"

_STAGE_SPAN = {
    "read": (0, 8),
    "track": (8, 40),
    "clarity": (40, 60),
    "stitching": (60, 85),
    "calibration": (85, 97),
    "verdict": (97, 100),
}


@dataclass(frozen=True)
class QCSettings:
    """What a QC run needs to know besides the images.

    Parameters
    ----------
    stain : {"auto", "DAPI", "ssDNA", "HE"}
        Stain of the nuclear image; ``auto`` reads RGB as H&E and grey as DAPI.
        A set with IF images is ``DAPI+mIF``.
    thresholds : Thresholds
        Pass criteria (StereoMap's defaults).
    stitching_required : bool
        Let stitching decide the verdict for every stain, not only DAPI+mIF.
    stitching_stage_limit_px : float
        Largest stage error of a tile stitching passes, px; 0 = a third of its
        narrowest overlap (:class:`qc.stitching.StitchingParams`).
    threads : int
        Threads the metrics may use.
    limits : ReadLimits
        Image-size limits of the readers.
    clarity_model : object, optional
        A :class:`qc.clarity.model.ClarityModel` spec; default the shipped model.
    fov_params : FovParams, optional
        The per-FOV checks of tiled images (:mod:`qc.live`); its ``um_per_px`` is the expected
        pixel size, replaced by the image's own when its metadata declares one. Default
        ``FovParams()``.
    site, operator : str
        Recorded in the report.
    """

    stain: str = "auto"
    thresholds: Thresholds = field(default_factory=Thresholds)
    stitching_required: bool = False
    stitching_stage_limit_px: float = 0.0
    threads: int = 2
    limits: ReadLimits = field(default_factory=ReadLimits)
    clarity_model: Any = None
    fov_params: FovParams | None = None
    site: str = ""
    operator: str = ""


def decide_stain(scan_set: ScanSet, setting: str = "auto") -> str:
    """The report's stain: ``DAPI``, ``ssDNA``, ``HE`` or ``DAPI+mIF``."""
    nuclear = scan_set.nuclear
    if nuclear is not None and (nuclear.role == "HE" or nuclear.is_rgb) and setting in ("auto", "HE"):
        return "HE"
    if setting == "HE":
        return "HE"
    if scan_set.if_images:
        return "DAPI+mIF"
    return "DAPI" if setting == "auto" else setting


class _Stages:
    """Reports progress and measures the time spent in each stage (for the report's ``stage_s``)."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._since = time.perf_counter()

    def _switch(self, stage: str | None) -> None:
        t = time.perf_counter()
        if self._current is not None:
            self.seconds[self._current] = self.seconds.get(self._current, 0.0) + (t - self._since)
        self._current, self._since = stage, t

    def durations(self) -> dict[str, float]:
        """Seconds spent in each stage so far (the current one counted up to now), rounded to the millisecond."""
        self._switch(self._current)
        return {k: round(v, 3) for k, v in self.seconds.items()}

    def at(self, stage: str, fraction: float = 0.0) -> None:
        if stage != self._current:
            self._switch(stage)
        if self.progress is None:
            return
        lo, hi = _STAGE_SPAN[stage]
        self.progress(stage, round(lo + (hi - lo) * min(max(fraction, 0.0), 1.0), 1))


def _clarity_of(plane: np.ndarray, rgb: bool, model: Any, model_path: Any, threads: int) -> tuple[Any, Any]:
    """The clarity model (``model``, or loaded from ``model_path``) and its result on ``plane``
    (None for a colour image the model does not take)."""
    from qc.clarity import evaluate_clarity, load_clarity_model

    model = model or load_clarity_model(model_path, threads=threads)
    if rgb and not model.spec.supports_colour:
        return model, None
    return model, evaluate_clarity(plane, model)


def chip_template(chip: str) -> tuple[ChipTemplate, str | None]:
    """The chip's track-line template, and a note when ``chip`` is no serial (then the default template)."""
    serial = parse_chip(chip)
    if serial is None:
        return template_for(DEFAULT_TEMPLATE), f"{chip!r} is not a chip serial; assumed the {DEFAULT_TEMPLATE} template"
    return template_for(serial), None


def _metric_blocks(found: dict[str, Any]) -> dict[str, Any]:
    """Each metric's block of an image report; None for a metric that was not run."""
    return {m: found.get(m) for m in ("track", "clarity", "stitching", "calibration", "fov_checks")}


def _facts(img: Image) -> dict[str, Any]:
    return {
        "name": img.name,
        "role": img.role,
        "format": img.format,
        "width": int(img.width),
        "height": int(img.height),
        "dtype": str(np.dtype(img.dtype)),
        "fov_grid": img.fov_grid,
        "channels": tuple(img.channels),
        "pixel_size_um": img.pixel_size_um,
    }


def run_qc(
    scan_set: ScanSet,
    settings: QCSettings | None = None,
    cache: Any = None,
    *,
    progress: Progress | None = None,
    clarity_model: Any = None,
    clock: Callable[[], float] = time.time,
) -> QCReport:
    """Run every metric the scan set's stain calls for and judge them.

    Parameters
    ----------
    scan_set : ScanSet
        From :func:`qc.io.open_scan_set`.
    settings : QCSettings
    cache : PairCache, optional
        Stitching's FOV-pair cache (the service passes a SQLite-backed one).
    progress : callable, optional
        ``progress(stage, percent)``.
    clarity_model : LoadedClarityModel, optional
        A loaded model (the caller builds the ONNX session at the edge);
        default: load ``settings.clarity_model`` (or the shipped one) here.

    Returns
    -------
    QCReport
        With ``artifacts`` (thumbnails, raw results, the rules' checks and small
        full-resolution crops) for :mod:`qc.pictures`.
    """
    settings = settings or QCSettings()
    started = clock()
    t0 = time.perf_counter()
    st = _Stages(progress)
    st.at("read")
    th = settings.thresholds
    problems: list[str] = []
    checks: list[MetricCheck] = []
    art: dict[str, Any] = {
        "thumbs": {},
        "track": {},
        "clarity": {},
        "stitching": {},
        "calibration": {},
        "tile_sizes": {},
        "passed": {},
        "checks": {},
        "track_insets": {},
        "calibration_crops": {},
        "fov_checks": {},
        "fused_thumbs": {},
        "chip": scan_set.chip,
    }
    blocks: dict[str, dict[str, Any]] = {img.name: {} for img in scan_set.images}
    stain = decide_stain(scan_set, settings.stain)
    art["stain"] = stain
    nuclear = scan_set.nuclear

    tiled = any(img.tiles for img in scan_set.images)
    wanted = metrics_for(stain, tiled=tiled)
    needs_plane = any(m in wanted for m in ("track", "clarity")) or (stain == "DAPI+mIF" and "calibration" in wanted)
    nuclear_plane: np.ndarray | None = None
    plane_problem = ""
    for i, img in enumerate(scan_set.images):
        img.threads = settings.threads
        if img.tiles:  # each tile kept at the thumbnail's scale as read: the stitching picture's fused view
            img.tile_view_factor = thumb_factor(img.width, img.height)
        if img is nuclear and needs_plane:
            # decoded once, first: the thumbnail below is reduced from it rather than decoded again
            try:
                nuclear_plane = nuclear.plane(0)
            except QCError as e:
                plane_problem = f"{nuclear.name}: cannot read the image: {e}"
        try:
            f = thumb_factor(img.width, img.height)
            art["thumbs"][img.name] = (img.downsampled(f), f)
        except QCError as e:
            problems.append(f"{img.name}: cannot read the image: {e}")
        st.at("read", (i + 1) / len(scan_set.images))

    if nuclear is None:
        problems.append(
            f"no nuclear-stain or H&E image in the scan set of {scan_set.chip}; "
            f"QC needs {scan_set.chip}.tif (or .czi, or a tile folder) beside the IF images"
        )
    loaded_model: Any = None  # the clarity model once loaded, for the per-FOV checks too
    if nuclear is not None and nuclear.name in art["thumbs"]:
        art["nuclear"] = nuclear.name
        if plane_problem:
            problems.append(plane_problem)
    else:
        nuclear_plane = None

    # -- clarity, started beside the track fit ----------------------------------
    # The track fit leaves part of a core idle (its threads wait on each other); the clarity windows and
    # their inference fill it: measured on a 37k^2 tile-set plane, track alone 6.5 s, clarity alone 0.75 s,
    # both at once 6.5 s. One extra thread; the plane is only read by both.
    clarity_run: Future[tuple[Any, Any]] | None = None
    clarity_pool: ThreadPoolExecutor | None = None
    if nuclear is not None and nuclear_plane is not None and "clarity" in wanted:
        clarity_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qc-clarity")
        clarity_run = clarity_pool.submit(
            _clarity_of, nuclear_plane, nuclear.is_rgb, clarity_model, settings.clarity_model, settings.threads
        )

    # -- track ----------------------------------------------------------------
    try:
        if nuclear is not None and nuclear_plane is not None and "track" in wanted:
            st.at("track")
            from qc.track import find_track_lines

            template, note = chip_template(scan_set.chip)
            res = find_track_lines(nuclear_plane, template, max_threads=settings.threads)
            art["track"][nuclear.name] = res
            block = res.as_dict()
            chk = check_track(nuclear.name, res, th, chip=scan_set.chip if note is None else "")
            block["passed"] = art["passed"][("track", nuclear.name)] = chk.passed
            art["checks"][("track", nuclear.name)] = chk
            # small full-resolution crops of line crossings for the picture, while the image is open
            art["track_insets"][nuclear.name] = take_track_insets(nuclear_plane, res, *art["thumbs"][nuclear.name])
            if note:
                block["note"] = note
            blocks[nuclear.name]["track"] = block
            checks.append(chk)
            st.at("track", 1.0)
    except BaseException:  # the clarity thread is not waited for
        if clarity_pool is not None:
            clarity_pool.shutdown(wait=False, cancel_futures=True)
        raise

    # -- clarity (its stage time is what it adds after the track fit) ------------
    if nuclear is not None and clarity_run is not None and clarity_pool is not None:
        st.at("clarity")
        from qc.clarity import MAP_LABELS

        try:
            loaded_model, cres = clarity_run.result()
        finally:
            clarity_pool.shutdown()
        if cres is None:
            blocks[nuclear.name]["clarity"] = None
        else:
            art["clarity"][nuclear.name] = cres
            art["clarity_labels"] = MAP_LABELS
            chk = check_clarity(nuclear.name, cres, th)
            art["checks"][("clarity", nuclear.name)] = chk
            block = cres.to_dict()
            block["passed"] = chk.passed
            blocks[nuclear.name]["clarity"] = block
            checks.append(chk)
        st.at("clarity", 1.0)
    if stain != "DAPI+mIF" or "calibration" not in wanted:
        nuclear_plane = None  # calibration below reuses it: the nuclear image is read once

    # -- stitching ------------------------------------------------------------
    tiled_images = [img for img in scan_set.images if img.tiles]
    if tiled_images and "stitching" in wanted:
        from qc.stitching import StitchingParams, evaluate_stitching, fused_preview

        required = stain == "DAPI+mIF" or settings.stitching_required
        for k, img in enumerate(tiled_images):
            st.at("stitching", k / len(tiled_images))  # the per-FOV checks below count as the tile set's stage
            tiles = list(img.tiles or ())
            fovs_cached: int | None = None
            if nuclear is not None and img is nuclear:
                try:
                    fovs_cached = _fov_checks(img, tiles, cache, scan_set.chip, settings, loaded_model, art, blocks)
                except QCError as e:
                    problems.append(f"{img.name}: the per-FOV checks could not run: {e}")

            def on_pairs(done: int, total: int, k: int = k) -> None:
                st.at("stitching", (k + done / max(total, 1)) / len(tiled_images))

            try:
                sres = evaluate_stitching(
                    tiles,
                    cache=cache,
                    max_threads=settings.threads,
                    progress=on_pairs,
                    params=StitchingParams(stage_limit_px=settings.stitching_stage_limit_px),
                )
            except QCError as e:
                problems.append(f"{img.name}: stitching could not run: {e}")
                continue
            art["stitching"][img.name] = sres
            if img.name in art["thumbs"]:
                thumb, f = art["thumbs"][img.name]
                fused = fused_preview(img.tile_views(), sres.registered_positions, f, thumb)
                if fused is not None:
                    art["fused_thumbs"][img.name] = (fused, f)
            art["tile_sizes"][img.name] = {t.name: (t.width, t.height) for t in tiles}
            chk = check_stitching(img.name, sres, th, required=required, layout=_layout_note(img))
            art["passed"][("stitching", img.name)] = chk.passed
            art["checks"][("stitching", img.name)] = chk
            block = {}
            for key, value in sres.summary().items():
                block[key] = value
                if key == "pairs_cached" and fovs_cached is not None:
                    block["fovs_cached"] = fovs_cached
            block.update(passed=chk.passed, required=required, outliers=list(sres.outliers))
            blocks[img.name]["stitching"] = block
            checks.append(chk)

    # -- calibration -----------------------------------------------------------
    if stain == "DAPI+mIF" and nuclear is not None and "calibration" in wanted:
        from qc.calibration import calibrate

        ifs = scan_set.if_images
        reference = nuclear_plane if nuclear_plane is not None else nuclear.plane(0)
        nuclear_plane = None
        reference_views: dict[tuple[int, int, int], np.ndarray] = {}  # the reference reduced once for every IF
        for k, img in enumerate(ifs):
            st.at("calibration", k / max(len(ifs), 1))
            try:
                moving = img.plane(0)
            except QCError as e:
                problems.append(f"{img.name}: cannot read the image: {e}")
                continue
            cal = calibrate(
                reference,
                moving,
                reference_name=nuclear.name,
                moving_name=img.name,
                max_offset_px=th.calibration_offset_px,
                min_similarity=th.calibration_similarity,
                reference_views=reference_views,
            )
            art["calibration"][img.name] = cal
            chk = check_calibration(img.name, cal, th, reference=nuclear.name)
            art["checks"][("calibration", img.name)] = chk
            if nuclear.name in art["thumbs"] and img.name in art["thumbs"]:
                (nt, f), (it, f2) = art["thumbs"][nuclear.name], art["thumbs"][img.name]
                if f == f2:  # full-resolution crops for the picture, while both images are open
                    art["calibration_crops"][img.name] = take_calibration_crops(reference, moving, cal, nt, it, f)
            block = dict(cal.summary())
            block["passed"] = chk.passed
            blocks[img.name]["calibration"] = block
            checks.append(chk)
            del moving
        del reference

    st.at("verdict")
    verdict = decide(checks, problems=tuple(problems))
    images = tuple(ImageReport(**_facts(img), **_metric_blocks(blocks[img.name])) for img in scan_set.images)
    report = QCReport(
        chip=scan_set.chip,
        stain=stain,
        verdict=verdict.verdict,
        reasons=verdict.reasons,
        images=images,
        duration_s=time.perf_counter() - t0,
        software_version=__version__,
        started_at=started,
        operator=settings.operator,
        site=settings.site,
        thresholds={
            k: getattr(th, k)
            for k in ("track", "clarity", "stitching", "calibration_offset_px", "calibration_similarity")
        },
        stage_s=st.durations(),
        checks=tuple(
            {
                "metric": c.metric,
                "image": c.image,
                "value": c.score,
                "threshold": c.threshold,
                "passed": c.passed,
                "required": c.required,
                "reason": c.reason,
                "detail": c.detail,
            }
            for c in verdict.checks
        ),
        artifacts=art,
    )
    st.at("verdict", 1.0)
    return report


def fov_params_for(base: FovParams | None, pixel_size_um: float | None) -> FovParams:
    """The per-FOV check parameters for an image: ``base`` (None: the defaults) with the image's own pixel size
    when its metadata declares a plausible one (live QC and the final QC must agree: the parameters are in the
    cache key)."""
    if base is None:
        from qc.live import FovParams

        base = FovParams()
    if pixel_size_um is not None and 0.05 <= float(pixel_size_um) <= 5.0:
        return replace(base, um_per_px=float(pixel_size_um))
    return base


def _fov_checks(
    img: Image,
    tiles: list[Any],
    cache: Any,
    chip: str,
    settings: QCSettings,
    model: Any,
    art: dict[str, Any],
    blocks: dict[str, dict[str, Any]],
) -> int:
    """Each FOV of a tiled nuclear image checked on its own through the cache; returns how many came from it."""
    from qc.live import check_fovs, fov_summary

    params = fov_params_for(settings.fov_params, img.pixel_size_um)
    if model is not None and img.is_rgb and not model.spec.supports_colour:
        model = None
    cached = 0

    def count(_check: Any, hit: bool) -> None:
        nonlocal cached
        cached += int(hit)

    t0 = time.perf_counter()
    checks = check_fovs(
        tiles,
        cache=cache,
        template=chip_template(chip)[0],
        params=params,
        clarity_model=model,
        on_result=count,
        threads=settings.threads,
    )
    block = fov_summary(checks, cached=cached)
    block["seconds"] = round(time.perf_counter() - t0, 3)
    block["um_per_px"] = params.um_per_px
    blocks[img.name]["fov_checks"] = block
    art["fov_checks"][img.name] = (checks, img.fov_grid)
    return cached


def _layout_note(img: Any) -> str:
    """Where a tiled image's nominal tile positions came from, and what changes them (for the stitching advice)."""
    source = getattr(img, "position_source", None)
    ov = getattr(img, "overlap", None)
    used = f"{ov[0]:.0%} x {ov[1]:.0%}" if ov and abs(ov[0] - ov[1]) > 1e-9 else (f"{ov[0]:.0%}" if ov else "")
    option = "the watch root's tile_overlap, or imageqc qc --tile-overlap"
    if source == "TileConfiguration":
        return "positions from the folder's TileConfiguration.txt"
    if source == "metadata overlap":
        return f"used {used}, from the microscope's metadata in the folder, which overrides tile_overlap"
    if source == "default overlap":
        return f"used {used}, the default, as nothing gave one; set {option}"
    if source == "given overlap":
        return f"used {used}, from {option}"
    return "positions from the stage coordinates in the file"


def write_run_outputs(
    report: QCReport,
    out_dir: Any,
    *,
    pictures: bool = True,
    archive: bool = True,
    scan_set: ScanSet | None = None,
    include_images: bool = True,
    threads: int = 2,
    level: int = 0,
    fused_image: bool = False,
    on_verdict: Callable[[Any], object] | None = None,
) -> Any:
    """Write report.json, SAW's IPR, the pictures and each tiled image's
    registered Fiji tile configuration (and, with ``fused_image``, its
    stitched image); then the archive SAW takes.

    Parameters
    ----------
    report : QCReport
        From :func:`run_qc` (with its artifacts).
    out_dir : path
    pictures, archive : bool
    scan_set : ScanSet, optional
        The scan set QC ran on: its facts go into the IPR and, with
        ``include_images``, its images into the archive (SAW needs them).
    include_images : bool
    threads : int
        Compression threads.
    level : int
        The archive's gzip level, 0 (stored, as fast as a copy) to 3.
    fused_image : bool
        Also write each tiled image of ``scan_set`` fused at the positions
        stitching registered (nominal where stitching did not run) as
        ``<group>_fov_stitched.tif``, a tiled pyramidal OME-TIFF
        (:func:`fused_images`); the report's ``outputs`` lists them.
    on_verdict : callable, optional
        Called with the :class:`qc.report.OutputPaths` written so far once the
        report and pictures are in place, before the fused images, the IPR,
        the archive and any image converted for it (see
        :func:`qc.report.write_outputs`).

    Returns :class:`qc.report.OutputPaths`.
    """
    import shutil
    import tempfile

    from qc.ipr import write_ipr
    from qc.pictures import pictures_for_run, safe_name
    from qc.report import _writer_tag, write_outputs
    from qc.saw_archive import as_tiff, image_members, needs_tiff, walk

    extra = {}
    stitched = report.artifacts.get("stitching", {})
    if stitched:  # qc.stitching imports scipy: only when there is something to write
        from qc.stitching import tile_configuration_text

        extra = {
            f"stitching/{safe_name(name)}/TileConfiguration.registered.txt": tile_configuration_text(res)
            for name, res in stitched.items()
        }
    draw = pictures_for_run if pictures else None
    writers: dict[str, Callable[[Path], object]] = {}
    if fused_image and scan_set is not None:
        listed, writers = fused_images(report, scan_set, threads=threads)
        if listed:
            report = replace(report, outputs={**report.outputs, "fused_images": listed})

    def ipr(path: Path, qc_result_file: str) -> None:
        write_ipr(report, scan_set, path, qc_result_file=qc_result_file)

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    scratch: list[Path] = []

    def images() -> list[tuple[Path, str]]:
        """The archive's image members, converting to TIFF what SAW cannot read as it is (after the verdict)."""
        files: list[tuple[Path, str]] = []
        if include_images and scan_set is not None:
            converted = {}
            for img in scan_set.images:
                if needs_tiff(img):
                    if not scratch:
                        scratch.append(
                            Path(tempfile.mkdtemp(prefix=f".imageqc-tiff.partial-{_writer_tag()}.", dir=out_dir))
                        )
                    converted[img.name] = as_tiff(img, scratch[0])
            for member in image_members(scan_set, report.stain, converted=converted):
                files.extend(walk(member))
        return files

    try:
        return write_outputs(
            report,
            out_dir,
            pictures=draw,
            extra_files=extra,
            files=writers,
            images=images,
            archive=archive,
            ipr=ipr,
            threads=threads,
            level=level,
            on_verdict=on_verdict,
        )
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


def fused_images(
    report: QCReport, scan_set: ScanSet, *, threads: int = 2, blend: str = "linear"
) -> tuple[list[dict[str, str]], dict[str, Callable[[Path], object]]]:
    """The stitched image of each tiled image of a QC run: its entry in the report's ``outputs`` and its writer.

    Each is named as SAW names a stitched image of FOVs, ``<group>_fov_stitched.tif``
    (``DAPI``, ``ssDNA``, ``HE`` or ``<name>_IF``, the image's IPR group): a tiled, pyramidal
    OME-TIFF (:func:`qc.stitching.fuse_tiles`) at the positions stitching registered for it in
    ``report`` (``registered``), or the nominal ones where stitching did not run (``nominal``).

    Returns
    -------
    (list of dict, dict)
        The entries (``image``, ``file``, ``positions``, ``blend``) and file name -> ``writer(path)``.
    """
    from qc.filenames import fit_name
    from qc.ipr import ipr_group_name

    facts = {im.name: im for im in report.images}
    stitched = report.artifacts.get("stitching", {})
    listed: list[dict[str, str]] = []
    writers: dict[str, Callable[[Path], object]] = {}
    for img in scan_set.images:
        if not img.tiles or img.name not in facts:
            continue
        name = fit_name(f"{ipr_group_name(report.chip, facts[img.name], report.stain)}_fov_stitched", ".tif")
        result = stitched.get(img.name)
        positions = None if result is None else result.registered_positions

        def write(
            path: Path, tiles: Any = tuple(img.tiles), positions: Any = positions, px: Any = img.pixel_size_um
        ) -> object:
            from qc.stitching import fuse_tiles

            return fuse_tiles(tiles, path, positions=positions, blend=blend, threads=threads, pixel_size_um=px)

        writers[name] = write
        listed.append(
            {
                "image": img.name,
                "file": name,
                "positions": "nominal" if result is None else "registered",
                "blend": blend,
            }
        )
    return listed, writers
