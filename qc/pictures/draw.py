"""Pictures that stand on their own: what was measured, against what, and what each colour means.

Every picture has a header band above the image (the verdict word in its
colour, the metric's value against its threshold, chip, stain and image) and
a legend band below it naming every colour drawn (:mod:`qc.pictures.parts`);
no text is written over an image. Pictures are drawn on thumbnails (longest
side about :data:`THUMB_SIDE` px) with OpenCV and written as PNG, except the
full-resolution crops, which the pipeline takes while the image is open
(:func:`take_track_insets`, :func:`take_calibration_crops`) and which are
shown 1:1:

- ``<image>_track.png``: the fitted track-line grid drawn see-through over
  the image, with ticks in a frame around it, the origin circled, and four
  full-resolution insets of line crossings (one per quadrant, away from
  tissue where possible) with the fitted lines ticked at their edges and the
  measured crossing ringed;
- ``<image>_clarity.png``: each evaluated window tinted by its class;
- ``<image>_stitching.png``: each field of view outlined at its registered
  position in the colour of its part in the stitching criterion;
- ``<image>_fovs.png`` (:mod:`qc.pictures.fovs`): the grid of fields of view of a tiled image,
  each coloured by its own checks (clarity, track lines found or not, over-exposed);
- ``<IF>_calibration.png``: full-resolution crops of a region with
  features, DAPI green and IF magenta, before and after undoing the found
  offset, and the offset against the limit (a circle of that radius);
- ``<chip>_summary.png`` (:mod:`qc.pictures.summary`): one sheet per run, about 1600 px
  wide: the verdict, every metric of every image with value, threshold and
  result, the reasons, and small versions of the pictures (what a
  notification attaches).

An image name too long for these file names is shortened with a hash
(:func:`qc.filenames.fit_name`); the picture's title keeps the full name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qc.filenames import fit_name
from qc.pictures.fovs import draw_fov_map
from qc.pictures.parts import (
    BGR,
    INK,
    PAPER,
    Legend,
    Picture,
    compose,
    header_band,
    judgement,
    number,
    side_by_side,
    stack,
    text_block,
)
from qc.pictures.summary import draw_summary

__all__ = [
    "CALIBRATION_CROP_PX",
    "INSET_PX",
    "THUMB_SIDE",
    "draw_calibration",
    "draw_clarity",
    "draw_stitching",
    "draw_track",
    "pictures_for_run",
    "pictures_from_artifacts",
    "safe_name",
    "take_calibration_crops",
    "take_track_insets",
    "thumb_factor",
    "to_display",
    "write_png",
]

THUMB_SIDE = 1024
#: Side of a track inset, full-resolution px.
INSET_PX = 160
#: Side of a calibration crop, full-resolution px.
CALIBRATION_CROP_PX = 256
#: zlib level of the PNGs.
PNG_LEVEL = 1
#: Dark frame around an image, where ticks are drawn (px).
FRAME_PX = 16
FRAME_BG: BGR = (45, 45, 45)

GREEN: BGR = (60, 200, 60)
RED: BGR = (40, 40, 230)
AMBER: BGR = (0, 190, 255)
GREY: BGR = (150, 150, 150)
LINE_C: BGR = (255, 255, 0)  # cyan: fitted track lines
ORIGIN_C: BGR = (0, 120, 255)  # orange
INSET_C: BGR = (255, 0, 255)  # magenta: regions shown at full resolution
MEASURED_C: BGR = (255, 140, 0)  # azure: measured crossings
DAPI_C: BGR = (0, 255, 0)
IF_C: BGR = (255, 0, 255)
LIMIT_C: BGR = (0, 190, 255)
OFFSET_C: BGR = (200, 60, 0)  # blue
CROP_C: BGR = (0, 255, 255)  # yellow
#: BGR tints per clarity class.
CLARITY_COLOURS = {
    "background": None,
    "good": (80, 200, 80),
    "mild_blur": (0, 200, 255),
    "severe_blur": (0, 0, 230),
    "mild_overexposure": (255, 200, 0),
    "severe_overexposure": (255, 0, 200),
}
_QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def thumb_factor(width: int, height: int, side: int = THUMB_SIDE) -> int:
    """Smallest integer reduction that brings the longest side to ``side`` or less."""
    return max(1, math.ceil(max(width, height) / side))


def to_display(img: np.ndarray) -> np.ndarray:
    """Any grey/RGB image -> 8-bit BGR, contrast stretched on robust percentiles."""
    arr = np.asarray(img)
    sample = arr[:: max(1, arr.shape[0] // 512), :: max(1, arr.shape[1] // 512)]
    lo, hi = np.percentile(sample, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1
    out = np.clip((arr.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    result: np.ndarray = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR if out.ndim == 2 else cv2.COLOR_RGB2BGR)
    return result


def _grey(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(to_display(img), cv2.COLOR_BGR2GRAY)


def _threshold(check: Any, default: float | None) -> float | None:
    """The number in a check's threshold text (``">= 60"``), else ``default``."""
    try:
        return float(str(check.threshold).split()[-1])
    except (AttributeError, ValueError, IndexError):
        return default


def _versus(label: str, value: float | None, threshold: float | None, verdict: str) -> str:
    """``"track line score 12 < 60"``: the value against its threshold as the rules judged it."""
    if value is None:
        return f"{label} not scored" + (f" (needs >= {number(threshold)})" if threshold is not None else "")
    if threshold is None:
        return f"{label} {number(value)}" + ("" if verdict == "pass" else " (below the site's threshold)")
    return f"{label} {number(value)} {'>=' if value >= threshold else '<'} {number(threshold)}"


def _site_threshold(check: Any, passed: bool | None, default: float) -> float | None:
    """The threshold to print: the check's, unless ``passed`` overrides its decision (then unknown)."""
    if check is None:
        return default if passed is None else None
    return _threshold(check, default) if passed is None or passed == check.passed else None


def _verdict(check: Any, passed: bool | None, own: bool | None, required: bool) -> str:
    """The rules' decision: ``passed`` (the run's record) over the check's over the metric's own."""
    if check is not None:
        return judgement(check.passed if passed is None else passed, check.required)
    return judgement(own if passed is None else passed, required)


def _details(title: str, chip: str, stain: str, *more: str) -> list[str]:
    where = " | ".join(
        p for p in (f"chip {chip}" if chip else "", f"stain {stain}" if stain else "", f"image {title}") if p
    )
    return [where, *(m for m in more if m)]


def _advisory_note(verdict: str) -> str:
    return "advisory: does not fail QC by itself" if verdict == "advisory" else ""


# -- frames and ticks ----------------------------------------------------------
def _dashed(canvas: np.ndarray, seg: np.ndarray, colour: BGR, dash: float = 5.0, gap: float = 7.0) -> None:
    """A 1 px dashed line: the image shows through the gaps."""
    x0, y0, x1, y1 = (float(v) for v in seg)
    length = math.hypot(x1 - x0, y1 - y0)
    if length < 1:
        return
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    t = np.arange(0.0, length, dash + gap)
    e = np.minimum(t + dash, length)
    # every dash in one call (a call per dash was most of the track picture's time); rint rounds as round()
    ends = np.rint(np.stack([x0 + ux * t, y0 + uy * t, x0 + ux * e, y0 + uy * e], axis=1)).astype(np.int32)
    cv2.polylines(canvas, list(ends.reshape(-1, 2, 2)), False, colour, 1, cv2.LINE_AA)


def _frame(img: np.ndarray, pad: int = FRAME_PX) -> np.ndarray:
    return cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=FRAME_BG)


def _edge_ticks(canvas: np.ndarray, segs: np.ndarray, w: int, h: int, colour: BGR, pad: int) -> None:
    """A tick in the frame (``pad`` px wide) where each segment meets the image's edge."""
    for x, y in segs.reshape(-1, 2):
        d = (x, w - 1 - x, y, h - 1 - y)
        side = int(np.argmin(d))
        if d[side] > 2.5:
            continue
        if side < 2:
            yy = round(y) + pad
            xs = (1, pad - 3) if side == 0 else (w + pad + 2, w + 2 * pad - 2)
            cv2.line(canvas, (xs[0], yy), (xs[1], yy), colour, 2, cv2.LINE_8)
        else:
            xx = round(x) + pad
            ys = (1, pad - 3) if side == 2 else (h + pad + 2, h + 2 * pad - 2)
            cv2.line(canvas, (xx, ys[0]), (xx, ys[1]), colour, 2, cv2.LINE_8)


# -- track ---------------------------------------------------------------------
def _crop(arr: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """``arr[y0:y0+h, x0:x0+w]`` as a copy, zero outside the image."""
    out = np.zeros((h, w, *arr.shape[2:]), arr.dtype)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, arr.shape[0]), min(x0 + w, arr.shape[1])
    if ye > ys and xe > xs:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = arr[ys:ye, xs:xe]
    return out


def _candidate_tiers(result: Any, w: int, h: int, size: int) -> list[tuple[np.ndarray, str]]:
    """Places an inset may show, best kind first: ``(n, 4)`` arrays ``x, y, kx, ky`` and their kind.

    Kinds: ``measured`` crossings, ``fitted`` crossings (where the grid puts
    them), ``plain`` places on a lattice (no crossing known).
    """
    tiers = []
    measured = np.asarray(getattr(result, "crossings", np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
    if len(measured):
        tiers.append((measured, "measured"))
    if result.found:
        gl = result.grid_lines(*result.image_size)
        kx, ky = np.meshgrid(gl.index[gl.axis == 0], gl.index[gl.axis == 1])
        g = result.grid
        pts = g.chip_to_image(g.line_positions(kx.ravel()), g.line_positions(ky.ravel())).reshape(-1, 2)
        tiers.append((np.column_stack([pts, kx.ravel(), ky.ravel()]), "fitted"))
    half = size / 2
    gx, gy = np.meshgrid(np.arange(half, w - half + 1, size), np.arange(half, h - half + 1, size))
    tiers.append((np.column_stack([gx.ravel(), gy.ravel(), np.zeros((gx.size, 2))]), "plain"))
    return tiers


def take_track_insets(
    plane: np.ndarray, result: Any, thumb: np.ndarray, factor: int, *, size: int = INSET_PX
) -> tuple[dict[str, Any], ...]:
    """Full-resolution crops of four line crossings, one per quadrant, for the track picture.

    Taken while the image is open (the picture never reads the file). In each
    quadrant the place in the plainest surroundings (least texture on the
    thumbnail, so rather chip surface than tissue) is chosen among the
    measured crossings there, else the fitted ones; with no grid at all, the
    plainest place, where lines would show best. Returns one dict per inset:
    ``where``, ``x0``, ``y0`` (top-left, full-resolution px), ``pixels``,
    ``crossing`` (``(x, y)`` or None), ``lines`` (``(kx, ky)`` or None),
    ``measured`` (bool).
    """
    h, w = plane.shape[:2]
    grey = _grey(thumb).astype(np.float32)
    k = max(3, (2 * size // factor) | 1)
    mean = cv2.blur(grey, (k, k))
    busy = np.sqrt(np.maximum(cv2.blur(grey * grey, (k, k)) - mean * mean, 0))  # tissue: texture
    half = size / 2
    tiers = _candidate_tiers(result, w, h, size)
    out = []
    for q, where in enumerate(_QUADRANTS):
        qx0, qy0 = (w / 2) * (q % 2), (h / 2) * (q // 2)
        centre = np.array([qx0 + w / 4, qy0 + h / 4])
        pick, kind = centre, "plain"
        for cand, tier in tiers:
            x, y = cand[:, 0], cand[:, 1]
            inq = (
                (x >= max(qx0, half))
                & (x < min(qx0 + w / 2, w - half))
                & (y >= max(qy0, half))
                & (y < min(qy0 + h / 2, h - half))
            )
            if inq.any():
                c = cand[inq]
                ty = np.clip((c[:, 1] / factor).astype(int), 0, busy.shape[0] - 1)
                tx = np.clip((c[:, 0] / factor).astype(int), 0, busy.shape[1] - 1)
                far = np.hypot(*(c[:, :2] - centre).T) / math.hypot(w, h)
                pick, kind = c[int(np.argmin(busy[ty, tx] / 255.0 + 0.3 * far))], tier
                break
        x0, y0 = round(pick[0] - half), round(pick[1] - half)
        hit = kind != "plain"
        out.append(
            {
                "where": where,
                "x0": x0,
                "y0": y0,
                "pixels": _crop(plane, x0, y0, size, size),
                "crossing": (float(pick[0]), float(pick[1])) if hit else None,
                "lines": (int(pick[2]), int(pick[3])) if hit else None,
                "measured": kind == "measured",
            }
        )
    return tuple(out)


def _inset_cells(
    insets: Sequence[Mapping[str, Any]], result: Any, legend: Legend
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The row of insets drawn 1:1, each in a frame with the fitted lines ticked at its edges."""
    pad = FRAME_PX - 2
    cells, boxes, x = [], [], 0
    grid = result.grid if result.found else None
    for ins in insets:
        crop = to_display(ins["pixels"])
        ch, cw = crop.shape[:2]
        cell = _frame(crop, pad)
        notes = [f"{ins['where']}", f"at x {ins['x0'] + cw // 2}, y {ins['y0'] + ch // 2}"]
        if grid is not None:
            g = replace(grid, origin_px=(grid.origin_px[0] - ins["x0"], grid.origin_px[1] - ins["y0"]))
            gl = g.grid_lines(cw, ch)
            _edge_ticks(cell, gl.segments, cw, ch, legend.use(LINE_C, "fitted track lines"), pad)
        if ins.get("crossing") is not None:
            cx, cy = ins["crossing"][0] - ins["x0"], ins["crossing"][1] - ins["y0"]
            if ins.get("measured"):
                cv2.circle(
                    cell,
                    (round(cx) + pad, round(cy) + pad),
                    12,
                    legend.use(MEASURED_C, "measured crossing (ring)"),
                    1,
                    cv2.LINE_AA,
                )
                if grid is not None and ins.get("lines") is not None:
                    kx, ky = ins["lines"]
                    fx, fy = grid.chip_to_image(grid.line_positions(kx), grid.line_positions(ky))
                    notes.append(
                        f"fit - measured {math.hypot(fx - ins['crossing'][0], fy - ins['crossing'][1]):.1f} px"
                    )
            else:
                notes.append("fitted crossing (not measured)")
        else:
            notes.append("no grid crossing known")
        cells.append(stack([cell, text_block(notes, max(cell.shape[1], 200), scale=0.5)]))
        boxes.append((x + pad, pad, cw, ch))
        x += cells[-1].shape[1] + 12
    if not cells:
        return np.zeros((0, 0, 3), np.uint8), []
    return side_by_side(cells), boxes


def draw_track(
    thumb: np.ndarray,
    factor: int,
    result: Any,
    *,
    title: str,
    passed: bool | None = None,
    check: Any = None,
    chip: str = "",
    stain: str = "",
    insets: Sequence[Mapping[str, Any]] = (),
) -> Picture:
    """The fitted grid over the thumbnail, and the full-resolution insets; ``result`` is a :class:`qc.track.TrackResult`.

    ``passed`` is the site's decision (its configured threshold), ``check`` the
    :class:`qc.rules.MetricCheck`; default the result's own.
    """
    verdict = _verdict(check, passed, result.passed, True)
    legend = Legend()
    canvas = to_display(thumb)
    h, w = canvas.shape[:2]
    segs = np.zeros((0, 4))
    if result.found:
        segs = np.asarray(result.grid_lines(*result.image_size).segments, dtype=np.float64) / factor
        colour = legend.use(LINE_C, "fitted track lines (dashed, see-through; ticks in the frame)")
        layer = canvas.copy()
        for seg in segs:
            _dashed(layer, seg, colour)
        canvas = cv2.addWeighted(layer, 0.5, canvas, 0.5, 0)
    body = _frame(canvas)
    if result.found:
        _edge_ticks(body, segs, w, h, LINE_C, FRAME_PX)
        ox, oy = (v / factor for v in result.origin_px)
        if 0 <= ox < w and 0 <= oy < h:
            cv2.circle(
                body,
                (round(ox) + FRAME_PX, round(oy) + FRAME_PX),
                9,
                legend.use(ORIGIN_C, "grid origin (chip 0,0)"),
                2,
                cv2.LINE_AA,
            )
    for ins in insets:
        s = ins["pixels"].shape[1] / factor
        p0 = (round(ins["x0"] / factor) + FRAME_PX - 3, round(ins["y0"] / factor) + FRAME_PX - 3)
        p1 = (round(p0[0] + s) + 6, round(p0[1] + s) + 6)
        cv2.rectangle(body, p0, p1, legend.use(INSET_C, "regions shown at full resolution below"), 1, cv2.LINE_8)
    row, boxes = _inset_cells(insets, result, legend)
    if row.size:
        if any(i.get("crossing") is not None for i in insets):
            what = "Full resolution (1:1) around a line crossing in each quadrant; ticks in each frame: where the fitted lines cross its edges"
        else:
            what = (
                "Full resolution (1:1), the plainest place in each quadrant: no grid was fitted, so no lines are marked"
            )
        caption = text_block([what], body.shape[1])
        y = body.shape[0] + caption.shape[0]
        body = stack([body, caption, row], max(body.shape[1], row.shape[1]))
        boxes = [(bx, by + y, bw, bh) for bx, by, bw, bh in boxes]
    threshold = _site_threshold(check, passed, 60.0)
    more = []
    if result.found:
        more.append(
            f"angle {result.angle_deg:+.3f} deg, scale {result.scale[0]:.4f} x {result.scale[1]:.4f} px/DNB, "
            f"template {result.template}, residual {result.residual_px:.2f} px"
        )
    if result.problem:
        more.append(result.problem)
    width = body.shape[1]
    header = header_band(
        verdict,
        _versus("track line score", float(result.score), threshold, verdict),
        _details(title, chip, stain, *more),
        width,
    )
    return compose(header, body, legend.band(width), verdict, legend.entries, tuple(boxes))


# -- clarity -------------------------------------------------------------------
def draw_clarity(
    thumb: np.ndarray,
    factor: int,
    result: Any,
    labels: tuple[str, ...],
    *,
    title: str,
    check: Any = None,
    chip: str = "",
    stain: str = "",
) -> Picture:
    """Windows tinted by class; ``result`` is a :class:`qc.clarity.ClarityResult` (clarity is advisory)."""
    own = None if result.score is None else bool(result.score >= 80.0)
    verdict = _verdict(check, None, own, False)
    legend = Legend()
    canvas = to_display(thumb)
    tint = canvas.copy()
    g = result.grid
    w = max(1, round(g.window / factor))
    counts: dict[str, int] = {}
    for i, y in enumerate(g.ys):
        for j, x in enumerate(g.xs):
            label = labels[int(result.class_map[i, j])]
            colour = CLARITY_COLOURS.get(label)
            if colour is None:
                continue
            counts[label] = counts.get(label, 0) + 1
            x0, y0 = round(x / factor), round(y / factor)
            cv2.rectangle(tint, (x0, y0), (x0 + w, y0 + w), colour, -1)
    canvas = cv2.addWeighted(tint, 0.45, canvas, 0.55, 0)
    for label in labels:  # in class order, only those drawn (never the uncoloured background)
        if label in counts and (drawn := CLARITY_COLOURS[label]) is not None:
            legend.use(drawn, f"{label.replace('_', ' ')} ({counts[label]} windows)")
    body = _frame(canvas)
    threshold = _threshold(check, 80.0)
    score = None if result.score is None else float(result.score)
    header = header_band(
        verdict,
        _versus("clarity score", score, threshold, verdict),
        _details(title, chip, stain, _advisory_note(verdict), result.problem or ""),
        body.shape[1],
    )
    notes = ["Tints are 45 % over the image; untinted: background, not judged."]
    return compose(header, body, legend.band(body.shape[1], notes=notes), verdict, legend.entries)


# -- stitching -----------------------------------------------------------------
def draw_stitching(
    thumb: np.ndarray,
    factor: int,
    result: Any,
    sizes: Mapping[str, tuple[int, int]],
    *,
    title: str,
    tolerance_px: float = 20.0,
    passed: bool | None = None,
    check: Any = None,
    chip: str = "",
    stain: str = "",
    fused: bool = False,
) -> Picture:
    """Fields of view at their registered positions, each in the colour of its part in the score.

    Green FOVs are exactly those counted as clear and consistent (the share
    the score needs above 30 %), red ones out of place (the placement
    condition), so the colours agree with the score. ``sizes`` maps each
    tile's name to its ``(width, height)``; ``passed`` is the site's decision
    (its configured threshold), default the result's own. ``fused`` says
    ``thumb`` is the fused view (:func:`qc.stitching.fused_preview`), not the
    tiles at their nominal positions.
    """
    crit = result.criterion
    tol = float(getattr(crit, "max_deviation_tolerance_px", tolerance_px))
    verdict = _verdict(check, passed, result.passed, check.required if check is not None else False)
    legend = Legend()
    canvas = to_display(thumb)
    misplaced = []
    for fov in result.fovs:
        if fov.name not in sizes:
            continue
        x, y = fov.registered if fov.registered is not None else fov.nominal
        tw, th = sizes[fov.name]
        dev = fov.deviation_from_neighbours_px
        if fov.outlier:
            colour = legend.use(RED, f"out of place (> {tol:g} px from its neighbours, or matching none)")
            misplaced.append(f"{fov.name} ({'no match' if dev is None else f'{dev:.0f} px'})")
        elif fov.clear_consistent:
            colour = legend.use(GREEN, "clear, consistent overlaps (counted in the share)")
        elif fov.informative:
            colour = legend.use(AMBER, "overlap features unclear or disagreeing (not counted)")
        else:
            colour = legend.use(GREY, "no overlap features (neither for nor against)")
        p0 = (round(x / factor) + 2, round(y / factor) + 2)
        p1 = (round((x + tw) / factor) - 2, round((y + th) / factor) - 2)
        cv2.rectangle(canvas, p0, p1, colour, 2 if fov.outlier else 1, cv2.LINE_AA)
    body = _frame(canvas)
    width = max(body.shape[1], 900)
    threshold = _site_threshold(check, passed, 60.0)
    n = len(result.fovs)
    clear = sum(1 for f in result.fovs if f.clear_consistent)

    def met(sub_score: float) -> str:  # each sub-score maps its condition's threshold to 60
        return "met" if sub_score >= 60 else "NOT met"

    unmatched = f", {crit.unmatched} FOV(s) matching no neighbour" if crit.unmatched else ""
    more = [
        f"clear, consistent FOVs {clear} of {n} ({crit.clear_share:.0%}; needs > {crit.min_clear_share:.0%}): {met(crit.share_score)}",
        f"mean offset quality {crit.mean_quality:.2f} (needs > {crit.min_mean_quality:g}): {met(crit.quality_score)}",
        f"largest deviation {result.max_deviation_px:.1f} px (limit {tol:g} px{unmatched}): {met(crit.placement_score)}",
        _advisory_note(verdict),
    ]
    header = header_band(
        verdict,
        _versus("stitching score", float(result.score), threshold, verdict),
        _details(title, chip, stain, *more),
        width,
    )
    notes = ["Each field of view is outlined at its registered position."]
    if fused:
        notes.append("The chip is shown fused: the tiles blended at their registered positions.")
    if misplaced:
        notes.append("Out of place: " + ", ".join(misplaced))
    return compose(header, body, legend.band(width, notes=notes), verdict, legend.entries)


# -- calibration ---------------------------------------------------------------
def _feature_spot(
    nuclear_thumb: np.ndarray,
    if_thumb: np.ndarray,
    factor: int,
    offset: tuple[float, float],
    full: tuple[int, int],
    size: int,
) -> tuple[int, int]:
    """Top-left (full px) of a ``size`` window with structure in both images, inside both before and after."""
    h = min(nuclear_thumb.shape[0], if_thumb.shape[0])
    w = min(nuclear_thumb.shape[1], if_thumb.shape[1])
    k = max(3, (size // factor) | 1)

    def texture(img: np.ndarray) -> np.ndarray:
        g = _grey(img[:h, :w]).astype(np.float32)
        m = cv2.blur(g, (k, k))
        return np.sqrt(np.maximum(cv2.blur(g * g, (k, k)) - m * m, 0))

    score = texture(nuclear_thumb) * texture(if_thumb)
    dx, dy = round(offset[0]), round(offset[1])
    fw, fh = full
    lo_x, hi_x = max(0, -dx), fw - size - max(0, dx)
    lo_y, hi_y = max(0, -dy), fh - size - max(0, dy)
    if hi_x < lo_x or hi_y < lo_y:  # the offset is larger than the image allows: show the middle
        return (max(0, (fw - size) // 2), max(0, (fh - size) // 2))
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = xs * factor - size / 2, ys * factor - size / 2  # window top-left if centred on this thumb pixel
    score[(cx < lo_x) | (cx > hi_x) | (cy < lo_y) | (cy > hi_y)] = -1
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return (int(np.clip(x * factor - size // 2, lo_x, hi_x)), int(np.clip(y * factor - size // 2, lo_y, hi_y)))


def take_calibration_crops(
    reference: np.ndarray,
    moving: np.ndarray,
    result: Any,
    nuclear_thumb: np.ndarray,
    if_thumb: np.ndarray,
    factor: int,
    *,
    size: int = CALIBRATION_CROP_PX,
) -> dict[str, Any]:
    """Full-resolution crops of one region with features in both images, for the calibration picture.

    Taken while both images are open. ``reference`` the nuclear plane, ``moving``
    the IF plane; the IF content sits at the nuclear position + ``result.offset_px``.
    Returns ``x0, y0, size, reference, before`` (the IF at the same place) and
    ``after`` (the IF at the place the offset points to).
    """
    dx, dy = (float(v) for v in result.offset_px)
    fh = min(reference.shape[0], moving.shape[0])
    fw = min(reference.shape[1], moving.shape[1])
    size = min(size, fw, fh)
    x0, y0 = _feature_spot(nuclear_thumb, if_thumb, factor, (dx, dy), (fw, fh), size)
    return {
        "x0": x0,
        "y0": y0,
        "size": size,
        "reference": _crop(reference, x0, y0, size, size),
        "before": _crop(moving, x0, y0, size, size),
        "after": _crop(moving, x0 + round(dx), y0 + round(dy), size, size),
    }


def _shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
    result: np.ndarray = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR, borderValue=0)
    return result


def _overlay(nuclear: np.ndarray, if_img: np.ndarray) -> np.ndarray:
    return cv2.merge([if_img, nuclear, if_img])  # B, G, R: IF magenta, nuclear green, both white


def _offset_diagram(offset: tuple[float, float], limit: float, side: int, legend: Legend) -> tuple[np.ndarray, float]:
    """The found offset as an arrow from the centre, and the limit as a circle of that radius (1:1 when it fits)."""
    panel = np.full((side, side, 3), PAPER, np.uint8)
    c = (side - 40) // 2
    k = min(8.0, (c - 8) / max(limit, 1e-9), (c - 8) / max(math.hypot(*offset), 1e-9))
    if k >= 1:
        k = math.floor(k)
    limit_c = legend.use(LIMIT_C, f"the {limit:g} px limit (calibration_offset_px)")
    cv2.circle(panel, (c, c), max(1, round(limit * k)), limit_c, 2, cv2.LINE_AA)
    bar = min(round(limit), side - 20)  # the limit at full resolution, as the crops are shown
    panel[side - 26 : side - 20, 10 : 10 + bar] = limit_c
    cv2.putText(
        panel, f"{limit:g} px at 1:1", (16 + bar, side - 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, INK, 1, cv2.LINE_AA
    )
    tip = (round(c + offset[0] * k), round(c + offset[1] * k))
    colour = legend.use(OFFSET_C, "found offset of the IF image (arrow)")
    cv2.arrowedLine(panel, (c, c), tip, colour, 2, cv2.LINE_AA, tipLength=0.15 if tip != (c, c) else 0)
    cv2.circle(panel, (c, c), 3, colour, -1, cv2.LINE_AA)
    return panel, k


def draw_calibration(
    nuclear_thumb: np.ndarray,
    if_thumb: np.ndarray,
    factor: int,
    result: Any,
    *,
    title: str,
    crops: Mapping[str, Any] | None = None,
    check: Any = None,
    chip: str = "",
    stain: str = "",
) -> Picture:
    """DAPI (green) and IF (magenta) at full resolution before and after undoing the found offset, and the offset against its limit."""
    verdict = _verdict(check, None, result.passed, True)
    legend = Legend()
    dx, dy = (float(v) for v in result.offset_px)
    limit = float(result.max_offset_px)
    h = min(nuclear_thumb.shape[0], if_thumb.shape[0])
    w = min(nuclear_thumb.shape[1], if_thumb.shape[1])
    legend.use(DAPI_C, "DAPI / nuclear image (green)")
    legend.use(IF_C, "IF image (magenta); white where both")
    overview = _overlay(_grey(nuclear_thumb[:h, :w]), _shift(_grey(if_thumb[:h, :w]), -dx / factor, -dy / factor))
    side = CALIBRATION_CROP_PX if crops is None else int(crops["size"])
    zoom = side / max(h, w) if crops is not None else min(1.0, 512 / max(h, w))
    overview = cv2.resize(overview, (max(1, round(w * zoom)), max(1, round(h * zoom))), interpolation=cv2.INTER_AREA)
    panels = []
    captions = []
    if crops is not None:
        s = zoom / factor
        x0, y0 = round(crops["x0"] * s), round(crops["y0"] * s)
        cv2.rectangle(
            overview,
            (x0, y0),
            (x0 + max(3, round(side * s)), y0 + max(3, round(side * s))),
            legend.use(CROP_C, "where the crops are taken"),
            1,
            cv2.LINE_8,
        )
    panels.append(overview)
    captions.append([f"whole image, after (1:{factor / zoom:.0f})"])
    if crops is not None:
        ref = _grey(crops["reference"])
        panels.append(_overlay(ref, _grey(crops["before"])))
        captions.append(["before: as acquired", "(full resolution, 1:1)"])
        panels.append(_overlay(ref, _grey(crops["after"])))
        captions.append(["after undoing the offset", f"({dx:+.1f}, {dy:+.1f}) px, 1:1"])
    diagram, k = _offset_diagram((dx, dy), limit, side, legend)
    panels.append(diagram)
    scale = "1:1" if abs(k - 1) < 1e-3 else (f"drawn {k:.0f}:1" if k > 1 else f"drawn at 1:{1 / k:.1f}")
    within = "<=" if result.offset_length_px <= limit else ">"
    captions.append([f"offset {result.offset_length_px:.1f} px {within} {limit:g} px", f"limit circle, {scale}"])
    cols = [stack([p, text_block(c, max(p.shape[1], 250), scale=0.5)]) for p, c in zip(panels, captions, strict=False)]
    body = stack([np.full((8, 1, 3), PAPER, np.uint8), side_by_side(cols)])
    width = max(body.shape[1], 900)
    metric = (
        f"calibration offset {result.offset_length_px:.1f} px {'<=' if result.offset_length_px <= limit else '>'} "
        f"{limit:g} px, similarity {result.similarity:.3f} "
        f"{'>=' if result.similarity >= result.min_similarity else '<'} {result.min_similarity:g}"
    )
    details = _details(title, chip, stain, f"against {result.reference}" if getattr(result, "reference", None) else "")
    header = header_band(verdict, metric, details, width)
    notes = (
        [] if crops is not None else ["No full-resolution crops were kept for this run; only the whole image is shown."]
    )
    return compose(header, body, legend.band(width, notes=notes or None), verdict, legend.entries)


# -- files ---------------------------------------------------------------------
def write_png(path: Path, image: np.ndarray | Picture) -> Path:
    if isinstance(image, Picture):
        image = image.image
    # an explicit level selects zlib's default strategy: a third smaller than OpenCV's default (RLE), ~25 ms more a picture
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:  # pragma: no cover - OpenCV failure
        msg = f"could not encode {path.name}"
        raise OSError(msg)
    path.write_bytes(buf.tobytes())
    return path


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _picture_path(folder: Path, image: str, kind: str) -> Path:
    """``<image>_<kind>.png`` in ``folder``; a long image name is shortened to fit (:func:`qc.filenames.fit_name`)."""
    return folder / fit_name(safe_name(image), f"_{kind}.png")


def pictures_from_artifacts(
    artifacts: Mapping[str, Any], folder: Path, *, keep: list[tuple[str, np.ndarray]] | None = None
) -> list[Path]:
    """Write every picture the artifacts of a QC run allow; returns the paths.

    ``keep``, when given, receives ``(file name, image)`` of each picture written.
    Each picture is PNG-encoded on a thread of its own while the next is drawn.
    """
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="qc-png") as pool:
        encoding = _pictures(artifacts, folder, keep, lambda path, pic: pool.submit(write_png, path, pic))
        return [f.result() for f in encoding]


def _pictures(
    artifacts: Mapping[str, Any],
    folder: Path,
    keep: list[tuple[str, np.ndarray]] | None,
    write: Callable[[Path, Picture], Future[Path]],
) -> list[Future[Path]]:
    out: list[Future[Path]] = []

    def emit(path: Path, pic: Picture) -> None:
        out.append(write(path, pic))
        if keep is not None:
            keep.append((path.name, pic.image))

    thumbs = artifacts.get("thumbs", {})
    labels = artifacts.get("clarity_labels", ())
    decided = artifacts.get("passed", {})  # (metric, image) -> the rules' decision
    checks = artifacts.get("checks", {})  # (metric, image) -> the rules' MetricCheck
    ctx: dict[str, Any] = {"chip": str(artifacts.get("chip", "")), "stain": str(artifacts.get("stain", ""))}
    for name, res in artifacts.get("track", {}).items():
        thumb, f = thumbs[name]
        pic = draw_track(
            thumb,
            f,
            res,
            title=name,
            passed=decided.get(("track", name)),
            check=checks.get(("track", name)),
            insets=artifacts.get("track_insets", {}).get(name, ()),
            **ctx,
        )
        emit(_picture_path(folder, name, "track"), pic)
    for name, res in artifacts.get("clarity", {}).items():
        thumb, f = thumbs[name]
        pic = draw_clarity(thumb, f, res, labels, title=name, check=checks.get(("clarity", name)), **ctx)
        emit(_picture_path(folder, name, "clarity"), pic)
    for name, res in artifacts.get("stitching", {}).items():
        # the tiles blended at their registered positions where QC kept them, else the nominal mosaic
        fused = artifacts.get("fused_thumbs", {}).get(name)
        thumb, f = fused or thumbs[name]
        pic = draw_stitching(
            thumb,
            f,
            res,
            artifacts["tile_sizes"][name],
            title=name,
            passed=decided.get(("stitching", name)),
            check=checks.get(("stitching", name)),
            fused=fused is not None,
            **ctx,
        )
        emit(_picture_path(folder, name, "stitching"), pic)
    for name, (fov_checks, grid) in artifacts.get("fov_checks", {}).items():
        if fov_checks:
            pic = draw_fov_map(fov_checks, grid, title=name, **ctx)
            emit(_picture_path(folder, name, "fovs"), pic)
    nuclear = artifacts.get("nuclear")
    for name, res in artifacts.get("calibration", {}).items():
        if nuclear is None or name not in thumbs:
            continue
        (nt, f), (it, f2) = thumbs[nuclear], thumbs[name]
        if f != f2:
            continue
        pic = draw_calibration(
            nt,
            it,
            f,
            res,
            title=name,
            crops=artifacts.get("calibration_crops", {}).get(name),
            check=checks.get(("calibration", name)),
            **ctx,
        )
        emit(_picture_path(folder, name, "calibration"), pic)
    return out


def pictures_for_run(report: Any, folder: Path) -> list[Path]:
    """Every picture of a run (:func:`pictures_from_artifacts`) and its summary sheet ``<chip>_summary.png`` first."""
    drawn: list[tuple[str, np.ndarray]] = []
    paths = pictures_from_artifacts(report.artifacts, folder, keep=drawn)
    sheet = draw_summary(report, drawn)
    return [write_png(_picture_path(folder, report.chip, "summary"), sheet), *paths]
