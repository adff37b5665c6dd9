"""Full-resolution refinement of a coarse grid fit (internal to :mod:`qc.track`).

Small windows are read around predicted line crossings spread over the image;
each is de-rotated so the two lines through it are a column and a row, and
the dark dip of each is located to a fraction of a pixel. A line measured at
image point ``p`` lies on chip line ``u = U_k``; with ``u = (cos a * x +
sin a * y) / sx + c`` this is linear in the unknowns, so the grid is refitted
by (robust) least squares from all measurements.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from qc.track.coarse import single_threaded_cv2, to_grey
from qc.track.grid import GridModel

__all__ = ["Measurements", "fit_grid", "measure", "sample_crossings"]


@dataclass(frozen=True)
class Measurements:
    """Line positions measured in windows; one row per (window, family).

    ``point`` (n, 2) image px where the line was found (NaN if not found),
    ``axis`` (n,) 0 for x-family, 1 for y-family, ``index`` (n,) line index,
    ``centre`` (n, 2) the window centre, ``snr`` (n,) dip depth over noise,
    ``width`` (n,) dip full width at half depth, px.
    """

    point: np.ndarray
    axis: np.ndarray
    index: np.ndarray
    centre: np.ndarray
    snr: np.ndarray
    width: np.ndarray

    @property
    def found(self) -> np.ndarray:
        result: np.ndarray = np.isfinite(self.point[:, 0])
        return result


def window_reach(half: int, along: int) -> int:
    """Radius (px) of the image region a measurement window needs, whatever the angle."""
    return math.ceil(math.hypot(half, along)) + 2


def sample_crossings(
    grid: GridModel, width: int, height: int, reach: int, max_windows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crossings at least ``reach`` px inside the image, thinned to ``max_windows``.

    Returns (kx, ky, centres): line indices and image positions. Thinning keeps
    the crossings with ``(i - j) mod m == 0`` (i, j counted from the first
    line in the image), so every line keeps samples spread along its length.
    """
    kx = grid.lines_in_image(0, width, height, margin=reach)
    ky = grid.lines_in_image(1, width, height, margin=reach)
    if kx.size == 0 or ky.size == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros((0, 2))
    gi, gj = np.meshgrid(np.arange(kx.size), np.arange(ky.size), indexing="ij")
    ii, jj = gi.ravel(), gj.ravel()
    c = grid.chip_to_image(grid.line_positions(kx[ii]), grid.line_positions(ky[jj]))
    inside = (c[:, 0] >= reach) & (c[:, 0] <= width - 1 - reach) & (c[:, 1] >= reach) & (c[:, 1] <= height - 1 - reach)
    ii, jj, c = ii[inside], jj[inside], c[inside]
    m = max(1, math.ceil(ii.size / max_windows))
    if m > 1:
        sel = (ii - jj) % m == 0
        ii, jj, c = ii[sel], jj[sel], c[sel]
    return kx[ii], ky[jj], c


def _dips(prof: np.ndarray, centre: int, search: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Darkest dip near ``centre`` in each row of ``prof`` (n, L).

    Returns sub-pixel positions, SNR (dip depth over the robust noise of the
    rest of the profile) and full width at half depth (px). Narrow dips are
    located by a parabola through the minimum, wide ones (flat-bottomed, more
    than 4 px) by the centroid of the part deeper than half the depth.
    """
    n, length = prof.shape
    sig = 6.0
    k = 2 * int(3 * sig) + 1
    base = cv2.GaussianBlur(prof, (k, 1), sig, borderType=cv2.BORDER_REFLECT)
    hs = cv2.GaussianBlur(prof - base, (3, 1), 0, borderType=cv2.BORDER_REPLICATE)
    lo = max(1, int(centre - search))
    hi = min(length - 2, math.ceil(centre + search))
    rows = np.arange(n)
    i = lo + np.argmin(hs[:, lo : hi + 1], axis=1)
    depth = -hs[rows, i]
    idx = np.arange(length)[None, :]
    below = hs < (-depth / 2)[:, None]
    left = np.where(~below & (idx < i[:, None]), idx, -1).max(axis=1)
    right = np.where(~below & (idx > i[:, None]), idx, length).min(axis=1)
    fwhm = (right - left - 1).astype(float)
    away = np.abs(idx - i[:, None]) > np.maximum(3, fwhm)[:, None]
    rest = np.where(away, hs, np.nan)
    # a flat profile (a window of saturated tissue) has no sample away from its "dip": no noise, no dip
    noise = np.full(len(hs), np.nan)
    some = np.isfinite(rest).any(axis=1)
    if some.any():
        r = rest[some]
        noise[some] = 1.4826 * np.nanmedian(np.abs(r - np.nanmedian(r, axis=1)[:, None]), axis=1) + 1e-9
    y0, y1, y2 = hs[rows, i - 1], hs[rows, i], hs[rows, i + 1]
    den = y0 - 2 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den > 0, np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5), 0.0)
        inside = (idx > left[:, None]) & (idx < right[:, None])
        wgt = np.where(inside, np.maximum(-hs - (depth / 2)[:, None], 0), 0)
        cen = (wgt * idx).sum(axis=1) / wgt.sum(axis=1)
    pos = np.where((fwhm > 4) & np.isfinite(cen), cen, i + off)
    return pos, depth / noise, fwhm


def measure(
    image: np.ndarray,
    grid: GridModel,
    kx: np.ndarray,
    ky: np.ndarray,
    centres: np.ndarray,
    *,
    half: int,
    along: int,
    search: float,
    min_snr: float,
    polarity: float,
    threads: int = 1,
) -> Measurements:
    """Locate the two lines through each sampled crossing.

    For each line the window is de-rotated into a ``(2*half+1)`` px wide
    strip across the line and ``(2*along+1)`` px along it; its mean along the
    line is a profile whose dip is the line. ``half`` must stay below the
    spacing to the next parallel line. Windows are read and de-rotated on
    ``threads`` threads (OpenCV and numpy release the GIL).
    """
    a = math.radians(grid.angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    reach = window_reach(half, along)
    if isinstance(image, np.ndarray):  # a memory map as a plain view: no copy, and no np.memmap per window slice
        image = image.view(np.ndarray)
    h, w = image.shape[:2]
    n = len(centres)
    prof = np.zeros((2 * n, 2 * half + 1), np.float32)
    read = np.zeros(2 * n, bool)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    # lines are dark (polarity > 0): bright structure (nuclei) is capped at the strip's mean, which removes
    # most texture noise; for bright lines the image is negated, which is the same as flooring dark
    # structure at the mean and negating the profile (exact in floating point, and one pass less)
    cap = cv2.min if polarity >= 0 else cv2.max
    sign = np.float32(1.0 if polarity >= 0 else -1.0)

    def one(t: int) -> None:
        cx, cy = centres[t]
        x0, y0 = round(cx) - reach, round(cy) - reach
        if x0 < 0 or y0 < 0 or x0 + 2 * reach + 1 > w or y0 + 2 * reach + 1 > h:
            return
        px, py = cx - x0, cy - y0
        for fam, (bw, bh) in enumerate(((half, along), (along, half))):
            # only the strip's bounding box (plus the interpolation's margin of 2 px) is read and converted
            ex, ey = abs(ca) * bw + abs(sa) * bh + 2, abs(sa) * bw + abs(ca) * bh + 2
            sx0, sy0 = max(0, math.floor(px - ex)), max(0, math.floor(py - ey))
            sx1, sy1 = min(2 * reach + 1, math.ceil(px + ex) + 1), min(2 * reach + 1, math.ceil(py + ey) + 1)
            # (a contiguous copy first: numpy converts a strided block of a large image at half the speed)
            win = np.ascontiguousarray(to_grey(np.asarray(image[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1])))
            win = win.astype(np.float32)
            qx, qy = px - sx0, py - sy0
            # dst (i, j) -> src = (qx, qy) + R(a) @ (j - bw, i - bh): chip axes become array axes. Every
            # sample lies inside the box, so the border mode never applies; OpenCV (5.x) interpolates
            # at exact positions with BORDER_REPLICATE (1/32 px steps with BORDER_REFLECT, and slower)
            m = np.array([[ca, -sa, qx - ca * bw + sa * bh], [sa, ca, qy - sa * bw - ca * bh]], np.float32)
            d = cv2.warpAffine(win, m, (2 * bw + 1, 2 * bh + 1), flags=flags, borderMode=cv2.BORDER_REPLICATE)
            cap(d, cv2.mean(d)[0], dst=d)
            # x-family line: a column of the tall strip; y-family: a row of the wide one
            s = cv2.reduce(d, 0 if fam == 0 else 1, cv2.REDUCE_SUM, dtype=cv2.CV_32F).ravel()
            prof[2 * t + fam] = s * (sign / np.float32(d.shape[fam]))
        read[2 * t : 2 * t + 2] = True

    if threads > 1 and n >= 16:
        with single_threaded_cv2(), ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(one, range(n)))
    else:
        for t in range(n):
            one(t)
    if n:
        pos, snr, width = _dips(prof, half, search)
    else:
        pos, snr, width = np.zeros(0), np.zeros(0), np.zeros(0)
    snr = np.where(read, snr, 0.0)
    off = pos - half
    axis = np.tile([0, 1], n)
    index = np.empty(2 * n, np.int64)
    index[0::2], index[1::2] = kx, ky
    cen = np.repeat(np.asarray(centres, float).reshape(-1, 2), 2, axis=0)
    ok = read & (snr >= min_snr) & np.isfinite(pos)
    dx = np.where(axis == 0, ca * off, -sa * off)
    dy = np.where(axis == 0, sa * off, ca * off)
    point = np.where(ok[:, None], cen + np.column_stack([dx, dy]), np.nan)
    width = np.where(read, width, np.nan)
    return Measurements(point, axis, index, cen, snr, width)


@dataclass(frozen=True)
class GridFit:
    grid: GridModel
    residual: np.ndarray  # px, per measurement (NaN where not found)
    inlier: np.ndarray


def _solve_family(pts: np.ndarray, target: np.ndarray, w: np.ndarray) -> np.ndarray:
    a = np.column_stack([pts[:, 0], pts[:, 1], np.ones(len(pts))])
    sol, *_ = np.linalg.lstsq(a * w[:, None], target * w, rcond=None)
    result: np.ndarray = sol
    return result


def fit_grid(meas: Measurements, grid: GridModel, *, inlier_px: float) -> GridFit | None:
    """Refit angle, scales and origin to the measurements (robust, iterated least squares).

    Each family is fitted as an affine function of image position, the angle
    is their count-weighted mean (the grid is square), then the scales and
    offsets are refitted with that angle fixed. Measurements further than
    ``inlier_px`` (shrinking from 3x) from the fit are dropped between rounds.
    """
    found = meas.found
    chip_pos = grid.line_positions(meas.index)
    inlier = found.copy()
    cur = grid
    for it in range(5):
        limit = inlier_px * (3.0 if it == 0 else 2.0 if it == 1 else 1.0)
        res = _residuals(cur, meas, chip_pos)
        inlier = found & (np.abs(res) <= max(limit, 1e-6))
        fams = [inlier & (meas.axis == f) for f in (0, 1)]
        if min(int(f.sum()) for f in fams) < 3:
            return None
        angles, weights = [], []
        for f, sel in enumerate(fams):
            a, b, _ = _solve_family(meas.point[sel], chip_pos[sel], np.ones(int(sel.sum())))
            # x-family: u ~ (cos t, sin t)/sx ; y-family: v ~ (-sin t, cos t)/sy
            ang = math.atan2(b, a) if f == 0 else math.atan2(-a, b)
            angles.append(ang)
            weights.append(float(sel.sum()))
        ang = math.atan2(
            sum(w * math.sin(t) for t, w in zip(angles, weights, strict=False)),
            sum(w * math.cos(t) for t, w in zip(angles, weights, strict=False)),
        )
        ca, sa = math.cos(ang), math.sin(ang)
        coefs = []
        for f, sel in enumerate(fams):
            p = meas.point[sel]
            proj = p[:, 0] * ca + p[:, 1] * sa if f == 0 else -p[:, 0] * sa + p[:, 1] * ca
            a = np.column_stack([proj, np.ones(len(proj))])
            (inv_s, c), *_ = np.linalg.lstsq(a, chip_pos[sel], rcond=None)
            if inv_s <= 0:
                return None
            coefs.append((1.0 / inv_s, c))
        (sx, cu), (sy, cv) = coefs
        # origin: u = 0 and v = 0 -> proj_x = -cu * sx, proj_y = -cv * sy
        px, py = -cu * sx, -cv * sy
        ox, oy = ca * px - sa * py, sa * px + ca * py
        cur = GridModel(grid.template, math.degrees(ang), (float(sx), float(sy)), (float(ox), float(oy)))
    res = _residuals(cur, meas, chip_pos)
    inlier = found & (np.abs(res) <= inlier_px)
    return GridFit(cur, res, inlier)


def _residuals(grid: GridModel, meas: Measurements, chip_pos: np.ndarray) -> np.ndarray:
    """Signed distance (px) of each measured point from its line under ``grid``."""
    uv = grid.image_to_chip(meas.point[:, 0], meas.point[:, 1])
    s = np.where(meas.axis == 0, grid.scale[0], grid.scale[1])
    got = np.where(meas.axis == 0, uv[:, 0], uv[:, 1])
    result: np.ndarray = (got - chip_pos) * s
    return result
