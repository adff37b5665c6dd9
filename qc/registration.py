"""Translation registration primitives shared by stitching and calibration.

Everything here works on two same-size 2-D views of (nominally) the same
scene and answers three questions:

* where is the moving view's content relative to the reference's
  (:func:`phase_correlate`: windowed phase correlation, a band-limited peak,
  sub-pixel refinement by a three-point Gaussian fit);
* how sure is that answer (the peak's height, its ratio to the strongest
  secondary peak, and the normalised cross-correlation of the overlap at the
  found shift, :func:`overlap_ncc`);
* is there anything to register at all (:func:`structure_snr`: band-passed
  signal over the noise level; a flat or pure-noise view carries no
  information, which is not the same as a failed registration).

Sign convention, used throughout imageqc: a shift ``(dx, dy)`` is the
displacement of the moving view's content relative to the reference, i.e.
``moving[y + dy, x + dx] ~= reference[y, x]``. A feature at ``(x, y)`` in
the reference appears at ``(x + dx, y + dy)`` in the moving view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

# scipy.fft is imported by the functions that transform (0.25 s in a fresh process): a tile set whose pairs
# are all in the pair cache, or a mosaic whose tiles do not overlap, never needs it

__all__ = [
    "PeakCandidate",
    "ShiftEstimate",
    "ncc_surface",
    "overlap_ncc",
    "peak_candidates",
    "phase_correlate",
    "structure_snr",
    "to_gray_float",
]

_PEAK_RATIO_CAP = 1000.0


@dataclass(frozen=True)
class ShiftEstimate:
    """The result of :func:`phase_correlate`.

    Attributes
    ----------
    dx, dy : float
        Displacement of the moving view's content relative to the reference,
        in pixels (``moving[y + dy, x + dx] ~= reference[y, x]``).
    peak : float
        Height of the band-limited phase-correlation peak; 1.0 for identical
        content, near 0 for unrelated content.
    peak_ratio : float
        ``peak`` over the strongest other peak in the searched range (outside
        a small exclusion box), capped at 1000. Near 1 means ambiguous:
        noise, a periodic pattern, or one-dimensional structure (a single
        line fixes only the offset across it).
    ncc : float
        Normalised cross-correlation of the two views' overlap at the shift
        rounded to whole pixels, in [-1, 1]; NaN when not computed.
    overlap_fraction : float
        Share of the view's area that overlaps at that shift, in [0, 1].
    at_search_limit : bool
        The peak lies on the edge of a restricted search range: the true
        shift is probably beyond it, and the estimate is not to be trusted.
    """

    dx: float
    dy: float
    peak: float
    peak_ratio: float
    ncc: float
    overlap_fraction: float
    at_search_limit: bool = False


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Return a float32 2-D view of a grey (H, W) or colour (H, W, 3|4) array.

    Colour is reduced to the mean of the first three channels, which keeps
    the structure of any stain without assuming a channel order.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        result: np.ndarray = arr[..., :3].astype(np.float32).mean(axis=2)
        return result
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        msg = f"expected a 2-D grey or HxWx3 colour array, got shape {arr.shape}"
        raise ValueError(msg)
    return arr.astype(np.float32, copy=False)


def _taper(n: int, alpha: float) -> np.ndarray:
    """Tukey window: flat middle, raised-cosine ends over ``alpha * n / 2`` samples each."""
    w = np.ones(n, np.float32)
    edge = int(alpha * n / 2)
    if edge > 0:
        ramp = 0.5 * (1 - np.cos(np.pi * (np.arange(edge) + 0.5) / edge))
        w[:edge] = ramp
        w[n - edge :] = ramp[::-1]
    return w


@lru_cache(maxsize=64)
def _window2d(h: int, w: int, alpha: float) -> np.ndarray:
    out = np.outer(_taper(h, alpha), _taper(w, alpha))
    out.setflags(write=False)
    return out


@lru_cache(maxsize=32)
def _lowpass(ph: int, pw: int, sigma: float) -> tuple[np.ndarray, float]:
    """Gaussian weights on an rfft2 grid, and the peak they give for a match."""
    import scipy.fft as sfft

    fy = sfft.fftfreq(ph).astype(np.float32)
    fx = sfft.rfftfreq(pw).astype(np.float32)
    g = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fy[:, None] ** 2 + fx[None, :] ** 2))
    g = g.astype(np.float32)
    g.setflags(write=False)
    unit_peak = float(sfft.irfft2(g, s=(ph, pw))[0, 0])
    return g, unit_peak


def _shift_limits(max_shift: int | tuple[int, int] | None, h: int, w: int) -> tuple[int, int]:
    if max_shift is None:
        return h // 2 - 1, w // 2 - 1
    if isinstance(max_shift, (int, np.integer)):
        sy = sx = int(max_shift)
    else:
        sy, sx = (int(v) for v in max_shift)
    return max(0, min(sy, h // 2 - 1)), max(0, min(sx, w // 2 - 1))


def _subpixel(left: float, centre: float, right: float) -> float:
    """Offset of a sampled peak's apex from its centre sample, in [-0.5, 0.5]."""
    if left > 0 and centre > 0 and right > 0:  # Gaussian fit: exact for the band-limited peak
        a, b, c = math.log(left), math.log(centre), math.log(right)
    else:
        a, b, c = left, centre, right
    denom = a - 2.0 * b + c
    if denom >= 0:  # not a maximum: keep the sample
        return 0.0
    return float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))


def _surface(
    reference: np.ndarray,
    moving: np.ndarray,
    max_shift: int | tuple[int, int] | None,
    window: float,
    lowpass_sigma_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Grey views, the band-limited phase-correlation surface (peak 1 for a match) and the search limits."""
    import scipy.fft as sfft

    ref = to_gray_float(reference)
    mov = to_gray_float(moving)
    if ref.shape != mov.shape:
        msg = f"reference {ref.shape} and moving {mov.shape} views must have the same shape"
        raise ValueError(msg)
    h, w = ref.shape
    if h < 4 or w < 4:
        msg = f"views of {h}x{w} px are too small to register (need at least 4x4)"
        raise ValueError(msg)
    if not (np.isfinite(ref).all() and np.isfinite(mov).all()):
        msg = "views contain NaN or infinite values; replace them (e.g. with the median) first"
        raise ValueError(msg)
    sy, sx = _shift_limits(max_shift, h, w)

    r = ref - ref.mean(dtype=np.float64)
    m = mov - mov.mean(dtype=np.float64)
    if window > 0:
        win = _window2d(h, w, float(min(window, 1.0)))
        r = r * win
        m = m * win
    ph, pw = sfft.next_fast_len(h, real=True), sfft.next_fast_len(w, real=True)
    fr = sfft.rfft2(r, s=(ph, pw), workers=1)
    fm = sfft.rfft2(m, s=(ph, pw), workers=1)
    cross = fm
    cross *= np.conj(fr)
    mag = np.abs(cross)
    mag += np.float32(float(mag.max()) * 1e-6 + 1e-30)
    if lowpass_sigma_px > 0:
        g, unit_peak = _lowpass(ph, pw, float(lowpass_sigma_px))
        np.divide(g, mag, out=mag)
    else:
        unit_peak = 1.0
        np.reciprocal(mag, out=mag)
    cross *= mag
    surface = sfft.irfft2(cross, s=(ph, pw), workers=1)
    surface /= unit_peak

    return ref, mov, surface, (sy, sx)


def phase_correlate(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    max_shift: int | tuple[int, int] | None = None,
    window: float = 0.5,
    lowpass_sigma_px: float = 1.0,
    exclusion_px: int = 4,
    ncc_smooth_px: float = 1.0,
    compute_ncc: bool = True,
) -> ShiftEstimate:
    """Find the translation between two same-size views by phase correlation.

    Parameters
    ----------
    reference, moving : ndarray, shape (H, W) or (H, W, 3)
        The two views, any numeric dtype.
    max_shift : int or (int, int), optional
        Largest ``|dy|``, ``|dx|`` searched, in pixels; default half the view.
    window : float
        Tukey-window fraction: the share of each axis, split between its two
        ends, over which the views are tapered to zero (removes the edge
        discontinuity). 1 is a Hann window; smaller keeps more of the view at
        full weight, which matters when the shared content lies near an edge
        (a large shift across a narrow overlap). 0 disables windowing.
    lowpass_sigma_px : float
        Width, in pixels, of the Gaussian that band-limits the correlation
        peak. It keeps camera noise out of the peak and gives it a Gaussian
        shape whose apex a three-point fit finds to ~0.1 px. 0 disables it.
    exclusion_px : int
        Half-size of the box around the peak ignored when looking for the
        strongest secondary peak.
    ncc_smooth_px : float
        Gaussian sigma applied to both views before :func:`overlap_ncc`
        (suppresses shot noise in the quality measure); 0 disables it.
    compute_ncc : bool
        Skip the overlap NCC (reported as NaN) when false.

    Returns
    -------
    ShiftEstimate
    """
    ref, mov, surface, (sy, sx) = _surface(reference, moving, max_shift, window, lowpass_sigma_px)
    h, w = ref.shape
    ph, pw = surface.shape

    iy = np.arange(-sy, sy + 1) % ph
    ix = np.arange(-sx, sx + 1) % pw
    sub = surface[np.ix_(iy, ix)]
    py, px = np.unravel_index(int(np.argmax(sub)), sub.shape)
    peak = float(sub[py, px])
    # The strongest other peak: searched at least 2 exclusion boxes beyond the
    # main peak even when the shift search is narrow (refinement), so the
    # ratio measures distinctness rather than the main peak's own skirt.
    e = int(exclusion_px)
    ry = min(h // 2 - 1, max(sy, py - sy + 3 * e, sy - py + 3 * e))
    rx = min(w // 2 - 1, max(sx, px - sx + 3 * e, sx - px + 3 * e))
    around = surface[np.ix_(np.arange(-ry, ry + 1) % ph, np.arange(-rx, rx + 1) % pw)].copy()
    cy0, cx0 = py - sy + ry, px - sx + rx
    around[max(0, cy0 - e) : cy0 + e + 1, max(0, cx0 - e) : cx0 + e + 1] = -np.inf
    second = float(around.max()) if np.isfinite(around).any() else -np.inf
    if peak <= 0:
        ratio = 1.0
    elif second <= 0:
        ratio = _PEAK_RATIO_CAP
    else:
        ratio = min(_PEAK_RATIO_CAP, peak / second)

    cy, cx = iy[py], ix[px]
    fy = _subpixel(surface[(cy - 1) % ph, cx], surface[cy, cx], surface[(cy + 1) % ph, cx])
    fx = _subpixel(surface[cy, (cx - 1) % pw], surface[cy, cx], surface[cy, (cx + 1) % pw])
    dy = float(py - sy) + fy
    dx = float(px - sx) + fx

    ncc = math.nan
    ix_shift, iy_shift = round(dx), round(dy)
    frac = max(0.0, (h - abs(iy_shift)) * (w - abs(ix_shift)) / (h * w))
    if compute_ncc:
        ncc = overlap_ncc(ref, mov, (ix_shift, iy_shift), smooth_px=ncc_smooth_px)
    limit = (sy < h // 2 - 1 and py in (0, 2 * sy)) or (sx < w // 2 - 1 and px in (0, 2 * sx))
    return ShiftEstimate(
        dx=dx, dy=dy, peak=peak, peak_ratio=ratio, ncc=ncc, overlap_fraction=frac, at_search_limit=bool(limit)
    )


@dataclass(frozen=True)
class PeakCandidate:
    """One local maximum of the phase-correlation surface (see :func:`peak_candidates`).

    ``dx``, ``dy`` follow :class:`ShiftEstimate`'s convention (sub-pixel);
    ``peak`` is its height (1.0 for identical content); ``at_search_limit``
    says it lies on the edge of a restricted search range.
    """

    dx: float
    dy: float
    peak: float
    at_search_limit: bool


def peak_candidates(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    max_shift: int | tuple[int, int] | None = None,
    window: float = 0.5,
    lowpass_sigma_px: float = 1.0,
    count: int = 8,
    separation_px: int = 2,
) -> list[PeakCandidate]:
    """The strongest local maxima of the phase-correlation surface, strongest first.

    Periodic content (a grid, the chip's track lines) gives a peak at every
    period alias, and the strongest of them need not be the true shift: the
    caller judges the candidates by another measure (the stitching uses the
    overlap NCC). Parameters are those of :func:`phase_correlate`; ``count``
    is the most candidates returned, ``separation_px`` the half-size of the
    neighbourhood a maximum must dominate.

    Returns
    -------
    list of PeakCandidate
        At most ``count``, each refined to sub-pixel like :func:`phase_correlate`.
    """
    ref, _, surface, (sy, sx) = _surface(reference, moving, max_shift, window, lowpass_sigma_px)
    ph, pw = surface.shape
    h, w = ref.shape
    iy = np.arange(-sy, sy + 1) % ph
    ix = np.arange(-sx, sx + 1) % pw
    sub = np.ascontiguousarray(surface[np.ix_(iy, ix)], dtype=np.float32)
    k = 2 * int(separation_px) + 1
    local = cv2.dilate(sub, np.ones((k, k), np.uint8), borderType=cv2.BORDER_REPLICATE)
    ys, xs = np.nonzero((sub >= local) & (sub > 0))
    if ys.size == 0:
        ys, xs = np.unravel_index(np.array([int(np.argmax(sub))]), sub.shape)
    order = np.argsort(-sub[ys, xs], kind="stable")[: max(1, int(count))]
    out = []
    for py, px in zip(ys[order], xs[order], strict=False):
        cy, cx = iy[py], ix[px]
        fy = _subpixel(surface[(cy - 1) % ph, cx], surface[cy, cx], surface[(cy + 1) % ph, cx])
        fx = _subpixel(surface[cy, (cx - 1) % pw], surface[cy, cx], surface[cy, (cx + 1) % pw])
        limit = (sy < h // 2 - 1 and py in (0, 2 * sy)) or (sx < w // 2 - 1 and px in (0, 2 * sx))
        out.append(
            PeakCandidate(
                dx=float(px - sx) + fx, dy=float(py - sy) + fy, peak=float(sub[py, px]), at_search_limit=bool(limit)
            )
        )
    return out


def _box_sums(integral: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Sums over rectangles [y0, y1) x [x0, x1) for every (row, column) pair of bounds, from an integral image."""
    rows = integral[y1] - integral[y0]  # the row bounds depend on dy only, the column bounds on dx only
    result: np.ndarray = rows[:, x1] - rows[:, x0]
    return result


def ncc_surface(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    max_shift: int | tuple[int, int] | None = None,
    smooth_px: float = 0.0,
) -> np.ndarray:
    """The overlap NCC of two same-size views at every whole-pixel shift of a range (exhaustive).

    Entry ``[dy + sy, dx + sx]`` equals :func:`overlap_ncc` at ``(dx, dy)``
    (up to the smoothing at the views' borders): the Pearson correlation of
    the pixels the two views share at that shift. One FFT cross-correlation
    gives the products; integral images give each overlap's sums and sums of
    squares, so the whole surface costs about as much as one phase
    correlation.

    Parameters
    ----------
    reference, moving : ndarray, shape (H, W) or (H, W, 3)
    max_shift : int or (int, int), optional
        Largest ``|dy|``, ``|dx|``, px; default half the view.
    smooth_px : float
        Gaussian sigma applied to both views first; 0 for none.

    Returns
    -------
    ndarray, shape (2 sy + 1, 2 sx + 1), float32
        NCC in [-1, 1]; 0 where either side is constant.
    """
    import scipy.fft as sfft

    ref = to_gray_float(reference)
    mov = to_gray_float(moving)
    if ref.shape != mov.shape:
        msg = f"reference {ref.shape} and moving {mov.shape} views must have the same shape"
        raise ValueError(msg)
    h, w = ref.shape
    sy, sx = _shift_limits(max_shift, h, w)
    if smooth_px > 0 and min(h, w) > 2:
        ref = cv2.GaussianBlur(ref, (0, 0), smooth_px)
        mov = cv2.GaussianBlur(mov, (0, 0), smooth_px)
    r = np.ascontiguousarray(ref - np.float32(ref.mean(dtype=np.float64)), dtype=np.float32)
    m = np.ascontiguousarray(mov - np.float32(mov.mean(dtype=np.float64)), dtype=np.float32)
    ph, pw = sfft.next_fast_len(h + sy, real=True), sfft.next_fast_len(w + sx, real=True)
    fr = sfft.rfft2(r, s=(ph, pw), workers=1)
    fm = sfft.rfft2(m, s=(ph, pw), workers=1)
    fm *= np.conj(fr)
    cross = sfft.irfft2(fm, s=(ph, pw), workers=1)  # cross[d] = sum_p r[p] m[p + d]
    dys, dxs = np.arange(-sy, sy + 1), np.arange(-sx, sx + 1)
    prod = cross[np.ix_(dys % ph, dxs % pw)].astype(np.float64)
    # moving[y + dy, x + dx] ~ reference[y, x]: the reference's share and the moving view's share
    ry0, ry1 = np.maximum(0, -dys), h - np.maximum(0, dys)
    rx0, rx1 = np.maximum(0, -dxs), w - np.maximum(0, dxs)
    my0, my1 = np.maximum(0, dys), h - np.maximum(0, -dys)
    mx0, mx1 = np.maximum(0, dxs), w - np.maximum(0, -dxs)
    n = np.outer(ry1 - ry0, rx1 - rx0).astype(np.float64)
    sums = []
    for v, (y0, y1, x0, x1) in ((r, (ry0, ry1, rx0, rx1)), (m, (my0, my1, mx0, mx1))):
        for integral in cv2.integral2(v, sdepth=cv2.CV_64F, sqdepth=cv2.CV_64F):
            sums.append(_box_sums(integral, y0, y1, x0, x1))
    s_r, s_rr, s_m, s_mm = sums
    num = prod - s_r * s_m / n
    den = np.sqrt(np.maximum(s_rr - s_r * s_r / n, 0) * np.maximum(s_mm - s_m * s_m / n, 0))
    out = np.zeros_like(num)
    ok = den > 1e-9 * max(float(den.max(initial=0.0)), 1e-30)
    out[ok] = num[ok] / den[ok]
    result: np.ndarray = np.clip(out, -1.0, 1.0).astype(np.float32)
    return result


def overlap_ncc(
    reference: np.ndarray,
    moving: np.ndarray,
    shift: tuple[int, int],
    *,
    smooth_px: float = 0.0,
) -> float:
    """Normalised cross-correlation of two views' overlap at a whole-pixel shift.

    Parameters
    ----------
    reference, moving : ndarray, shape (H, W) or (H, W, 3)
        Same-size views.
    shift : (int, int)
        ``(dx, dy)`` of the moving content relative to the reference, px.
    smooth_px : float
        Gaussian sigma applied to the overlap first; 0 for none.

    Returns
    -------
    float
        Pearson correlation of the overlapping pixels in [-1, 1]; 0 when the
        overlap is empty or either side is constant there.
    """
    ref = to_gray_float(reference)
    mov = to_gray_float(moving)
    h, w = ref.shape
    dx, dy = int(shift[0]), int(shift[1])
    if abs(dx) >= w or abs(dy) >= h:
        return 0.0
    # moving[y + dy, x + dx] ~ reference[y, x]
    r = ref[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    m = mov[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
    if smooth_px > 0 and min(r.shape) > 2:
        r = cv2.GaussianBlur(r, (0, 0), smooth_px)
        m = cv2.GaussianBlur(m, (0, 0), smooth_px)
    r = (r - np.float32(r.mean(dtype=np.float64))).ravel()
    m = (m - np.float32(m.mean(dtype=np.float64))).ravel()
    # einsum, not np.dot: BLAS would spin up its own threads inside our thread pool
    den = math.sqrt(
        float(np.einsum("i,i->", r, r, dtype=np.float64)) * float(np.einsum("i,i->", m, m, dtype=np.float64))
    )
    if den <= 0:
        return 0.0
    return float(np.clip(float(np.einsum("i,i->", r, m, dtype=np.float64)) / den, -1.0, 1.0))


_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


def structure_snr(
    image: np.ndarray, *, fine_px: float = 2.0, coarse_px: float = 16.0, integer: bool | None = None
) -> float:
    """How much registrable structure a view holds, relative to its noise.

    The signal is the standard deviation of a band-pass: a Gaussian blur of
    ``fine_px`` minus a broad (stack) blur of about ``coarse_px`` (cell-sized
    detail, with illumination gradients and vignetting removed). The noise is Immerkaer's estimate
    (mean absolute response to a Laplacian-difference kernel, which ignores
    smooth content), floored at the quantisation step for integer data.

    White noise alone scores about 0.14; tissue scores well above 1; a
    constant view scores 0.

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, 3)
    fine_px, coarse_px : float
        Gaussian sigmas of the band-pass, in pixels.
    integer : bool, optional
        Whether the data were integers (quantisation floor); default from dtype.

    Returns
    -------
    float
        Signal-to-noise ratio, >= 0.
    """
    arr = np.asarray(image)
    if integer is None:
        integer = np.issubdtype(arr.dtype, np.integer)
    a = to_gray_float(arr)
    if min(a.shape) < 3:
        return 0.0
    # The band-pass keeps nothing finer than fine_px, so it is computed on a
    # view halved in size (four times cheaper) when that still leaves detail.
    half = min(a.shape) >= 32 and fine_px >= 1.5
    v = cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA) if half else a
    scale = 0.5 if half else 1.0
    k = 2 * round(2.5 * coarse_px * scale) + 1  # stack blur: Gaussian-like, cost independent of size
    band = cv2.GaussianBlur(v, (0, 0), fine_px * scale) - cv2.stackBlur(v, (k, k))
    m = min(k // 2, min(band.shape) // 4)  # borders: the broad blur sees reflected content there
    signal = float(band[m : band.shape[0] - m, m : band.shape[1] - m].std(dtype=np.float64))
    lap = cv2.filter2D(a, cv2.CV_32F, _IMMERKAER)[1:-1, 1:-1]
    noise = math.sqrt(math.pi / 2.0) * float(np.abs(lap).mean(dtype=np.float64)) / 6.0
    floor = 0.29 if integer else 0.0
    floor = max(floor, 1e-4 * abs(float(a.mean(dtype=np.float64))), 1e-12)
    return signal / max(noise, floor)
