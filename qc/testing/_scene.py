"""Rendering internals of the synthetic chip generator (see :mod:`qc.testing.chips`).

A :class:`Scene` defines the pixels of a synthetic chip everywhere (and a
margin around it, so IF images can be shifted): a mosaic of real stain crops,
tissue blobs, the chip surface, track lines, illumination. :meth:`Scene.finish`
renders any band of rows, so images are produced strip by strip.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from qc.chip import template_for
from qc.testing._acquisition import Debris, FovField
from qc.track import GridModel

__all__ = ["MAX_IF_OFFSET", "STRIP", "Mosaic", "Scene", "load_crops", "quantise", "upsample"]

STRIP = 512  #: rows rendered at a time; noise is seeded per strip
_TISSUE_F = 32  # low-resolution factor of the tissue field
_SURFACE_F = 8  # low-resolution factor of the chip-surface texture
_CHUNK = 128  # rows processed at a time inside a strip
_NOISE_TILE = (1024, 4096)  # noise is drawn once per image and sampled at random offsets per strip
_PAD = 544  # the scene extends this far beyond the image (room for IF offsets)
MAX_IF_OFFSET = 512.0  #: largest IF offset the scene margin allows, px


@lru_cache(maxsize=8)
def load_crops(data_dir: Path, kind: str) -> tuple[np.ndarray, ...]:
    """Crops of one kind as float32 in [0, 1] (grey HxW or RGB HxWx3)."""
    folder = data_dir / "stereo_crops" / kind / "input"
    files = sorted(folder.glob("*.tif"))
    if not files:
        msg = f"no crops in {folder}; the shared data folder is incomplete"
        raise FileNotFoundError(msg)
    out = []
    for f in files:
        a = tifffile.imread(f).astype(np.float32)
        if a.ndim == 3:
            out.append(np.clip(a / 255.0, 0, 1))
        else:
            lo, hi = np.percentile(a, [0.5, 99.7])
            out.append(np.clip((a - lo) / max(hi - lo, 1.0), 0, 1))
    return tuple(out)


class Mosaic:
    """Crop variants laid edge to edge with narrow cross-faded overlaps.

    Tiles are ``T`` px squares at a pitch of ``T - ov``; each is weighted by a
    window that is 1 inside and ramps as sin^2 over the ``ov`` px at its
    edges, so overlapping ramps sum to exactly 1 (no seams, no brightness
    steps) while most pixels come from a single tile. Variants are the 8
    flips/quarter turns of each crop at three gains, drawn at random per tile.
    """

    def __init__(
        self, crops: tuple[np.ndarray, ...], zoom: float, domain: tuple[int, int, int], rng: np.random.Generator
    ):
        variants = []
        size = max(16, round(crops[0].shape[0] * zoom / 2) * 2)
        ov = max(4, size // 8)
        self.T, self.ov, self.pitch = size, ov, size - ov
        t = np.arange(size, dtype=np.float32)
        w1 = np.ones(size, np.float32)
        w1[:ov] = np.sin(0.5 * np.pi * (t[:ov] + 0.5) / ov) ** 2
        w1[size - ov :] = np.cos(0.5 * np.pi * (t[:ov] + 0.5) / ov) ** 2
        w2 = np.outer(w1, w1)
        for c in crops:
            interp = cv2.INTER_AREA if size < c.shape[0] else cv2.INTER_CUBIC
            c = cv2.resize(c, (size, size), interpolation=interp)
            c = np.clip(c, 0, 1)
            for k in range(8):
                v = np.rot90(c, k % 4)
                if k >= 4:
                    v = v[:, ::-1]
                for gain in (0.85, 1.0, 1.15):
                    weighted = v * gain * (w2 if v.ndim == 2 else w2[..., None])
                    variants.append(np.ascontiguousarray(weighted, dtype=np.float32))
        self.stack = np.stack(variants)
        self.pad, h, w = domain
        self.ni = (h + 2 * self.pad + 2 * ov) // self.pitch + 2
        self.nj = (w + 2 * self.pad + 2 * ov) // self.pitch + 2
        self.index = rng.integers(0, len(variants), size=(self.ni, self.nj))

    def _span(self, lo: int, hi: int, n: int) -> tuple[int, int]:
        """Tile indices ``[first, last]`` whose extent meets scene coordinates ``[lo, hi)``."""
        # tile k covers [k * pitch - pad - ov, k * pitch - pad - ov + T)
        off = self.pad + self.ov
        first = max(0, (lo + off - self.T) // self.pitch + 1)
        last = min(n - 1, (hi - 1 + off) // self.pitch)
        return first, last

    def rows(self, y0: int, y1: int, x0: int, ncols: int) -> np.ndarray:
        """Texture for scene rows ``[y0, y1)`` and columns ``[x0, x0 + ncols)``."""
        T, P, off = self.T, self.pitch, self.pad + self.ov
        j_lo, j_hi = self._span(x0, x0 + ncols, self.nj)
        i_lo, i_hi = self._span(y0, y1, self.ni)
        out = np.zeros((y1 - y0, ncols, *self.stack.shape[3:]), np.float32)
        for i in range(i_lo, i_hi + 1):
            top = i * P - off
            a, b = max(top, y0), min(top + T, y1)
            if a >= b:
                continue
            dst = out[a - y0 : b - y0]
            idx = self.index[i]
            for j in range(j_lo, j_hi + 1):
                left = j * P - off  # scene column of the tile's first column
                c0, c1 = max(left, x0), min(left + T, x0 + ncols)
                if c0 < c1:
                    dst[:, c0 - x0 : c1 - x0] += self.stack[idx[j], a - top : b - top, c0 - left : c1 - left]
        return out


def _smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    f: np.ndarray = rng.standard_normal(shape).astype(np.float32)
    f = cv2.GaussianBlur(f, (0, 0), max(sigma, 0.5), borderType=cv2.BORDER_REFLECT)
    result: np.ndarray = (f - f.mean()) / (f.std() + 1e-12)
    return result


def upsample(field: np.ndarray, f: int, pad: int, y0: int, y1: int, x0: int, ncols: int) -> np.ndarray:
    """Bilinear value of a low-res field (cell f px, domain starting at -pad) at scene pixels."""
    # scene pixel (x, y) sits at field coordinate ((x + pad) + 0.5) / f - 0.5
    ly0 = (y0 + pad) // f - 1
    ly1 = (y1 - 1 + pad) // f + 2
    lx0 = (x0 + pad) // f - 1
    lx1 = (x0 + ncols - 1 + pad) // f + 2
    block = field[max(ly0, 0) : ly1 + 1, max(lx0, 0) : lx1 + 1]
    oy, ox = max(ly0, 0), max(lx0, 0)
    up = cv2.resize(block, (block.shape[1] * f, block.shape[0] * f), interpolation=cv2.INTER_LINEAR)
    r0 = y0 + pad - oy * f
    c0 = x0 + pad - ox * f
    return up[r0 : r0 + (y1 - y0), c0 : c0 + ncols]


class Scene:
    """All pixels of one synthetic chip, from its parameters (see ``chips._params``).

    ``related_seed`` replaces the seed of the texture, tissue and surface
    (IF images of the same tissue use the nuclear image's seed).
    """

    def __init__(self, p: dict[str, Any], data_dir: Path, related_seed: int | None = None):
        self.p = p
        self.W, self.H = p["width"], p["height"]
        pad = self.pad = _PAD
        ss = np.random.SeedSequence(p["seed"] if related_seed is None else related_seed)
        r_tiles, r_tissue, r_surface, r_ill, r_acq = (np.random.default_rng(s) for s in ss.spawn(5))
        sx, sy = p["scale"]
        zoom = math.sqrt(sx * sy)
        stain = p["stain"]
        domain = (pad, self.H, self.W)
        kind = {"DAPI": "DAPI", "ssDNA": "ssDNA", "HE": "HE"}[stain]
        self.mosaic = Mosaic(load_crops(data_dir, kind), zoom, domain, r_tiles)
        self.rgb = stain == "HE"
        # tissue blobs: a smooth field on a coarse grid, thresholded at the asked quantile
        th = (self.H + 2 * pad) // _TISSUE_F + 4
        tw = (self.W + 2 * pad) // _TISSUE_F + 4
        blob = max(th, tw) / 7.0
        self.tissue = _smooth_field((th, tw), blob, r_tissue)
        frac = float(p["tissue_fraction"])
        inner = self.tissue[
            pad // _TISSUE_F : (pad + self.H) // _TISSUE_F, pad // _TISSUE_F : (pad + self.W) // _TISSUE_F
        ]
        if frac <= 0:
            self.tissue_thr = float(self.tissue.max()) + 1.0
        elif frac >= 1:
            self.tissue_thr = float(self.tissue.min()) - 1.0
        else:
            self.tissue_thr = float(np.quantile(inner, 1.0 - frac))
        self.tissue_fraction = float(np.mean(inner > self.tissue_thr)) if inner.size else 0.0
        self.tissue_soft = 0.08
        sh = (self.H + 2 * pad) // _SURFACE_F + 4
        sw = (self.W + 2 * pad) // _SURFACE_F + 4
        self.surface = _smooth_field((sh, sw), 1.5, r_surface)
        self.ill_dir = r_ill.uniform(0, 2 * np.pi)
        self.ill_centre = r_ill.uniform(-0.3, 0.3, size=2)
        self._init_lines()
        self._init_acquisition(r_acq, zoom)
        self.noise_tile = np.random.default_rng([p["seed"], 11]).standard_normal(_NOISE_TILE, dtype=np.float32)

    def _init_lines(self) -> None:
        p = self.p
        sx, sy = p["scale"]
        a = math.radians(p["angle_deg"])
        ox, oy = p["origin_px"]
        # u(x, y) = (cos a (x-ox) + sin a (y-oy)) / sx ; v = (-sin a (x-ox) + cos a (y-oy)) / sy
        self.ua, self.ub = math.cos(a) / sx, math.sin(a) / sx
        self.va, self.vb = -math.sin(a) / sy, math.cos(a) / sy
        self.uc = -(self.ua * ox + self.ub * oy)
        self.vc = -(self.va * ox + self.vb * oy)

    def _init_acquisition(self, rng: np.random.Generator, zoom: float) -> None:
        """FOV gains and vignetting, and debris, when asked for (image coordinates)."""
        p = self.p
        seed_seq = rng.bit_generator.seed_seq
        assert isinstance(seed_seq, np.random.SeedSequence)  # default_rng makes one
        fov_rng, debris_rng = (np.random.default_rng(s) for s in seed_seq.spawn(2))
        self.fovs = None
        if p["fov_px"] > 0 and (p["fov_gain"] > 0 or p["vignetting"] > 0):
            self.fovs = FovField(self.W, self.H, p["fov_px"], p["fov_gain"], p["vignetting"], fov_rng)
        self.debris = None
        if p["debris"] > 0:
            r0, r1 = p["debris_radius"]
            self.debris = Debris(self.W, self.H, p["debris"], (r0 * zoom, r1 * zoom), (0.4, 0.9), debris_rng)

    def _line_pixels(self, y0: int, y1: int, x0: int, ncols: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Pixels near track lines and their line cover 0..1, per family.

        Returns ``[(flat_index, value), ...]`` (x family, then y family) into
        the ``(y1 - y0) x ncols`` block. A line of width w covers a pixel by
        ``clip(w/2 + 0.5 - d, 0, 1)``, ``d`` the pixel centre's distance from
        the line in px (a box profile convolved with one pixel).
        """
        w = float(self.p["line_width_px"])
        out: list[tuple[np.ndarray, np.ndarray]] = []
        if w <= 0:
            return out
        sx, sy = self.p["scale"]
        grid = GridModel(template_for(self.p["template"]), self.p["angle_deg"], (sx, sy), self.p["origin_px"])
        ys = np.arange(y0, y1, dtype=np.float64)
        xs = np.arange(x0, x0 + ncols, dtype=np.float64)
        fams = (
            # (coefficient across the lines, along them, constant, scale, lines run along rows?)
            (self.ua, self.ub, self.uc, sx, True),
            (self.vb, self.va, self.vc, sy, False),
        )
        for a_main, a_other, c, s, scan_rows in fams:
            # family coordinate t = a_main * q + a_other * r + c with q the pixel index across
            # the lines and r along them; for each r, line k is centred at q = (t_k - c - a_other r) / a_main
            r = ys if scan_rows else xs
            q_max = ncols if scan_rows else (y1 - y0)
            q0 = x0 if scan_rows else y0
            corners = [a_main * q + a_other * rr + c for q in (q0, q0 + q_max - 1) for rr in (r[0], r[-1])]
            margin = (w / 2 + 2) / s
            ks = grid.line_index_range(min(corners) - margin, max(corners) + margin)
            if ks.size == 0:
                continue
            tk = grid.line_positions(ks)
            reach = math.ceil((w / 2 + 1) / (abs(a_main) * s)) + 1
            centre = (tk[None, :] - c - a_other * r[:, None]) / a_main  # (len(r), n_lines)
            q = np.floor(centre)[..., None].astype(np.int64) + np.arange(-reach, reach + 1)
            dist = np.abs(a_main * q + (a_other * r[:, None, None] + c) - tk[None, :, None]) * s
            val = np.clip(w / 2 + 0.5 - dist, 0, 1).astype(np.float32)
            qi = q - q0
            ri = np.broadcast_to(np.arange(len(r))[:, None, None], q.shape)
            ok = (qi >= 0) & (qi < q_max) & (val > 0)
            flat = ri[ok] * ncols + qi[ok] if scan_rows else qi[ok] * ncols + ri[ok]
            out.append((flat, val[ok]))
        return out

    def _darken_lines(self, img: np.ndarray, m: np.ndarray, y0: int, y1: int, x0: int) -> None:
        """Multiply the pixels near lines by ``1 - contrast * cover * visibility`` (in place).

        Bright lines (``line_polarity="bright"``) use ``1 + ...`` instead. Where
        the two families cross, the stronger of the two applies (not both).
        """
        p, ncols = self.p, img.shape[1]
        c = float(p["line_contrast"]) * (-1.0 if p["line_polarity"] == "bright" else 1.0)
        loss = float(1 - p["tissue_line_visibility"])
        flat_img = img.reshape((y1 - y0) * ncols, -1)
        seen = np.zeros((y1 - y0) * ncols, np.float32)  # cover applied so far (only touched sparsely)
        for flat, val in self._line_pixels(y0, y1, x0, ncols):
            before = seen[flat]
            new = np.maximum(before, val)
            vis = 1 - loss * m.ravel()[flat] if loss > 0 else 1.0
            # a pixel already at 0 (contrast 1) stays 0: guard the division, not the result
            factor = (1 - c * new * vis) / np.maximum(1 - c * before * vis, 1e-6)
            flat_img[flat] *= factor[:, None]
            seen[flat] = new

    def render(self, y0: int, y1: int, x0: int) -> np.ndarray:
        """Float32 signal in full-scale units for scene rows [y0, y1), W columns from x0 (before blur/noise)."""
        p, W = self.p, self.W
        img = self.mosaic.rows(y0, y1, x0, W)
        m = self.tissue_cover(y0, y1, x0, W)
        s = upsample(self.surface, _SURFACE_F, self.pad, y0, y1, x0, W)
        if self.rgb:
            # bright field: glass-like chip surface where there is no tissue
            m3 = m[..., None]
            img *= m3
            if p["background"] is None:
                bg = (1 + 0.03 * s)[..., None] * np.array([0.90, 0.87, 0.91], np.float32)
            else:
                tint = np.array([1.0, 0.966, 1.011], np.float32) * np.float32(p["background"])
                bg = (1 + float(p["mottle"]) * s)[..., None] * tint
            bg *= 1 - m3
            img += bg
        elif p["background"] is None:
            # fluorescence: tissue signal over a dim, slightly textured chip surface
            img *= m
            cv2.addWeighted(img, 0.75, np.ascontiguousarray(s), 0.07 * 0.25, 0.07, dst=img)
        else:
            # as real stitched scans look: a very dark, gently mottled surface
            # and tissue far brighter (tissue_gain > 1 saturates it)
            img *= m
            level = float(p["background"])
            cv2.addWeighted(
                img, float(p["tissue_gain"]), np.ascontiguousarray(s), level * float(p["mottle"]), level, dst=img
            )
        if p["lines"] and p["line_contrast"] > 0:
            self._darken_lines(img, m, y0, y1, x0)
        if self.debris is not None:
            self.debris.apply(img, y0, y1, x0)
        if p["illumination"] > 0:
            img *= self._illumination(y0, y1, x0, W)
        if self.fovs is not None:
            f = self.fovs.rows(y0, y1, x0, W)
            img *= f[..., None] if self.rgb else f
        return img

    def tissue_cover(self, y0: int, y1: int, x0: int, ncols: int) -> np.ndarray:
        """Tissue cover 0..1 at scene pixels (soft-edged blobs)."""
        m = upsample(self.tissue, _TISSUE_F, self.pad, y0, y1, x0, ncols)
        m -= self.tissue_thr
        m *= 1.0 / self.tissue_soft
        m += 0.5
        return np.clip(m, 0, 1, out=m)

    def _illumination(self, y0: int, y1: int, x0: int, ncols: int) -> np.ndarray:
        s = max(self.W, self.H) / 2
        xn = (np.arange(x0, x0 + ncols) - self.W / 2) / s - self.ill_centre[0]
        yn = (np.arange(y0, y1) - self.H / 2) / s - self.ill_centre[1]
        k = self.p["illumination"]
        cx, cy = math.cos(self.ill_dir), math.sin(self.ill_dir)
        col = (0.5 * k * cx * xn - 0.35 * k * xn**2).astype(np.float32)
        row = (0.5 * k * cy * yn - 0.35 * k * yn**2).astype(np.float32)
        f = 1.0 + row[:, None] + col[None, :]
        f = np.maximum(f, 0.05)
        result: np.ndarray = f[..., None] if self.rgb else f
        return result

    def finish(self, y0: int, y1: int, dtype: np.dtype) -> np.ndarray:
        """Image rows [y0, y1): rendered, blurred, exposed, noisy and quantised to ``dtype``.

        Works in chunks of :data:`_CHUNK` rows: arrays stay small enough to be
        reused by the allocator instead of being mapped and faulted in each time.
        """
        sigma = float(self.p["blur_sigma"])
        halo = math.ceil(4 * sigma) if sigma > 0 else 0
        W = self.W
        shape = (y1 - y0, W) + ((3,) if self.rgb else ())
        out = np.empty(shape, dtype)
        noise = None
        if self.p["noise"] > 0:
            rng = np.random.default_rng([self.p["seed"], 12, y0 + 10_000_000])
            noise = _noise_rows(self.noise_tile, y1 - y0, float(self.p["noise"]), rng)
        gain = np.float32(self.p["gain"])
        if halo:
            big = np.empty((y1 - y0 + 2 * halo, W, *shape[2:]), np.float32)
            for r in range(y0 - halo, y1 + halo, _CHUNK):
                r1 = min(r + _CHUNK, y1 + halo)
                big[r - y0 + halo : r1 - y0 + halo] = self.render(r, r1, 0)
            blurred = cv2.GaussianBlur(big, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        for r in range(y0, y1, _CHUNK):
            r1 = min(r + _CHUNK, y1)
            img = blurred[r - y0 + halo : r1 - y0 + halo] if halo else self.render(r, r1, 0)
            img *= gain
            if noise is not None:
                _add_tiled(img, noise[r - y0 : r1 - y0])
            out[r - y0 : r1 - y0] = quantise(img, dtype)
        return out


def _noise_rows(tile: np.ndarray, rows: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``rows`` rows of ``sigma`` * standard normal noise cut from ``tile`` at a random offset."""
    th, tw = tile.shape
    oy, ox = int(rng.integers(th)), int(rng.integers(tw))
    ridx = (np.arange(rows) + oy) % th
    block = np.roll(tile[ridx], -ox, axis=1)
    block *= np.float32(sigma)
    result: np.ndarray = block
    return result


def _add_tiled(img: np.ndarray, block: np.ndarray) -> None:
    """Add ``block`` (rows x n) to ``img`` (rows x W [x 3]), repeated across the width."""
    cols, tw = img.shape[1], block.shape[1]
    for c in range(0, cols, tw):
        part = block[:, : min(tw, cols - c)]
        img[:, c : c + tw] += part[..., None] if img.ndim == 3 else part


def quantise(img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Full-scale float32 -> integer dtype, rounded and clipped (in place on ``img``)."""
    top = float(np.iinfo(dtype).max)
    img *= top
    img += 0.5
    np.clip(img, 0, top, out=img)
    return img.astype(dtype)
