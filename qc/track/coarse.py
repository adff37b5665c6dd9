"""Coarse track-grid search on a downsampled image (internal to :mod:`qc.track`).

Steps: line evidence (a morphological top-hat) at full resolution, area-mean
reduced in strips (no full-resolution float copy), broad structure removed
and local contrast normalised, the grid
angle from the power spectrum (straight lines concentrate their energy on a
ray through the origin, perpendicular to the lines), then per axis a 1-D
profile (the image averaged along the lines) whose dips are matched to the
template's line spacing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np

from qc.chip import ChipTemplate

__all__ = [
    "AxisFit",
    "SpectrumBins",
    "estimate_angle",
    "find_dips",
    "fit_axis",
    "line_dips",
    "line_kernel",
    "normalise",
    "profiles",
    "reduce_lines",
    "single_threaded_cv2",
    "spectrum_bins",
]

_LINE_STRIP_BYTES = 24 << 20  # bytes of a strip's grey copy while reducing line evidence


def to_grey(block: np.ndarray) -> np.ndarray:
    """A 2-D block as is, an RGB(A) block as luma; dtype preserved."""
    if block.ndim == 2:
        return block
    block = np.ascontiguousarray(block[..., :3])
    if block.dtype not in (np.uint8, np.uint16, np.float32):
        block = block.astype(np.float32)
    return cv2.cvtColor(block, cv2.COLOR_RGB2GRAY)


def line_kernel(scale_max: float) -> int:
    """Side (odd, px) of the square structuring element that spans the widest track line.

    Lines are about 3 DNB wide; up to 4 DNB at the largest accepted scale are
    covered, with a pixel of margin on each side.
    """
    return 2 * math.ceil((4.0 * max(scale_max, 0.25) + 2.0) / 2.0) + 1


def _block_sum(d: np.ndarray, f: int, wc: int, acc: type[np.generic] | None = None) -> np.ndarray:
    """Sums over the ``f x f`` blocks of the first ``wc`` block columns of ``d``; float32.

    ``d`` is C-contiguous with a height that is a multiple of ``f``; rows are
    summed first (contiguous, cheap), then the columns of the much smaller result.
    ``acc`` overrides the type the rows are summed in (when the caller knows ``f`` of
    its values cannot overflow it).
    """
    if acc is None:
        acc = np.uint16 if d.dtype == np.uint8 and f <= 257 else np.float64 if d.dtype.kind == "f" else np.uint32
    rows: np.ndarray = np.add.reduce(d.reshape(-1, f, d.shape[1]), axis=1, dtype=acc)[:, : wc * f].astype(np.float32)
    if f == 1:
        return rows
    result: np.ndarray = cv2.resize(rows, (wc, rows.shape[0]), interpolation=cv2.INTER_AREA) * np.float32(f)
    return result


def _half(block: np.ndarray) -> np.ndarray:
    """Sums of 2 x 2 pixel blocks (a trailing odd row or column dropped), exact: uint16 for uint8, else float32."""
    hb, wb = block.shape[0] // 2 * 2, block.shape[1] // 2 * 2
    # pairs of rows in OpenCV (SIMD, 3x numpy's speed with the widening), then pairs of columns
    rows = cv2.add(block[0:hb:2, :wb], block[1:hb:2, :wb], dtype=cv2.CV_16U if block.dtype == np.uint8 else cv2.CV_32F)
    result: np.ndarray = np.add(rows[:, 0::2], rows[:, 1::2])
    return result


def _area(d: np.ndarray, nr: int, wc: int) -> np.ndarray:
    """Area mean of ``d`` resampled to ``nr x wc`` (any ratio); float32."""
    result: np.ndarray = cv2.resize(d.astype(np.float32), (wc, nr), interpolation=cv2.INTER_AREA)
    return result


def reduce_lines(
    image: np.ndarray, factor: int, *, kernel: int, polarities: tuple[str, ...] = ("dark",), threads: int = 1
) -> dict[str, np.ndarray]:
    """Track-line evidence at full resolution, area-mean reduced by ``factor``; float32 (H//f, W//f) each.

    The image is first smoothed with a 3 px box (sensor noise). For
    ``"dark"`` lines the evidence is the black top-hat (morphological
    closing with a ``kernel`` px square, minus the image): thin dark features
    narrower than the kernel stand out by their depth, while everything broader
    (FOV brightness steps, vignetting, the surface's mottle, tissue, debris)
    gives nothing. ``"bright"`` uses the white top-hat. ``"mean"`` is the
    (smoothed) image itself, area-mean reduced: lines broader than the kernel
    (heavily blurred ones) survive only there. Averaging the evidence
    instead of the image keeps a line a few grey levels deep visible however
    large ``factor`` is; in the plain image mean it would sink below the seams.
    The image is read once, in row strips with a halo, one strip per thread.

    From ``factor`` 4 up, the smoothing and the top-hat run on 2 x 2 block
    sums (exact, no rounding) with a kernel of about half the size: a 3 px
    line still fills at least one half-resolution pixel, so its depth over
    the noise is what the 3 px box at full resolution gave, for a quarter of
    the pixels (the top-hat is most of the detection's time on a large chip).
    """
    h, w = image.shape[:2]
    f, k = int(factor), int(kernel)
    hc, wc = h // f, w // f
    out = {pol: np.empty((hc, wc), np.float32) for pol in polarities}
    pre = 2 if f >= 4 else 1
    ks = (k // 2 + 2) | 1 if pre == 2 else k
    se = cv2.getStructuringElement(cv2.MORPH_RECT, (ks, ks))
    halo = pre * (ks // 2 + 2)
    row_bytes = w * max(4, image.dtype.itemsize * (image.shape[2] if image.ndim == 3 else 1))
    step = pre * f
    rows = max(step, (_LINE_STRIP_BYTES // max(row_bytes, 1)) // step * step)
    area = np.float32(1.0 / (f * f))

    def work(r0: int) -> None:
        r1 = min(r0 + rows, hc * f)
        a0, a1 = max(0, r0 - halo), min(h, r1 + halo)
        block = to_grey(np.asarray(image[a0:a1]))  # whole rows: contiguous in a memory map
        if block.dtype not in (np.uint8, np.uint16, np.float32):
            block = block.astype(np.float32)
        if pre == 2:
            block = _half(block)  # a0 and r0 are even: half row i is full rows a0 + 2i, a0 + 2i + 1
        # a 3 px box first: sensor noise drops threefold, a line (3 DNB wide) keeps most of its depth,
        # and the top-hat no longer picks up the noise's extremes (lines under noise of twice their depth stay found)
        block = cv2.blur(block, (3, 3))
        for pol in polarities:
            if pol == "mean":
                d = block
            else:
                op = cv2.MORPH_CLOSE if pol == "dark" else cv2.MORPH_OPEN
                m = cv2.morphologyEx(block, op, se)  # default border: neutral, and 3x faster than replicate
                d = cv2.subtract(m, block) if pol == "dark" else cv2.subtract(block, m)
            if pre == 1:
                out[pol][r0 // f : r1 // f] = _block_sum(d[r0 - a0 : r1 - a0], f, wc) * area
            elif f % 2 == 0:  # whole half-resolution blocks
                g, y0 = f // 2, (r0 - a0) // 2
                # top-hats of 2 x 2 sums of uint8 stay under 1021: g rows of them fit in uint16
                acc = np.uint16 if d.dtype == np.uint16 and 1020 * g <= 65535 else None
                part = d[y0 : y0 + (r1 - r0) // 2]
                out[pol][r0 // f : r1 // f] = _block_sum(part, g, wc, acc) * np.float32(0.25 / (g * g))
            else:
                y0, y1 = (r0 - a0) // 2, (r1 - a0 + 1) // 2
                x1 = min(d.shape[1], (wc * f + 1) // 2)
                out[pol][r0 // f : r1 // f] = _area(d[y0:y1, :x1], (r1 - r0) // f, wc) * np.float32(0.25)

    starts = range(0, hc * f, rows)
    if threads > 1 and len(starts) > 1:
        with single_threaded_cv2(), ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(work, starts))
    else:
        for r0 in starts:
            work(r0)
    return out


@contextmanager
def single_threaded_cv2() -> Iterator[None]:
    """OpenCV on one thread inside: for work already spread over threads of our own.

    OpenCV's own threads inside each of ours oversubscribe the cores (on 2 cores
    the top-hat strips took 1.6 times the CPU).
    """
    old = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(old)


def line_dips(evidence: np.ndarray, factor: int, kernel: int) -> np.ndarray:
    """Reduced line evidence -> an image where lines are narrow dips on a flat ground.

    What is left of broad structure in the evidence (where the noise level
    changes, at FOV seams or tissue edges, it steps) is removed by a white
    top-hat at the coarse scale, sized to keep every line (the kernel's width
    after reduction, plus a pixel each side).
    """
    kc = 2 * math.ceil(kernel / (2.0 * factor)) + 3
    se = cv2.getStructuringElement(cv2.MORPH_RECT, (kc, kc))
    opened = cv2.morphologyEx(evidence, cv2.MORPH_OPEN, se, borderType=cv2.BORDER_REPLICATE)
    result: np.ndarray = np.subtract(opened, evidence, out=opened)
    return result


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Approximate Gaussian blur: two box filters of matching variance (O(1) per pixel)."""
    b = max(3, round(math.sqrt(6.0 * sigma * sigma + 1.0)) | 1)
    out = cv2.blur(a, (b, b), borderType=cv2.BORDER_REFLECT)
    return cv2.blur(out, (b, b), borderType=cv2.BORDER_REFLECT)


def normalise(g: np.ndarray, *, sigma: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Flatten illumination and equalise local contrast; returns (normalised, valid mask).

    Each pixel becomes its difference from the local mean divided by the local
    RMS difference, clipped to [-5, 3] so bright nuclei do not dominate (track
    lines are dark). Pixels of a flat region (zero variance) are invalid.
    """
    hp = g - _blur(g, sigma)
    rms = _blur(hp * hp, sigma)
    np.maximum(rms, 0, out=rms)
    np.sqrt(rms, out=rms)
    floor = max(float(np.median(rms)) * 1e-3, 1e-6)
    valid = rms > floor
    np.maximum(rms, floor, out=rms)
    n = np.divide(hp, rms, out=hp)
    del rms
    n[~valid] = 0
    np.clip(n, -5, 3, out=n)
    return n.astype(np.float32, copy=False), valid


_RINGS = 256  # radius bins of the spectrum's whitening
_ANGLE_BINS = 1800  # 0.05 degree bins of angle mod 90


@dataclass(frozen=True)
class SpectrumBins:
    """Where the frequencies of an image's half spectrum fall, for :func:`estimate_angle`.

    Depends only on the image's shape, so the polarities searched on the same
    reduced evidence share one. ``band`` (h, w // 2 + 1) marks the frequencies
    used; ``ring`` and ``angle`` are the radius and angle bin of each of them,
    ``ring_count`` and ``angle_count`` how many fall in each bin.
    """

    shape: tuple[int, int]
    band: np.ndarray
    ring: np.ndarray
    ring_count: np.ndarray
    angle: np.ndarray
    angle_count: np.ndarray


@functools.lru_cache(maxsize=2)
def spectrum_bins(h: int, w: int) -> SpectrumBins:
    """The :class:`SpectrumBins` of an ``h x w`` image (read-only arrays).

    Kept for the last two sizes (a 2048^2 view's take 16 MB): every FOV of a tile set has the same size, and
    live QC and the final QC's per-FOV checks ask for it once per tile (12 ms for a 2048^2 tile's 2x-reduced
    view: 126 -> 105 ms of CPU a tile in bench_fov_checks' tiles).
    """
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    r = np.sqrt(fx * fx + fy * fy)
    band = (r > 0.02) & (r < 0.45)
    rbin = np.minimum((r / 0.5 * _RINGS).astype(np.int32), _RINGS - 1)[band]
    ang = np.degrees(np.arctan2(np.broadcast_to(fy, r.shape)[band], np.broadcast_to(fx, r.shape)[band])) % 90.0
    abin = np.minimum((ang * (_ANGLE_BINS / 90.0)).astype(np.int32), _ANGLE_BINS - 1)
    arrays = (band, rbin, np.bincount(rbin, minlength=_RINGS), abin, np.bincount(abin, minlength=_ANGLE_BINS))
    for a in arrays:
        a.setflags(write=False)  # shared by every caller of this size
    return SpectrumBins((h, w), *arrays)


def estimate_angle(n: np.ndarray, *, peaks: int = 3, bins: SpectrumBins | None = None) -> list[tuple[float, float]]:
    """Candidate grid angles (deg, in (-45, 45]) from the power spectrum, best first.

    The spectrum is whitened ring by ring (each radius divided by its mean
    power), so isotropic texture is flat and the lines' rays stand out; the
    mean whitened power per 0.05 degree bin of ``angle mod 90`` peaks at the
    grid angle. Returns up to ``peaks`` (angle, prominence) pairs, prominence
    in robust standard deviations of the angular histogram. ``bins``: the
    :func:`spectrum_bins` of ``n``'s shape, when the caller has them.
    """
    h, w = n.shape
    if bins is None or bins.shape != (h, w):
        bins = spectrum_bins(h, w)
    wy = np.hanning(h).astype(np.float32)
    wx = np.hanning(w).astype(np.float32)
    x = n - np.float32(n.mean())
    x *= wy[:, None]
    x *= wx[None, :]
    # OpenCV's float32 transform (scipy.fft alone costs about a second of imports in a fresh process);
    # only the non-negative x frequencies are kept, as a real FFT gives them
    spec: np.ndarray = cv2.dft(x, flags=cv2.DFT_COMPLEX_OUTPUT)[:, : w // 2 + 1]
    del x
    power: np.ndarray = np.square(spec[..., 0])
    power += np.square(spec[..., 1])
    del spec
    pw = power[bins.band]
    ring = np.bincount(bins.ring, weights=pw, minlength=_RINGS) / np.maximum(bins.ring_count, 1)
    white = np.minimum(pw / np.maximum(ring[bins.ring], 1e-20), 50.0)
    nb = _ANGLE_BINS
    hist = np.bincount(bins.angle, weights=white, minlength=nb) / np.maximum(bins.angle_count, 1)
    # circular smoothing over ~0.15 degree
    k = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    k /= k.sum()
    hs = np.convolve(np.concatenate([hist[-6:], hist, hist[:6]]), k, mode="same")[6:-6]
    med = float(np.median(hs))
    mad = float(np.median(np.abs(hs - med))) + 1e-12
    out: list[tuple[float, float]] = []
    work = hs.copy()
    for _ in range(peaks):
        i = int(np.argmax(work))
        y0, y1, y2 = hs[(i - 1) % nb], hs[i], hs[(i + 1) % nb]
        den = y0 - 2 * y1 + y2
        off = 0.5 * (y0 - y2) / den if den < 0 else 0.0
        angle = ((i + 0.5 + off) * 90.0 / nb) % 90.0
        if angle > 45.0:
            angle -= 90.0
        out.append((angle, (float(y1) - med) / mad))
        work[np.abs((np.arange(nb) - i + nb // 2) % nb - nb // 2) <= 10] = -np.inf  # +-0.5 degree
    return out


def _rotate(n: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate so the grid's axes align with the array's; returns (image, 2x3 matrix)."""
    h, w = n.shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    out = cv2.warpAffine(n, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, m


def profiles(
    n: np.ndarray, valid: np.ndarray, angle: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean of the de-rotated image along columns and rows.

    Returns (profile_x, count_x, profile_y, count_y, matrix): ``profile_x[i]``
    is the mean over valid pixels of column ``i`` of the de-rotated image
    (x-family lines are dips in it), ``count_x`` the number of valid pixels.
    """
    rot, m = _rotate(n, angle)
    vrot = cv2.warpAffine(valid.view(np.uint8), m, (n.shape[1], n.shape[0]), flags=cv2.INTER_NEAREST)
    cx = vrot.sum(axis=0, dtype=np.float64)
    cy = vrot.sum(axis=1, dtype=np.float64)
    px = rot.sum(axis=0) / np.maximum(cx, 1.0)
    py = rot.sum(axis=1) / np.maximum(cy, 1.0)
    return px, cx, py, cy, m


def _highpass(p: np.ndarray, sigma: float) -> np.ndarray:
    r = int(3 * sigma) + 1
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(p, r, mode="reflect")
    return p - np.convolve(pad, k, mode="same")[r:-r]


def _smooth(p: np.ndarray, sigma: float) -> np.ndarray:
    result: np.ndarray = p - _highpass(p, sigma)
    return result


@dataclass(frozen=True)
class Dips:
    """Dark dips of a profile: sub-pixel positions, strengths (in noise units), noise, valid range."""

    pos: np.ndarray
    strength: np.ndarray
    noise: float
    lo: float
    hi: float


def find_dips(p: np.ndarray, count: np.ndarray, *, min_snr: float = 4.0, nms: int = 2) -> Dips:
    """Local minima of the high-passed, lightly smoothed profile deeper than ``min_snr`` noise."""
    ok = count > 0.3 * count.max()
    idx = np.flatnonzero(ok)
    lo, hi = (float(idx[0]), float(idx[-1])) if idx.size else (0.0, 0.0)
    hs = _smooth(_highpass(p, 8.0), 0.7)
    hs[~ok] = 0.0
    vals = hs[ok]
    med = float(np.median(vals)) if vals.size else 0.0
    noise = 1.4826 * float(np.median(np.abs(vals - med))) + 1e-9 if vals.size else 1.0
    hs = hs - med
    cand = np.flatnonzero(ok[1:-1] & (hs[1:-1] < -min_snr * noise)) + 1
    keep: list[int] = []
    for i in cand[np.argsort(hs[cand])]:
        if all(abs(i - j) > nms for j in keep):
            keep.append(int(i))
    keep.sort()
    pos, strength = [], []
    for i in keep:
        y0, y1, y2 = hs[i - 1], hs[i], hs[i + 1]
        if not (y1 <= y0 and y1 <= y2):
            continue
        den = y0 - 2 * y1 + y2
        off = 0.5 * (y0 - y2) / den if den > 0 else 0.0
        pos.append(i + off)
        strength.append(-y1 / noise)
    return Dips(np.asarray(pos, float), np.asarray(strength, float), noise, lo, hi)


@dataclass(frozen=True)
class AxisFit:
    """Template placed on one profile: ``position(u) = phase + scale * u`` (profile px, u in DNB)."""

    scale: float
    phase: float
    expected: int  # template lines inside the profile's valid range
    score: float  # summed dip strength at the predicted lines (noise units)
    dips: int  # strong dips found in the profile
    explained: int  # of those, how many a template line accounts for


def _lines_in(tmpl: ChipTemplate, scale: float, phase: float, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices and profile positions of the template lines at ``phase + scale * u`` inside ``[lo, hi]``."""
    k = tmpl.line_indices((lo - phase) / scale, (hi - phase) / scale)
    return k, phase + scale * tmpl.line_positions(k)


def _match(dpos: np.ndarray, x: np.ndarray, tol: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """For each predicted x, the nearest dip index and whether it is within tol."""
    j = np.clip(np.searchsorted(dpos, x), 1, len(dpos) - 1) if len(dpos) > 1 else np.zeros(len(x), int)
    if len(dpos) > 1:
        left = np.abs(dpos[j - 1] - x) < np.abs(dpos[j] - x)
        j = np.where(left, j - 1, j)
    d = np.abs(dpos[j] - x) if len(dpos) else np.full(len(x), np.inf)
    return j, d <= tol


def fit_axis(dips: Dips, tmpl: ChipTemplate, scale_range: tuple[float, float], *, tol: float = 1.5) -> AxisFit | None:
    """Place the template on a profile's dips (scale in profile px per DNB within ``scale_range``).

    Hypotheses come from pairs of nearby dips read as 1-3 consecutive template
    intervals; each is scored by the dips it predicts (with a tolerance that
    grows with distance from the pair, as the pair's scale is uncertain), the
    best are refined by least squares, and the winner is the one whose
    predicted lines sit on the deepest profile values.
    """
    pos = dips.pos
    if pos.size < 3:
        return None
    # cap each dip's weight so a few very dark features cannot outvote the grid
    st = np.minimum(dips.strength, 3.0 * float(np.median(dips.strength)))
    offs = np.asarray(tmpl.offsets, float)
    q = np.asarray(tmpl.positions, float)
    n9 = len(offs)
    s_lo, s_hi = scale_range
    hs_, hp_, ha_, hr_ = [], [], [], []
    for k in (1, 2, 3):
        if pos.size <= k:
            break
        d = pos[k:] - pos[:-k]
        for j in range(n9):
            for m in (1, 2, 3):
                span = sum(offs[(j + t) % n9] for t in range(m))
                s = d / span
                ok = (s >= s_lo) & (s <= s_hi)
                hs_.append(s[ok])
                hp_.append(pos[:-k][ok] - s[ok] * q[j])
                ha_.append(pos[:-k][ok])
                hr_.append(1.0 / d[ok])  # relative scale uncertainty of the pair
    if not hs_:
        return None
    hs, hph, ha, hr = (np.concatenate(v) for v in (hs_, hp_, ha_, hr_))
    if hs.size == 0:
        return None
    score = _score_hypotheses(pos, st, tmpl, hs, hph, ha, hr, tol, dips.lo, dips.hi)
    order = np.argsort(-score)
    scored = [
        (float(score[i]), float(hs[i]), float(hph[i]), float(ha[i]), float(hr[i])) for i in order[:300] if score[i] > 0
    ]
    if not scored:
        return None
    best: AxisFit | None = None
    tried: list[tuple[float, float]] = []
    for _, s, phase, anchor, rel in scored:
        # many dip pairs propose the same placement: refine each distinct one once
        per = s * tmpl.period
        if any(abs(s / s2 - 1) < 0.003 and abs((phase - p2 + per / 2) % per - per / 2) < 2 * tol for s2, p2 in tried):
            continue
        tried.append((s, phase))
        fit = _refine(dips, tmpl, s, phase, anchor, rel, tol, scale_range)
        if fit is not None and (best is None or fit.score > best.score):
            best = fit
        if len(tried) >= 25:
            break
    return best


def _score_hypotheses(
    pos: np.ndarray, st: np.ndarray, tmpl: ChipTemplate, s: np.ndarray, phase: np.ndarray,
    anchor: np.ndarray, rel: np.ndarray, tol: float, lo: float, hi: float,
) -> np.ndarray:  # fmt: skip
    """Summed strength of the dips each hypothesis predicts (vectorised, in scale-sorted chunks)."""
    n9 = len(tmpl.offsets)
    p = float(tmpl.period)
    out = np.zeros(s.size)
    order = np.argsort(s)
    step = 2048
    for c0 in range(0, s.size, step):
        idx = order[c0 : c0 + step]
        ss, ph = s[idx], phase[idx]
        kmax = math.ceil((hi - lo) / (ss.min() * min(tmpl.offsets))) + 2 * n9 + 2
        k0 = (np.floor((lo - ph) / ss / p).astype(np.int64) - 1) * n9
        k = k0[:, None] + np.arange(kmax)[None, :]
        x = ph[:, None] + ss[:, None] * tmpl.line_positions(k)
        inside = (x >= lo) & (x <= hi)
        j = np.clip(np.searchsorted(pos, x), 1, pos.size - 1)
        left = np.abs(pos[j - 1] - x) < np.abs(pos[j] - x)
        j = np.where(left, j - 1, j)
        # only where the pair's scale uncertainty keeps the tolerance under a
        # quarter of the narrowest spacing: beyond that any comb would match
        dist = np.abs(x - anchor[idx, None])
        t = tol + dist * rel[idx, None]
        local = dist <= np.maximum((0.25 * ss * min(tmpl.offsets) - tol) / rel[idx], 0)[:, None]
        hit = inside & local & (np.abs(pos[j] - x) <= t)
        cnt = hit.sum(axis=1)
        out[idx] = np.where(cnt >= 3, (st[j] * hit).sum(axis=1), 0.0)
    return out


def _refine(
    dips: Dips, tmpl: ChipTemplate, s: float, phase: float, anchor: float, rel: float, tol: float,
    scale_range: tuple[float, float],
) -> AxisFit | None:  # fmt: skip
    """Least-squares refinement grown outwards from the anchor pair, then scored.

    The matched window starts where the pair's scale is trustworthy and
    doubles after each fit until it spans the profile. The score rewards dips
    explained and penalises predicted lines where the profile has none:
    ``sum of capped dip strengths at hits * hits / predicted``.
    """
    pos = dips.pos
    radius = max((0.25 * s * min(tmpl.offsets) - tol) / rel, 2.5 * s * max(tmpl.offsets))
    full = max(anchor - dips.lo, dips.hi - anchor)
    while True:
        a, b = max(dips.lo, anchor - radius), min(dips.hi, anchor + radius)
        k, x = _lines_in(tmpl, s, phase, a, b)
        if k.size < 3:
            return None
        j, ok = _match(pos, x, tol)
        if ok.sum() < 3:
            return None
        u = tmpl.line_positions(k[ok])
        sol, *_ = np.linalg.lstsq(np.vstack([np.ones_like(u), u]).T, pos[j[ok]], rcond=None)
        phase, s = float(sol[0]), float(sol[1])
        if not (0.8 * scale_range[0] <= s <= 1.2 * scale_range[1]):
            return None
        if radius >= full:
            break
        radius *= 2
    k, x = _lines_in(tmpl, s, phase, dips.lo, dips.hi)
    j, ok = _match(pos, x, tol)
    hits = np.unique(j[ok])
    cap = 3.0 * float(np.median(dips.strength))
    score = float(np.minimum(dips.strength[hits], cap).sum()) * ok.sum() / max(k.size, 1)
    return AxisFit(s, phase, int(k.size), score, int(pos.size), int(hits.size))
