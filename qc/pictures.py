"""Pictures a person would rather look at than read.

All pictures are drawn on thumbnails (longest side about :data:`THUMB_SIDE`
px) with OpenCV and written as PNG:

- ``<image>_track.png``: the fitted track-line grid over the image (green when
  the score passes, red when not), the origin circled;
- ``<image>_clarity.png``: each evaluated window tinted by its class;
- ``<image>_stitching.png``: each field of view outlined at its registered
  position, coloured by its deviation (grey: no overlap features);
- ``<IF>_calibration.png``: the IF image (magenta) over the nuclear image
  (green) before and after the found offset, side by side.

An image name too long for these file names is shortened with a hash
(:func:`qc.filenames.fit_name`); the picture's title keeps the full name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qc.filenames import fit_name

__all__ = [
    "THUMB_SIDE",
    "thumb_factor",
    "to_display",
    "draw_track",
    "draw_clarity",
    "draw_stitching",
    "draw_calibration",
    "write_png",
]

THUMB_SIDE = 1024

GREEN = (60, 200, 60)
RED = (40, 40, 230)
AMBER = (0, 190, 255)
GREY = (150, 150, 150)
#: BGR tints per clarity class.
CLARITY_COLOURS = {
    "background": None,
    "good": (80, 200, 80),
    "mild_blur": (0, 200, 255),
    "severe_blur": (0, 0, 230),
    "mild_overexposure": (255, 200, 0),
    "severe_overexposure": (255, 0, 200),
}


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
    if out.ndim == 2:
        return cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(out, cv2.COLOR_RGB2BGR)


def _label(canvas: np.ndarray, lines: list[str]) -> None:
    y = 22
    for text in lines:
        cv2.putText(canvas, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(canvas, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
        y += 24


def draw_track(thumb: np.ndarray, factor: int, result: Any, *, title: str, passed: bool | None = None) -> np.ndarray:
    """The fitted grid over the thumbnail; ``result`` is a :class:`qc.track.TrackResult`.

    ``passed`` is the site's decision (its configured threshold); default the result's own.
    """
    passed = result.passed if passed is None else passed
    canvas = to_display(thumb)
    colour = GREEN if passed else RED
    if result.found:
        full_w, full_h = result.image_size
        segs = np.asarray(result.grid_lines(full_w, full_h).segments, dtype=np.float64) / factor
        for x0, y0, x1, y1 in segs:
            cv2.line(canvas, (round(x0), round(y0)), (round(x1), round(y1)), colour, 1, cv2.LINE_AA)
        ox, oy = (v / factor for v in result.origin_px)
        if 0 <= ox < canvas.shape[1] and 0 <= oy < canvas.shape[0]:
            cv2.circle(canvas, (round(ox), round(oy)), 8, AMBER, 2, cv2.LINE_AA)
    lines = [f"{title}: track line score {result.score:.0f} ({'pass' if passed else 'fail'})"]
    if result.found:
        lines.append(f"angle {result.angle_deg:+.3f} deg, scale {result.scale[0]:.4f} x {result.scale[1]:.4f}")
    if result.problem:
        lines.append(result.problem)
    _label(canvas, lines)
    return canvas


def draw_clarity(thumb: np.ndarray, factor: int, result: Any, labels: tuple[str, ...], *, title: str) -> np.ndarray:
    """Windows tinted by class; ``result`` is a :class:`qc.clarity.ClarityResult`."""
    canvas = to_display(thumb)
    tint = canvas.copy()
    g = result.grid
    w = max(1, round(g.window / factor))
    for i, y in enumerate(g.ys):
        for j, x in enumerate(g.xs):
            colour = CLARITY_COLOURS.get(labels[int(result.class_map[i, j])])
            if colour is None:
                continue
            x0, y0 = round(x / factor), round(y / factor)
            cv2.rectangle(tint, (x0, y0), (x0 + w, y0 + w), colour, -1)
    canvas = cv2.addWeighted(tint, 0.45, canvas, 0.55, 0)
    score = "n/a" if result.score is None else f"{result.score:.0f}"
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items() if v and k != "background")
    _label(canvas, [f"{title}: clarity {score}", counts or (result.problem or "")])
    return canvas


def draw_stitching(
    thumb: np.ndarray,
    factor: int,
    result: Any,
    sizes: Mapping[str, tuple[int, int]],
    *,
    title: str,
    tolerance_px: float = 20.0,
    passed: bool | None = None,
) -> np.ndarray:
    """Fields of view at their registered positions, coloured by deviation.

    ``sizes`` maps each tile's name to its ``(width, height)``; ``passed`` is the
    site's decision (its configured threshold), default the result's own.
    """
    passed = result.passed if passed is None else passed
    canvas = to_display(thumb)
    for fov in result.fovs:
        x, y = fov.registered if fov.registered is not None else fov.nominal
        if fov.name not in sizes:
            continue
        tw, th = sizes[fov.name]
        dev = fov.deviation_from_neighbours_px
        if fov.outlier:
            colour = RED
        elif not fov.informative or dev is None:
            colour = GREY
        elif dev <= tolerance_px / 4:
            colour = GREEN
        else:
            colour = AMBER
        p0 = (round(x / factor) + 2, round(y / factor) + 2)
        p1 = (round((x + tw) / factor) - 2, round((y + th) / factor) - 2)
        cv2.rectangle(canvas, p0, p1, colour, 2 if fov.outlier else 1, cv2.LINE_AA)
        if fov.outlier:
            cv2.putText(canvas, fov.name[:24], (p0[0] + 4, p0[1] + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, RED, 1, cv2.LINE_AA)
    _label(
        canvas,
        [
            f"{title}: stitching score {result.score:.0f} ({'pass' if passed else 'fail'})",
            f"max deviation {result.max_deviation_px:.1f} px; green ok, amber off, red misplaced, grey no features",
        ],
    )
    return canvas


def _shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR, borderValue=0)


def draw_calibration(
    nuclear_thumb: np.ndarray, if_thumb: np.ndarray, factor: int, result: Any, *, title: str
) -> np.ndarray:
    """IF (magenta) over nuclear (green), before and after undoing the found offset."""
    h = min(nuclear_thumb.shape[0], if_thumb.shape[0])
    w = min(nuclear_thumb.shape[1], if_thumb.shape[1])
    base = cv2.cvtColor(to_display(nuclear_thumb[:h, :w]), cv2.COLOR_BGR2GRAY)
    moving = cv2.cvtColor(to_display(if_thumb[:h, :w]), cv2.COLOR_BGR2GRAY)
    dx, dy = (float(v) / factor for v in result.offset_px)
    panels = []
    for label, mov in (("before", moving), ("after", _shift(moving, -dx, -dy))):
        panel = cv2.merge([mov, base, mov])  # B, G, R: IF magenta, nuclear green
        _label(panel, [label])
        panels.append(panel)
    canvas = np.hstack([panels[0], np.full((h, 8, 3), 255, np.uint8), panels[1]])
    ox, oy = result.offset_px
    _label_bottom(canvas, f"{title}: offset ({ox:+.1f}, {oy:+.1f}) px, similarity {result.similarity:.3f}")
    return canvas


def _label_bottom(canvas: np.ndarray, text: str) -> None:
    y = canvas.shape[0] - 10
    cv2.putText(canvas, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)


def write_png(path: Path, image: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", image)
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


def pictures_from_artifacts(artifacts: Mapping[str, Any], folder: Path) -> list[Path]:
    """Write every picture the artifacts of a QC run allow; returns the paths."""
    out: list[Path] = []
    thumbs = artifacts.get("thumbs", {})
    labels = artifacts.get("clarity_labels", ())
    decided = artifacts.get("passed", {})  # (metric, image) -> the rules' decision
    for name, res in artifacts.get("track", {}).items():
        thumb, f = thumbs[name]
        pic = draw_track(thumb, f, res, title=name, passed=decided.get(("track", name)))
        out.append(write_png(_picture_path(folder, name, "track"), pic))
    for name, res in artifacts.get("clarity", {}).items():
        thumb, f = thumbs[name]
        out.append(write_png(_picture_path(folder, name, "clarity"), draw_clarity(thumb, f, res, labels, title=name)))
    for name, res in artifacts.get("stitching", {}).items():
        thumb, f = thumbs[name]
        pic = draw_stitching(thumb, f, res, artifacts["tile_sizes"][name], title=name, passed=decided.get(("stitching", name)))
        out.append(write_png(_picture_path(folder, name, "stitching"), pic))
    nuclear = artifacts.get("nuclear")
    for name, res in artifacts.get("calibration", {}).items():
        if nuclear is None or name not in thumbs:
            continue
        (nt, f), (it, f2) = thumbs[nuclear], thumbs[name]
        if f != f2:
            continue
        pic = draw_calibration(nt, it, f, res, title=name)
        out.append(write_png(_picture_path(folder, name, "calibration"), pic))
    return out
