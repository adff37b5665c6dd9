"""DAPI vs immunofluorescence calibration: offset and similarity.

For DAPI+mIF scan sets, each IF image must sit on the DAPI image: StereoMap
Image QC passes an IF image when its offset from the DAPI image is at most
20 px and their similarity is at least 0.01.

Method (:func:`calibrate`):

1. Both images are reduced to a *structure* view that two different stains
   share: robust percentile normalisation, light smoothing, gradient
   magnitude (edges of nuclei, cells and tissue, whatever their brightness or
   contrast sign), minus its broad local mean.
2. Coarse offset: phase correlation of the structure views of the whole
   images downsampled by an integer factor (area mean, read in bands so a
   20k x 20k memory map is never held twice).
3. Refinement at full resolution: phase correlation of a few windows where
   the reference has the most structure, each cut from the moving image at
   the coarse offset; the median of the windows with a distinct peak gives
   the offset to sub-pixel precision.
4. Similarity: the normalised cross-correlation of the two full-resolution
   structure views over those windows at the found offset, averaged and
   clipped to [0, 1]. Related stains score well above 0.01. Unrelated images
   score about 0: the offset of an unrelated pair is the best of many
   candidate shifts on the coarse views, which inflates a correlation
   measured there, but the full-resolution detail of the windows played no
   part in choosing it, so their correlation stays at chance level (about
   1/sqrt(pixels), a few thousandths).

Sign convention: ``offset_px = (dx, dy)`` is where the moving (IF) image's
content sits relative to the reference (DAPI): a feature at ``(x, y)`` in the
DAPI image appears at ``(x + dx, y + dy)`` in the IF image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from qc.registration import overlap_ncc, phase_correlate, to_gray_float

__all__ = ["CalibrationResult", "calibrate", "downsample_area", "structure_view"]


@dataclass(frozen=True)
class CalibrationResult:
    """Offset and similarity of one IF image against the DAPI image.

    Attributes
    ----------
    offset_px : (float, float)
        ``(dx, dy)``: the IF content sits at DAPI position + offset, px.
    offset_length_px : float
        Length of the offset, px.
    similarity : float
        NCC of the two structure views over their overlap at the offset, in [0, 1].
    passed : bool
        ``offset_length_px <= max_offset_px and similarity >= min_similarity``.
    reference : str or None
        Name of the reference (DAPI) image, when given.
    moving : str or None
        Name of the IF image, when given.
    coarse_offset_px : (float, float)
        The offset found on the downsampled views, px.
    downsample : int
        Factor of the coarse views.
    windows_used : int
        Full-resolution windows whose offsets were combined (0: coarse only).
    peak_ratio : float
        Distinctness of the coarse correlation peak (near 1: no clear offset).
    max_offset_px, min_similarity : float
        The pass thresholds applied.
    """

    offset_px: tuple[float, float]
    offset_length_px: float
    similarity: float
    passed: bool
    reference: str | None
    moving: str | None
    coarse_offset_px: tuple[float, float]
    downsample: int
    windows_used: int
    peak_ratio: float
    max_offset_px: float
    min_similarity: float

    def summary(self) -> dict[str, object]:
        """The report's ``calibration`` block (see ARCHITECTURE.md)."""
        return {
            "reference": self.reference,
            "offset_px": [round(v, 2) for v in self.offset_px],
            "similarity": round(self.similarity, 4),
            "passed": self.passed,
        }


def downsample_area(image: np.ndarray, factor: int, *, band_rows: int = 2048) -> np.ndarray:
    """Area-mean reduction by an integer factor, read in bands (float32).

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, 3); memory maps welcome
    factor : int
        Reduction in both axes; trailing rows/columns that do not fill a
        block are dropped.
    band_rows : int
        Approximate rows read at a time (rounded to a multiple of ``factor``).

    Returns
    -------
    ndarray, float32, shape (H // factor, W // factor)
    """
    f = int(factor)
    if f < 1:
        msg = f"downsample factor must be >= 1, got {factor}"
        raise ValueError(msg)
    h, w = image.shape[:2]
    oh, ow = h // f, w // f
    if f == 1:
        return to_gray_float(image[:h, :w]).copy()
    out = np.empty((oh, ow), np.float32)
    step = max(1, band_rows // f) * f
    for y0 in range(0, oh * f, step):
        y1 = min(oh * f, y0 + step)
        band = np.asarray(image[y0:y1, : ow * f])
        if band.ndim == 2 and band.dtype not in (np.uint8, np.uint16, np.float32):
            band = band.astype(np.float32)
        elif band.ndim != 2:
            band = to_gray_float(band)
        # area mean in the native dtype (no full-size float copy); rounding is < 0.5 grey level
        small = cv2.resize(band, (ow, (y1 - y0) // f), interpolation=cv2.INTER_AREA)
        out[y0 // f : y1 // f] = small
    return out


def structure_view(image: np.ndarray, *, smooth_px: float = 1.0, background_px: float = 16.0) -> np.ndarray:
    """The stain-independent structure of an image (float32, zero mean).

    Percentile-normalised (0.5 % -> 0, 99.5 % -> 1, clipped), smoothed by
    ``smooth_px``, gradient magnitude, minus its stack-blurred local mean of
    about ``background_px``.
    """
    a = to_gray_float(image)
    sample = a[:: max(1, a.shape[0] // 512), :: max(1, a.shape[1] // 512)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    a = np.clip((a - np.float32(lo)) * np.float32(1.0 / max(float(hi - lo), 1e-6)), 0.0, 1.0)
    if smooth_px > 0:
        a = cv2.GaussianBlur(a, (0, 0), smooth_px)
    gx = cv2.Sobel(a, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(a, cv2.CV_32F, 0, 1, ksize=3)
    g = cv2.magnitude(gx, gy)
    k = 2 * round(2.5 * background_px) + 1
    if min(g.shape) > k:
        g = g - cv2.stackBlur(g, (k, k))
    result: np.ndarray = g - np.float32(g.mean(dtype=np.float64))
    return result


def _pick_windows(
    struct: np.ndarray, f: int, size: int, n: int, bounds: tuple[int, int, int, int]
) -> list[tuple[int, int]]:
    """Top-left corners (full-res) of up to ``n`` well-spread windows with the most structure."""
    x_lo, y_lo, x_hi, y_hi = bounds  # allowed full-res top-left range (inclusive)
    if x_hi < x_lo or y_hi < y_lo:
        return []
    cs = max(1, size // f)  # window side in coarse px
    energy = cv2.boxFilter(struct * struct, -1, (cs, cs), normalize=True, borderType=cv2.BORDER_REFLECT)
    cands = []
    grid = max(1, cs // 4)
    for cy in range(0, energy.shape[0], grid):
        for cx in range(0, energy.shape[1], grid):
            x0, y0 = cx * f - size // 2, cy * f - size // 2
            if x_lo <= x0 <= x_hi and y_lo <= y0 <= y_hi:
                cands.append((float(energy[cy, cx]), x0, y0))
    cands.sort(reverse=True)
    chosen: list[tuple[int, int]] = []
    for _, x0, y0 in cands:
        if all(abs(x0 - a) >= 3 * size // 4 or abs(y0 - b) >= 3 * size // 4 for a, b in chosen):
            chosen.append((x0, y0))
            if len(chosen) == n:
                break
    return chosen


def calibrate(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    reference_name: str | None = None,
    moving_name: str | None = None,
    search_px: int = 300,
    downsample: int | None = None,
    coarse_size: int = 2048,
    refine_windows: int = 5,
    window_px: int = 1024,
    min_peak_ratio: float = 2.0,
    max_offset_px: float = 20.0,
    min_similarity: float = 0.01,
    reference_views: dict[tuple[int, int, int], np.ndarray] | None = None,
) -> CalibrationResult:
    """Offset and similarity of an IF image against the DAPI image.

    Parameters
    ----------
    reference : ndarray, shape (H, W)
        The DAPI (nuclear) image, any numeric dtype; memory maps welcome.
    moving : ndarray, shape (H', W')
        The IF image. Both are compared over their common extent from the
        top-left corner.
    reference_name, moving_name : str, optional
        Carried into the result.
    search_px : int
        Largest offset searched on each axis, px.
    downsample : int, optional
        Coarse-view factor; default the smallest that brings the longer side
        to at most ``coarse_size`` px, and at least 2 (so the similarity
        windows' full-resolution detail is independent of the coarse search).
    coarse_size : int
        See ``downsample``.
    refine_windows : int
        Full-resolution windows used to refine the coarse offset.
    window_px : int
        Side of those windows, px.
    min_peak_ratio : float
        A window's offset is used only when its peak is this distinct.
    max_offset_px, min_similarity : float
        Pass thresholds (StereoMap: 20 px and 0.01).
    reference_views : dict, optional
        Keeps the reference's reduced view between calls (keyed by common
        extent and factor): pass the same dict for every IF image of one
        reference, and the reference is reduced once, not once per IF.

    Returns
    -------
    CalibrationResult
    """
    if reference.ndim != 2 or moving.ndim != 2:
        msg = (
            f"calibration compares single-channel images; got shapes {reference.shape} and "
            f"{moving.shape}: pass one plane (e.g. image.plane(0))"
        )
        raise ValueError(msg)
    h = min(reference.shape[0], moving.shape[0])
    w = min(reference.shape[1], moving.shape[1])
    if min(h, w) < 64:
        msg = f"images of {h}x{w} px (common extent) are too small to calibrate (need 64x64)"
        raise ValueError(msg)
    f = int(downsample) if downsample else max(2, math.ceil(max(h, w) / coarse_size))
    f = min(f, max(1, min(h, w) // 256))
    ref_c = None if reference_views is None else reference_views.get((h, w, f))
    if ref_c is None:
        ref_c = structure_view(downsample_area(reference[:h, :w], f), smooth_px=1.0)
        if reference_views is not None:
            reference_views[(h, w, f)] = ref_c
    mov_c = structure_view(downsample_area(moving[:h, :w], f), smooth_px=1.0)
    cs = min(math.ceil(search_px / f) + 1, min(ref_c.shape) // 2 - 1)
    coarse = phase_correlate(ref_c, mov_c, max_shift=cs, window=0.25, compute_ncc=False)
    cdx, cdy = coarse.dx * f, coarse.dy * f

    # Full-resolution windows at the coarse offset: refine it, and measure the
    # similarity on pixels the coarse search did not choose the offset from.
    size = min(window_px, (min(h, w) // 2) // 2 * 2)
    ix, iy = round(cdx), round(cdy)
    bounds = (max(0, -ix), max(0, -iy), w - max(0, ix) - size, h - max(0, iy) - size)
    windows = []
    offsets = []
    for x0, y0 in _pick_windows(ref_c, f, size, refine_windows, bounds):
        rw = structure_view(np.asarray(reference[y0 : y0 + size, x0 : x0 + size]))
        mw = structure_view(np.asarray(moving[y0 + iy : y0 + iy + size, x0 + ix : x0 + ix + size]))
        windows.append((rw, mw))
        if coarse.peak_ratio >= min_peak_ratio:
            est = phase_correlate(rw, mw, max_shift=f + 2, window=0.5, compute_ncc=False)
            if est.peak_ratio >= min_peak_ratio:
                offsets.append((ix + est.dx, iy + est.dy))
    if offsets:
        dx, dy = (float(v) for v in np.median(np.asarray(offsets), axis=0))
    else:
        dx, dy = float(cdx), float(cdy)

    if windows:
        rx, ry = round(dx) - ix, round(dy) - iy
        sim = float(np.mean([overlap_ncc(rw, mw, (rx, ry)) for rw, mw in windows]))
    else:  # pragma: no cover - every image >= 64 px has a window
        sim = overlap_ncc(ref_c, mov_c, (round(dx / f), round(dy / f)))
    sim = float(min(max(sim, 0.0), 1.0))
    length = math.hypot(dx, dy)
    return CalibrationResult(
        offset_px=(dx, dy),
        offset_length_px=length,
        similarity=sim,
        passed=bool(length <= max_offset_px and sim >= min_similarity),
        reference=reference_name,
        moving=moving_name,
        coarse_offset_px=(float(cdx), float(cdy)),
        downsample=f,
        windows_used=len(offsets),
        peak_ratio=coarse.peak_ratio,
        max_offset_px=max_offset_px,
        min_similarity=min_similarity,
    )
