"""What a real stitched scan adds to a chip (internal to :mod:`qc.testing.chips`).

Real stitched 10x nuclear-stain images of Stereo-seq chips show, besides the
tissue and the track lines: every field of view (FOV) as a rectangle of its own
brightness (per-FOV camera gain) darkening towards its corners (vignetting),
and dark debris spots on the chip surface. These are the parts of the scene
that come from the acquisition, rendered for any band of rows so that chips
of any size are built strip by strip.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["Debris", "FovField"]


class FovField:
    """Per-FOV gain and vignetting: a multiplicative field over the image.

    FOVs are ``fov`` px squares laid from the image's top-left corner. Each has
    a gain drawn uniformly in ``1 +- gain``; inside a FOV the response falls
    as ``1 - vignetting * r**2``, ``r`` the distance from the FOV's centre over
    the centre-to-corner distance (so corners are ``vignetting`` darker).
    """

    def __init__(self, width: int, height: int, fov: int, gain: float, vignetting: float, rng: np.random.Generator):
        self.fov = int(fov)
        nj = -(-width // self.fov) + 1
        ni = -(-height // self.fov) + 1
        self.gains = (1.0 + rng.uniform(-gain, gain, size=(ni, nj))).astype(np.float32)
        self.vignetting = float(vignetting)

    def _axis(self, lo: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = np.arange(lo, lo + n)
        idx = np.clip(c // self.fov, 0, None)
        t = ((c - idx * self.fov) + 0.5) / self.fov - 0.5  # -0.5 .. 0.5 inside the FOV
        return idx, (t * t * 2.0).astype(np.float32)  # r^2 share of this axis (corner: 0.5 + 0.5)

    def rows(self, y0: int, y1: int, x0: int, ncols: int) -> np.ndarray:
        """Field values for image rows ``[y0, y1)`` and columns ``[x0, x0 + ncols)``."""
        iy, ry = self._axis(y0, y1 - y0)
        ix, rx = self._axis(x0, ncols)
        iy = np.minimum(iy, self.gains.shape[0] - 1)
        ix = np.minimum(ix, self.gains.shape[1] - 1)
        v = np.float32(self.vignetting)
        g = (np.float32(1.0) - v * ry)[:, None] - (v * rx)[None, :]
        # FOV columns are contiguous runs of ix: scale each by its gains (one per row)
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(ix)) + 1, [ncols]])
        for c0, c1 in itertools.pairwise(cuts):
            g[:, c0:c1] *= self.gains[iy, ix[c0]][:, None]
        return g


class Debris:
    """Dark round spots (dust, bubbles, fibres seen end-on) scattered over the image.

    ``count`` spots of radius drawn in ``radius`` px, each darkening its disc
    by a factor drawn in ``depth`` (0..1 of the signal removed) with a soft
    one-pixel edge.
    """

    def __init__(
        self,
        width: int,
        height: int,
        count: int,
        radius: tuple[float, float],
        depth: tuple[float, float],
        rng: np.random.Generator,
    ):
        self.x = rng.uniform(0, width, count)
        self.y = rng.uniform(0, height, count)
        self.r = rng.uniform(radius[0], radius[1], count)
        self.d = rng.uniform(depth[0], depth[1], count)

    def apply(self, img: np.ndarray, y0: int, y1: int, x0: int) -> None:
        """Darken the spots meeting rows ``[y0, y1)`` of ``img`` (columns from ``x0``) in place."""
        ncols = img.shape[1]
        near = (self.y + self.r + 1 >= y0) & (self.y - self.r - 1 < y1)
        for x, y, r, d in zip(self.x[near], self.y[near], self.r[near], self.d[near], strict=False):
            a0, a1 = max(y0, math.floor(y - r - 1)), min(y1, math.ceil(y + r + 2))
            b0, b1 = max(x0, math.floor(x - r - 1)), min(x0 + ncols, math.ceil(x + r + 2))
            if a0 >= a1 or b0 >= b1:
                continue
            yy = np.arange(a0, a1, dtype=np.float32)[:, None] + 0.5 - y
            xx = np.arange(b0, b1, dtype=np.float32)[None, :] + 0.5 - x
            cover = np.clip(r + 0.5 - np.sqrt(xx * xx + yy * yy), 0, 1)
            factor = 1.0 - np.float32(d) * cover
            block = img[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
            block *= factor[..., None] if img.ndim == 3 else factor
