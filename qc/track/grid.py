"""Geometry of a chip's track-line grid in an image.

Conventions (used by :mod:`qc.track`, the synthetic chips of
:mod:`qc.testing.chips` and the report overlays):

Image coordinates ``(x, y)``
    Pixels; ``x`` to the right (column), ``y`` down (row). The centre of the
    pixel at row ``r``, column ``c`` is at ``(x, y) = (c, r)``.
Chip coordinates ``(u, v)``
    DNB units along the chip's own axes. ``u`` counts along the chip's x
    axis, ``v`` along its y axis. Track lines of the *x family* are the lines
    of constant ``u`` (near-vertical in the image), at
    ``u = template.line_position(k)`` for every integer line index ``k``;
    the *y family* are the lines of constant ``v`` (near-horizontal), at
    ``v = template.line_position(k)``. Line 0 of both families passes through
    chip ``(0, 0)``; line index ``k`` is template line ``k mod 9`` of period
    ``k // 9``.
The mapping
    ``[x, y] = origin + R(angle) @ [sx * u, sy * v]`` with
    ``R(a) = [[cos a, -sin a], [sin a, cos a]]``. ``scale = (sx, sy)`` is in
    image pixels per DNB (about 1 at 10x for SS2 chips). Because ``y`` points
    down, a positive angle turns the grid clockwise as displayed: a y-family
    (horizontal) line runs along ``(cos a, sin a)``, descending to the right.
    A square grid turned by 90 degrees looks the same, so angles are
    reported within about +-45 degrees and the x family is the one nearer
    the image's columns (a fit within a hair of +-45 may land just beyond).
Origin
    ``origin_px`` is the image position of chip ``(0, 0)``: a crossing of two
    index-0 lines (the first line of a template period in each family). The
    template repeats, so any period crossing would do; :meth:`GridModel.canonical`
    picks the one nearest the image's top-left corner ``(0, 0)`` (it may lie
    slightly outside the image), and results are always reported that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from qc.chip import ChipTemplate

__all__ = ["GridLines", "GridModel"]


@dataclass(frozen=True)
class GridLines:
    """Track-line segments clipped to an image, for drawing.

    Attributes
    ----------
    segments : ndarray, shape (n, 4), float64
        ``[x0, y0, x1, y1]`` end points in image pixels.
    axis : ndarray, shape (n,), int8
        0 for the x family (near-vertical lines), 1 for the y family.
    index : ndarray, shape (n,), int64
        Line index within its family (0 passes through the origin).
    """

    segments: np.ndarray = field(repr=False)
    axis: np.ndarray = field(repr=False)
    index: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return int(self.segments.shape[0])


@dataclass(frozen=True)
class GridModel:
    """A chip template placed in an image (see the module docstring)."""

    template: ChipTemplate
    angle_deg: float
    scale: tuple[float, float]
    origin_px: tuple[float, float]

    # -- basic maps -----------------------------------------------------
    def _rot(self) -> np.ndarray:
        a = math.radians(self.angle_deg)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])

    def chip_to_image(self, u: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
        """Image ``(x, y)`` of chip points ``(u, v)`` in DNB; returns shape ``(..., 2)``."""
        u, v = np.broadcast_arrays(np.asarray(u, float), np.asarray(v, float))
        sx, sy = self.scale
        r = self._rot()
        x = self.origin_px[0] + r[0, 0] * sx * u + r[0, 1] * sy * v
        y = self.origin_px[1] + r[1, 0] * sx * u + r[1, 1] * sy * v
        return np.stack([x, y], axis=-1)

    def image_to_chip(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Chip ``(u, v)`` in DNB of image points ``(x, y)``; returns shape ``(..., 2)``."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        dx, dy = x - self.origin_px[0], y - self.origin_px[1]
        r = self._rot()
        sx, sy = self.scale
        u = (r[0, 0] * dx + r[1, 0] * dy) / sx
        v = (r[0, 1] * dx + r[1, 1] * dy) / sy
        return np.stack([u, v], axis=-1)

    def line_positions(self, indices: np.ndarray) -> np.ndarray:
        """Chip coordinates (DNB) of line ``indices`` (either family)."""
        return self.template.line_positions(indices)

    def line_index_range(self, lo: float, hi: float) -> np.ndarray:
        """Indices of the lines with chip coordinate in ``[lo, hi]`` (DNB)."""
        return self.template.line_indices(lo, hi)

    def lines_in_image(self, axis: int, width: int, height: int, *, margin: float = 0.0) -> np.ndarray:
        """Indices of ``axis`` family lines crossing the image, at least ``margin`` px inside."""
        xs = np.array([margin, width - 1 - margin, margin, width - 1 - margin])
        ys = np.array([margin, margin, height - 1 - margin, height - 1 - margin])
        if xs[1] < xs[0] or ys[2] < ys[0]:
            return np.zeros(0, dtype=np.int64)
        c = self.image_to_chip(xs, ys)[:, axis]
        return self.line_index_range(float(c.min()), float(c.max()))

    # -- canonical origin ----------------------------------------------
    def canonical(self) -> GridModel:
        """The same grid with its origin moved to the period crossing nearest ``(0, 0)``."""
        _sx, _sy = self.scale
        p = float(self.template.period)
        # (m, n) periods from the origin to the image corner, in each family
        uv = self.image_to_chip(0.0, 0.0)
        m, n = round(float(uv[0]) / p), round(float(uv[1]) / p)
        if m == 0 and n == 0:
            return self
        o = self.chip_to_image(m * p, n * p)
        return replace(self, origin_px=(float(o[0]), float(o[1])))

    def period_shift(self, other: GridModel) -> tuple[int, int]:
        """Whole periods ``(m, n)`` from this origin to ``other``'s, in this grid's frame."""
        p = float(self.template.period)
        uv = self.image_to_chip(*other.origin_px)
        return (round(float(uv[0]) / p), round(float(uv[1]) / p))

    # -- drawing --------------------------------------------------------
    def grid_lines(self, width: int, height: int) -> GridLines:
        """All track lines crossing a ``width`` x ``height`` image, clipped to it."""
        segs: list[np.ndarray] = []
        axes: list[np.ndarray] = []
        idxs: list[np.ndarray] = []
        x0, y0, x1, y1 = -0.5, -0.5, width - 0.5, height - 0.5
        corners = self.image_to_chip(np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
        for axis in (0, 1):
            other = 1 - axis
            k = self.lines_in_image(axis, width, height)
            if k.size == 0:
                continue
            c = self.line_positions(k)
            lo, hi = corners[:, other].min(), corners[:, other].max()
            # each line as a long segment in chip space, then clipped to the image box
            if axis == 0:
                a = self.chip_to_image(c, np.full_like(c, lo))
                b = self.chip_to_image(c, np.full_like(c, hi))
            else:
                a = self.chip_to_image(np.full_like(c, lo), c)
                b = self.chip_to_image(np.full_like(c, hi), c)
            seg, keep = _clip_segments(a, b, (x0, y0, x1, y1))
            segs.append(seg)
            axes.append(np.full(int(keep.sum()), axis, dtype=np.int8))
            idxs.append(k[keep])
        if not segs:
            return GridLines(np.zeros((0, 4)), np.zeros(0, np.int8), np.zeros(0, np.int64))
        return GridLines(np.concatenate(segs), np.concatenate(axes), np.concatenate(idxs))


def _clip_segments(
    a: np.ndarray, b: np.ndarray, box: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Liang-Barsky clipping of segments ``a -> b`` (n, 2) to ``box``; returns kept segments and mask."""
    x0, y0, x1, y1 = box
    d = b - a
    t0 = np.zeros(len(a))
    t1 = np.ones(len(a))
    keep = np.ones(len(a), dtype=bool)
    for p, q in (
        (-d[:, 0], a[:, 0] - x0),
        (d[:, 0], x1 - a[:, 0]),
        (-d[:, 1], a[:, 1] - y0),
        (d[:, 1], y1 - a[:, 1]),
    ):
        parallel = np.abs(p) < 1e-12
        keep &= ~(parallel & (q < 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(parallel, 0.0, q / np.where(parallel, 1.0, p))
        t0 = np.where(~parallel & (p < 0), np.maximum(t0, r), t0)
        t1 = np.where(~parallel & (p > 0), np.minimum(t1, r), t1)
    keep &= t0 <= t1
    seg = np.concatenate([a + t0[:, None] * d, a + t1[:, None] * d], axis=1)
    return seg[keep], keep
