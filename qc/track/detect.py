"""Track-line detection and chip-template fit.

:func:`find_track_lines` finds a Stereo-seq chip's track-line grid in a
nuclear-stain (DAPI, ssDNA) or H&E image and fits the chip's template: the
grid angle, the scale in x and y, the origin, and which template lines were
found. Geometry conventions (image axes, angle sign, origin, scale) are those
of :mod:`qc.track.grid`; in short: ``x`` right, ``y`` down, ``[x, y] = origin +
R(angle) @ [sx * u, sy * v]`` with chip ``(u, v)`` in DNB, positive angles
clockwise on screen, origin at the crossing of two index-0 lines nearest the
image's top-left corner.

How it works
    1. Coarse: line evidence is computed at full resolution, strip by strip,
       as the morphological top-hat (closing minus image for dark lines,
       image minus opening for bright ones) with a square a little wider than
       the widest expected line; only features thinner than that survive, so
       FOV brightness steps, vignetting, the surface's mottle, saturated
       tissue and debris give nothing. The evidence, not the image, is
       area-mean reduced (to about 2048 px across), so a 3 px line a few grey
       levels deep stays visible at any reduction factor (averaging the plain
       image dilutes it below the FOV seams of a 20,000 px chip). What broad
       structure is left is removed by a top-hat at the coarse scale; the
       result is contrast-normalised. The grid angle is among the strongest
       rays of the whitened power spectrum; for each candidate ray the image
       is de-rotated and averaged along each axis, the dips of each profile
       are matched to the template's line spacing (scale and phase per axis)
       from hypotheses made by pairs of nearby dips, grown by least squares,
       and the candidate whose fit explains the dips best wins. With
       ``polarity="auto"`` both polarities are searched from the same read
       and the better-fitting one is kept (lines are usually dark; in H&E or
       inverted images they can be lighter than their surroundings).
    2. Fine: windows around up to ``max_windows`` predicted line crossings,
       spread over the image, are read at full resolution (small reads, so
       memory maps are never copied); in each, both lines are located to
       sub-pixel precision in a de-rotated strip, and the grid is refitted to
       all of them by robust least squares, twice (the second time searching
       only close to the first fit).

Score (0-100)
    ``score = 100 * sqrt(template_recall * area_share)``, where

    * ``template_recall`` is the share of the template lines crossing the
      image (those with at least one sampled crossing) that have at least one
      full-resolution measurement agreeing with the final fit, and
    * ``area_share`` is the share of the image, in an ``cells x cells`` grid
      of cells holding sampled crossings, whose cell has at least a third of
      its line measurements agreeing with the final fit.

    A measurement agrees when its dip stands ``min_snr`` times above the
    window's noise and lies within ``agree_px`` of the fitted line. A score
    of :data:`PASS_SCORE` (60) or more means the template was found reliably
    enough for automatic registration: e.g. every line confirmed and 36% of
    the area agreeing, or 60% of both. No grid, a template that does not
    match (wrong chip type), lines washed out by blur, or lines visible only
    in a small part of the chip all score below 60; :attr:`TrackResult.problem`
    then says which, in words.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from qc.chip import ChipSerial, ChipTemplate, template_for
from qc.track import coarse, fine
from qc.track.grid import GridLines, GridModel

__all__ = ["PASS_SCORE", "TrackResult", "find_track_lines"]

#: Score at or above which the template fit counts as reliable (StereoMap's criterion).
PASS_SCORE = 60.0
_COARSE_SIZE = 2048
#: Below this share of predicted line positions with a dip at full resolution,
#: a failed fit means there is no grid rather than a wrong template or blur.
_NO_GRID_LOCATED = 0.05
#: With ``polarity="auto"``, a fit scoring this much is kept without trying the other polarity.
_SURE_SCORE = 90.0


@dataclass(frozen=True)
class TrackResult:
    """Result of :func:`find_track_lines`.

    Attributes
    ----------
    score : float
        0-100, see the module docstring; 0 when no grid was found.
    angle_deg, scale, origin_px :
        The fitted grid (:mod:`qc.track.grid` conventions): degrees within about +-45,
        image px per DNB ``(sx, sy)``, image px ``(x, y)``. NaN when not found.
    template : str
        Template name used (``"SS2"``...).
    template_recall : float
        Share (0-1) of the template lines crossing the image that were confirmed.
    area_share : float
        Share (0-1) of the image area whose crossings agree with the fit.
    lines_x, lines_y : tuple of int
        Indices of the confirmed x-family (near-vertical) and y-family lines;
        index 0 passes through ``origin_px``, index ``k`` is template line
        ``k mod 9`` of period ``k // 9``.
    expected_lines : (int, int)
        Lines of each family crossing the image (with a sampled crossing).
    crossings_sampled : int
        Crossings measured at full resolution.
    measurements_found, measurements_agreeing : int
        Line positions (two per crossing) located with enough contrast, and
        of those, how many agree with the final fit.
    residual_px : float
        RMS distance of the agreeing measurements from the fitted lines.
    line_width_px : float
        Median full width at half depth of the measured lines, px.
    dips_found : (int, int)
        Line-like dips found in the coarse x and y profiles.
    dips_explained : (int, int)
        Of those, how many the template accounts for.
    problem : str
        Empty when the score passes; otherwise a short reason, e.g. ``"no
        line grid found"``, ``"grid found but spacing does not match the SS2
        template"``, ``"lines found in only 20% of the chip area"``.
    image_size : (int, int)
        ``(width, height)`` of the analysed image.
    downsample : int
        Reduction factor of the coarse search.
    polarity : str
        ``"dark"`` or ``"bright"``: the line contrast the result was found with.
    crossings : ndarray, shape (n, 4)
        Track-line crossings measured at full resolution where both lines
        agree with the fit: ``x, y`` (image px, the intersection of the two
        measured lines) and the x- and y-family line indices (as ``lines_x``,
        ``lines_y``; template line ``k mod 9``). Empty when not found.
    """

    score: float
    angle_deg: float
    scale: tuple[float, float]
    origin_px: tuple[float, float]
    template: str
    template_recall: float
    area_share: float
    lines_x: tuple[int, ...] = field(repr=False)
    lines_y: tuple[int, ...] = field(repr=False)
    expected_lines: tuple[int, int]
    crossings_sampled: int
    measurements_found: int
    measurements_agreeing: int
    residual_px: float
    line_width_px: float
    dips_found: tuple[int, int]
    dips_explained: tuple[int, int]
    problem: str
    image_size: tuple[int, int]
    downsample: int
    polarity: str = "dark"
    crossings: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)), repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """``score >= PASS_SCORE``."""
        return self.score >= PASS_SCORE

    @property
    def found(self) -> bool:
        """Whether a grid was fitted at all."""
        return math.isfinite(self.angle_deg)

    @property
    def grid(self) -> GridModel | None:
        """The fitted grid, or ``None`` when none was found."""
        if not self.found:
            return None
        return GridModel(template_for(self.template), self.angle_deg, self.scale, self.origin_px)

    def grid_lines(self, width: int | None = None, height: int | None = None) -> GridLines:
        """Segments of all fitted template lines crossing the image, for drawing.

        ``width``/``height`` default to the analysed image's (pass others to
        draw on a thumbnail after scaling the result). Empty when not found.
        """
        w = self.image_size[0] if width is None else width
        h = self.image_size[1] if height is None else height
        g = self.grid
        if g is None:
            return GridLines(np.zeros((0, 4)), np.zeros(0, np.int8), np.zeros(0, np.int64))
        return g.grid_lines(w, h)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary (the report's ``track`` object plus diagnostics)."""

        def num(v: float, nd: int = 4) -> float | None:
            return round(float(v), nd) if math.isfinite(v) else None

        return {
            "score": round(self.score, 1),
            "passed": self.passed,
            "angle_deg": num(self.angle_deg),
            "scale": [num(self.scale[0], 6), num(self.scale[1], 6)],
            "origin_px": [num(self.origin_px[0], 2), num(self.origin_px[1], 2)],
            "template_recall": round(self.template_recall, 4),
            "area_share": round(self.area_share, 4),
            "template": self.template,
            "polarity": self.polarity,
            "downsample": self.downsample,
            "lines_matched": [len(self.lines_x), len(self.lines_y)],
            "lines_expected": list(self.expected_lines),
            "crossings_sampled": self.crossings_sampled,
            "measurements_found": self.measurements_found,
            "measurements_agreeing": self.measurements_agreeing,
            "residual_px": num(self.residual_px, 3),
            "line_width_px": num(self.line_width_px, 2),
            "dips_found": list(self.dips_found),
            "problem": self.problem,
        }


@contextmanager
def _cv2_threads(n: int) -> Iterator[None]:
    old = cv2.getNumThreads()
    cv2.setNumThreads(max(1, int(n)))
    try:
        yield
    finally:
        cv2.setNumThreads(old)


def _check_image(image: np.ndarray) -> tuple[int, int]:
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (3, 4)):
        msg = f"image must be a 2-D grey array or H x W x 3 RGB, got shape {shape}"
        raise ValueError(msg)
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < 64:
        msg = f"image is too small for track-line detection ({w} x {h} px; need at least 64 x 64)"
        raise ValueError(msg)
    dt = np.dtype(image.dtype)
    if dt.kind not in "uif":
        msg = f"image dtype must be integer or float, got {dt}"
        raise ValueError(msg)
    return h, w


def find_track_lines(
    image: np.ndarray,
    template: ChipTemplate | ChipSerial | str,
    *,
    downsample: int | None = None,
    max_threads: int = 2,
    scale_range: tuple[float, float] = (0.4, 2.8),
    polarity: str = "auto",
    max_windows: int = 800,
    min_snr: float = 4.0,
    agree_px: float | None = None,
    cells: int = 8,
) -> TrackResult:
    """Find the track-line grid and fit the chip template.

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, 3)
        Grey (uint8, uint16 or float) or RGB (H&E) image; a ``np.memmap`` (or
        any array that supports slicing) is read in strips and small windows
        only, never copied whole.
    template : ChipTemplate, ChipSerial or str
        The chip's template, or a serial / template name to look it up.
    downsample : int, optional
        Reduction factor of the coarse search; default makes the long side
        about 2048 px.
    max_threads : int
        Threads used to read and reduce the image, and OpenCV's thread count
        during the call (restored afterwards).
    scale_range : (float, float)
        Accepted scales, image px per DNB (10x is about 1, 20x about 2).
    polarity : {"auto", "dark", "bright"}
        Whether track lines are darker (usual) or brighter than their
        surroundings; ``"auto"`` (default) searches both and keeps the one
        that fits the template better (:attr:`TrackResult.polarity`).
    max_windows : int
        Most crossings measured at full resolution.
    min_snr : float
        Dip depth over window noise needed to count a line as located.
    agree_px : float, optional
        Largest distance from the fit for a measurement to agree; default
        ``max(2, mean scale)`` px (1 DNB at 20x).
    cells : int
        The image is cut into ``cells x cells`` cells for ``area_share``.

    Returns
    -------
    TrackResult
    """
    h, w = _check_image(image)
    tmpl = template if isinstance(template, ChipTemplate) else template_for(template)
    if polarity not in ("auto", "dark", "bright"):
        msg = f"polarity must be 'auto', 'dark' or 'bright', got {polarity!r}"
        raise ValueError(msg)
    if not 0 < scale_range[0] < scale_range[1]:
        msg = f"scale_range must be (low, high) with 0 < low < high, got {scale_range!r}"
        raise ValueError(msg)
    if max_windows < 4 or cells < 1:
        msg = f"max_windows must be >= 4 and cells >= 1, got {max_windows} and {cells}"
        raise ValueError(msg)
    f = int(downsample) if downsample else max(1, math.ceil(max(h, w) / _COARSE_SIZE))
    kernel = coarse.line_kernel(scale_range[1])
    opts = dict(max_windows=max_windows, min_snr=min_snr, agree_px=agree_px, cells=cells, threads=max_threads)
    pols = ("dark", "bright") if polarity == "auto" else (polarity,)
    base = dict(template=tmpl.name, image_size=(w, h), downsample=f)
    with _cv2_threads(max_threads):
        # one read of the image gives the evidence of every polarity tried
        ev = coarse.reduce_lines(image, f, kernel=kernel, polarities=pols, threads=max_threads)
        bins = coarse.spectrum_bins(*next(iter(ev.values())).shape)  # the polarities' evidence shares a shape
        found = []
        for pol in pols:
            found.append(_coarse(ev.pop(pol), pol, tmpl, f, kernel, scale_range, bins))  # frees each evidence
        found.sort(key=lambda c: -c.total)
        best = found[0]
        if best.fits is None:
            # no thin lines: lines blurred broader than the kernel remain in the plain image
            mean = coarse.reduce_lines(image, f, kernel=kernel, polarities=("mean",), threads=max_threads)["mean"]
            broad = [
                _coarse(mean * (1.0 if pol == "dark" else -1.0), pol, tmpl, f, 0, scale_range, bins) for pol in pols
            ]
            broad.sort(key=lambda c: -c.total)
            if broad[0].fits is None:
                return _empty(dict(base, **best.facts()), "no line grid found")
            return _fine(image, broad[0], tmpl, f, base, opts)
        result = _fine(image, best, tmpl, f, base, opts)
        # the other polarity, when its coarse fit is close: lines lighter than
        # their surroundings (H&E, inverted contrast) still leave a weaker dark fit
        for other in found[1:]:
            if result.score >= _SURE_SCORE or other.fits is None or other.total < 0.5 * best.total:
                continue
            alt = _fine(image, other, tmpl, f, base, opts)
            if alt.score > result.score:
                result = alt
    return result


@dataclass(frozen=True)
class _Coarse:
    """The coarse search's outcome for one polarity."""

    polarity: str
    total: float  # summed template-fit score of both axes; -1 when either failed
    dips: tuple[coarse.Dips, coarse.Dips]
    fits: tuple[coarse.AxisFit, coarse.AxisFit] | None
    mat: np.ndarray

    def facts(self) -> dict[str, Any]:
        return dict(dips_found=(self.dips[0].pos.size, self.dips[1].pos.size), polarity=self.polarity)


def _coarse(
    evidence: np.ndarray, polarity: str, tmpl: ChipTemplate, f: int, kernel: int, scale_range: tuple[float, float],
    bins: coarse.SpectrumBins | None = None,
) -> _Coarse:  # fmt: skip
    """Angle and per-axis template fit on the reduced line evidence of one polarity.

    ``kernel=0``: ``evidence`` is a reduced image whose lines are dark dips already. ``bins``: the
    spectrum's bins for the evidence's shape (shared by the polarities).
    """
    n, valid = coarse.normalise(coarse.line_dips(evidence, f, kernel) if kernel else evidence)
    srange = (scale_range[0] / f, scale_range[1] / f)
    # the spectrum's strongest ray is almost always the grid; when other
    # directions compete (FOV seams, tissue edges) the template decides
    cands = coarse.estimate_angle(n, bins=bins)
    best: _Coarse | None = None
    for k, (angle, prominence) in enumerate(cands):
        if k and prominence < 0.3 * cands[0][1]:
            continue
        px, cx, py, cy, mat = coarse.profiles(n, valid, angle)
        dips = (coarse.find_dips(px, cx), coarse.find_dips(py, cy))
        fx, fy = (coarse.fit_axis(d, tmpl, srange) for d in dips)
        fits = (fx, fy) if fx is not None and fy is not None else None
        total = fx.score + fy.score if fx is not None and fy is not None else -1.0
        if best is None or total > best.total:
            best = _Coarse(polarity, total, dips, fits, mat)
    assert best is not None
    return best


def _fine(
    image: np.ndarray, c: _Coarse, tmpl: ChipTemplate, f: int, base: dict[str, Any], opts: dict[str, Any]
) -> TrackResult:
    """The full-resolution fit and score from a coarse fit."""
    assert c.fits is not None
    fx, fy = c.fits
    grid0 = _coarse_grid(tmpl, fx, fy, c.mat, f)
    sign = 1.0 if c.polarity == "dark" else -1.0
    return _refine(
        image, grid0, dict(base, **c.facts()), (fx.explained, fy.explained), sign,
        opts["max_windows"], opts["min_snr"], opts["agree_px"], opts["cells"], f, opts["threads"],
    )  # fmt: skip


def _empty(base: dict[str, Any], problem: str) -> TrackResult:
    nan = math.nan
    base = dict(base)
    return TrackResult(
        score=0.0, angle_deg=nan, scale=(nan, nan), origin_px=(nan, nan), template_recall=0.0, area_share=0.0,
        lines_x=(), lines_y=(), expected_lines=(0, 0), crossings_sampled=0, measurements_found=0,
        measurements_agreeing=0, residual_px=nan, line_width_px=nan, dips_explained=base.pop("dips_explained", (0, 0)),
        problem=problem, **base,
    )  # fmt: skip


def _coarse_grid(tmpl: ChipTemplate, fx: coarse.AxisFit, fy: coarse.AxisFit, mat: np.ndarray, f: int) -> GridModel:
    """Grid in full-resolution pixels from the per-axis fits in the de-rotated coarse frame."""
    inv = cv2.invertAffineTransform(mat)

    def to_full(xr: float, yr: float) -> np.ndarray:
        c = inv @ np.array([xr, yr, 1.0])
        result: np.ndarray = f * c + (f - 1) / 2.0
        return result

    o = to_full(fx.phase, fy.phase)
    ex = (to_full(fx.phase + fx.scale * 1000.0, fy.phase) - o) / 1000.0
    ey = (to_full(fx.phase, fy.phase + fy.scale * 1000.0) - o) / 1000.0
    angle = math.degrees(math.atan2(ex[1], ex[0]))
    return GridModel(tmpl, angle, (float(np.hypot(*ex)), float(np.hypot(*ey))), (float(o[0]), float(o[1])))


def _refine(
    image: np.ndarray, grid0: GridModel, base: dict[str, Any], explained: tuple[int, int], sign: float,
    max_windows: int, min_snr: float, agree_px: float | None, cells: int, f: int, threads: int = 1,
) -> TrackResult:  # fmt: skip
    h, w = image.shape[:2]
    tmpl = grid0.template
    s_min = min(grid0.scale)
    # across a line: stay clear of the next parallel line; along it: average more
    half = int(np.clip(0.42 * min(tmpl.offsets) * s_min, 16, 128))
    along = int(np.clip(2.5 * half, 48, 256))
    tol = float(agree_px) if agree_px else max(2.0, float(np.mean(grid0.scale)))
    base = dict(base, dips_explained=explained)
    kx, ky, centres = fine.sample_crossings(grid0, w, h, fine.window_reach(half, along), max_windows)
    if len(centres) < 4:
        return _empty(base, "grid found but too few line crossings inside the image to check it")
    search = min(0.6 * half, 3.0 + 2.0 * f)
    meas = fine.measure(
        image,
        grid0,
        kx,
        ky,
        centres,
        half=half,
        along=along,
        search=search,
        min_snr=min_snr,
        polarity=sign,
        threads=threads,
    )
    fit = fine.fit_grid(meas, grid0, inlier_px=tol)
    if fit is None:
        return _empty(base, _no_fit_problem(meas, base, tmpl))
    # second pass: re-measure around the refined prediction with a tight search
    pred = fit.grid.chip_to_image(fit.grid.line_positions(kx), fit.grid.line_positions(ky))
    meas2 = fine.measure(
        image,
        fit.grid,
        kx,
        ky,
        pred,
        half=half,
        along=along,
        search=tol + 2.0,
        min_snr=min_snr,
        polarity=sign,
        threads=threads,
    )
    fit2 = fine.fit_grid(meas2, fit.grid, inlier_px=tol)
    if fit2 is not None:
        meas, fit = meas2, fit2
    return _score(fit, meas, base, cells, w, h, tol)


def _mismatch(base: dict[str, Any]) -> bool:
    """Most line-like dips of the coarse profiles are not where the template puts lines."""
    dips, expl = base["dips_found"], base["dips_explained"]
    return bool(dips[0] + dips[1] >= 6 and expl[0] + expl[1] < 0.6 * (dips[0] + dips[1]))


def _no_fit_problem(meas: fine.Measurements, base: dict[str, Any], tmpl: ChipTemplate) -> str:
    if meas.found.mean() < _NO_GRID_LOCATED:
        return "no line grid found"
    if _mismatch(base):
        return f"grid found but spacing does not match the {tmpl.name} template"
    if meas.found.mean() < 0.3:
        return "track lines too faint or blurred to locate at full resolution"
    return f"grid found but spacing does not match the {tmpl.name} template"


def _score(
    fit: fine.GridFit, meas: fine.Measurements, base: dict[str, Any], cells: int, w: int, h: int, tol: float
) -> TrackResult:
    grid = fit.grid.canonical()
    mshift, nshift = fit.grid.period_shift(grid)
    n9 = len(grid.template.offsets)
    index = meas.index - np.where(meas.axis == 0, mshift, nshift) * n9
    agree = fit.inlier
    # template recall over the lines that were sampled
    lines: dict[tuple[int, int], bool] = {}
    for ax, k, ok in zip(meas.axis, index, agree, strict=False):
        lines[(int(ax), int(k))] = lines.get((int(ax), int(k)), False) or bool(ok)
    recall = sum(lines.values()) / max(len(lines), 1)
    # area share over cells holding sampled crossings
    cxi = np.clip((meas.centre[:, 0] / w * cells).astype(int), 0, cells - 1)
    cyi = np.clip((meas.centre[:, 1] / h * cells).astype(int), 0, cells - 1)
    cell = cyi * cells + cxi
    tot = np.bincount(cell, minlength=cells * cells)
    good = np.bincount(cell, weights=agree.astype(float), minlength=cells * cells)
    has = tot > 0
    ok_cells = has & (good >= np.maximum(1, tot / 3.0))
    area = float(ok_cells.sum() / max(has.sum(), 1))
    score = 100.0 * math.sqrt(recall * area)
    res = fit.residual[agree]
    rms = float(np.sqrt(np.mean(res**2))) if res.size else math.nan
    widths = meas.width[meas.found & np.isfinite(meas.width)]
    crossings = _crossings(meas, agree, index, grid.angle_deg)
    lx = tuple(sorted(k for (ax, k), ok in lines.items() if ax == 0 and ok))
    ly = tuple(sorted(k for (ax, k), ok in lines.items() if ax == 1 and ok))
    expected = (sum(1 for ax, _ in lines if ax == 0), sum(1 for ax, _ in lines if ax == 1))
    problem = ""
    if score < PASS_SCORE:
        # lines visible in part of the chip leave some cells fully agreeing;
        # blur or faint lines leave every cell weak
        frac = good[ok_cells] / tot[ok_cells]
        located = float(meas.found.mean()) if meas.found.size else 0.0
        if recall < 0.6 and located < _NO_GRID_LOCATED:
            # the coarse fit was a coincidence of a few features: almost no
            # line is there at full resolution where it predicted one
            problem = "no line grid found"
        elif recall < 0.6 and _mismatch(base):
            problem = f"grid found but spacing does not match the {grid.template.name} template"
        elif area < 0.6 and frac.size and np.median(frac) >= 0.6:
            problem = f"lines found in only {area:.0%} of the chip area"
        elif area < 0.6:
            problem = "track lines too faint or blurred to locate at full resolution"
        else:
            problem = f"only {recall:.0%} of the {grid.template.name} template lines confirmed"
    return TrackResult(
        score=score, angle_deg=grid.angle_deg, scale=grid.scale, origin_px=grid.origin_px,
        template_recall=recall, area_share=area, lines_x=lx, lines_y=ly, expected_lines=expected,
        crossings_sampled=int(len(meas.axis) // 2), measurements_found=int(meas.found.sum()),
        measurements_agreeing=int(agree.sum()), residual_px=rms,
        line_width_px=float(np.median(widths)) if widths.size else math.nan, problem=problem,
        crossings=crossings, **base,
    )  # fmt: skip


def _crossings(meas: fine.Measurements, agree: np.ndarray, index: np.ndarray, angle_deg: float) -> np.ndarray:
    """Crossings whose two measurements (rows 2t and 2t+1) both agree: intersection and line indices."""
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    both = agree[0::2] & agree[1::2]
    p1, p2 = meas.point[0::2][both], meas.point[1::2][both]  # on the x-family / y-family line
    # p1 + t (-sin a, cos a) = p2 + s (cos a, sin a): project p2 - p1 on the x-family normal
    d = p2 - p1
    t = -d[:, 0] * sa + d[:, 1] * ca
    x = p1[:, 0] - t * sa
    y = p1[:, 1] + t * ca
    return np.column_stack([x, y, index[0::2][both], index[1::2][both]]).astype(np.float64)
