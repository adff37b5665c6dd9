"""Clarity: classify windows of an image as good / blurred / over-exposed and score it.

How an image is evaluated (:func:`evaluate_clarity`):

1. **Windows.** Square windows (the model's size, 64 px for the shipped model)
   are placed on a regular grid, one at the centre of each grid cell. A small
   image is tiled completely (non-overlapping windows); a large one is sampled
   with at most ``max_windows`` windows (default 4096: a 64 x 64 grid covering
   4.2 % of the pixels of a 20000 x 20000 image). Only the windows' rows are
   read, one grid row at a time, so a memory-mapped image is never copied whole.
2. **Intensity.** Grey values become 8 bits by one linear map for the whole
   image, taken from the sampled pixels: the 0.5th percentile goes to 0 and
   the 99.9th to 255 (clipped). The span is at least 5 % of the dtype's full
   scale (13 grey levels for uint8, 3277 for uint16), so an image of empty
   chip surface is not stretched into false texture. Saturated pixels stay at
   255: clipping at the top is the sign of over-exposure. The same map is
   applied to uint8 and uint16 images and in training
   (``training/train_clarity.py`` imports :func:`intensity_range`).
   RGB images are made grey as the model's spec says (``rgb``), per window.
3. **Classes.** The model gives each window a probability per category
   (:data:`CATEGORIES`, :data:`BACKGROUND`); a window's class is the most
   probable one (the counts and the clarity map).
4. **Score** (0-100, 80 or more is good; advisory): the mean over windows not
   classified as background of the expected weight of the window,
   ``sum_c p_c w_c / sum_c p_c`` over the scored categories, times 100.
   Using probabilities rather than the winning class alone makes the score move
   smoothly as an image degrades. Weights (:data:`DEFAULT_WEIGHTS`):

   ============================  ======  ===========================================
   good                          1.0     nuclei sharp and unsaturated
   mild blur                     0.5     nuclei still separable; texture lost
   severe blur                   0.0     nuclei merge: segmentation fails
   mild over-exposure            0.5     some nuclei clipped; shapes still usable
   severe over-exposure          0.0     plateaus of 255: no usable signal
   ============================  ======  ===========================================

   So an image passes at 80 with e.g. 80 % good windows, or 60 % good and 40 %
   mildly degraded. (STOmics' own 6-class scoring weighs mild blur 0.2 and
   mild over-exposure 0.9; we treat both mild defects alike, as the same harm
   to cell segmentation, and let sites tune ``weights``.)
5. **Background only.** When every window is background the score is
   ``None`` and :attr:`ClarityResult.problem` says why (no tissue found);
   a score of 0 would wrongly read as "all blurred".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qc.clarity.model import (
    BACKGROUND,
    CATEGORIES,
    LoadedClarityModel,
)
from qc.errors import ModelError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_WINDOWS",
    "DEFAULT_WEIGHTS",
    "GOOD_SCORE",
    "INTENSITY_PERCENTILES",
    "MAP_LABELS",
    "MIN_RANGE_FRACTION",
    "ClarityResult",
    "WindowGrid",
    "evaluate_clarity",
    "intensity_range",
    "to_uint8",
    "window_grid",
]

#: Labels of :attr:`ClarityResult.class_map` values: index 0 is background.
MAP_LABELS = (BACKGROUND, *CATEGORIES)
#: Weight of each category in the score (see the module docstring).
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "good": 1.0,
    "mild_blur": 0.5,
    "severe_blur": 0.0,
    "mild_overexposure": 0.5,
    "severe_overexposure": 0.0,
}
#: StereoMap's criterion: a clarity score at or above this is good (advisory).
GOOD_SCORE = 80.0
#: Most windows sampled from one image (a 64 x 64 grid).
DEFAULT_MAX_WINDOWS = 4096
#: Windows per onnxruntime call.
DEFAULT_BATCH_SIZE = 64
#: Percentiles of the sampled pixels mapped to 8-bit 0 and 255.
INTENSITY_PERCENTILES = (0.5, 99.9)
#: Smallest intensity span, as a fraction of the dtype's full scale.
MIN_RANGE_FRACTION = 0.05


@dataclass(frozen=True)
class WindowGrid:
    """Where the windows are: top-left corners of a regular grid.

    Attributes
    ----------
    window : int
        Window side in pixels.
    ys, xs : tuple of int
        Top row of each grid row, left column of each grid column (pixels).
    image_shape : (int, int)
        Height and width of the image.
    """

    window: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    image_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """Rows and columns of the grid."""
        return (len(self.ys), len(self.xs))

    @property
    def size(self) -> int:
        return len(self.ys) * len(self.xs)


@dataclass(frozen=True)
class ClarityResult:
    """Outcome of :func:`evaluate_clarity`.

    Attributes
    ----------
    score : float or None
        0-100 (80 or more is good); ``None`` when no window shows tissue.
    counts : mapping str -> int
        Windows per class (every category and ``background``).
    class_map : ndarray, shape ``grid.shape``, int8
        Class of each window as an index into :data:`MAP_LABELS`.
    grid : WindowGrid
        Geometry of ``class_map``.
    model : str
        Name of the model used.
    windows_evaluated : int
    background_share : float
        Fraction of windows classified as background, 0-1.
    intensity_range : (float, float)
        Grey values mapped to 8-bit 0 and 255.
    problem : str or None
        Why there is no score, when there is none.
    """

    score: float | None
    counts: Mapping[str, int]
    class_map: np.ndarray
    grid: WindowGrid
    model: str
    windows_evaluated: int
    background_share: float
    intensity_range: tuple[float, float]
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report fragment (``passed`` is added by the rules)."""
        return {
            "score": None if self.score is None else round(self.score, 2),
            "counts": dict(self.counts),
            "model": self.model,
            "windows_evaluated": self.windows_evaluated,
            "background_share": round(self.background_share, 4),
            "problem": self.problem,
        }


def window_grid(height: int, width: int, *, window: int, max_windows: int = DEFAULT_MAX_WINDOWS) -> WindowGrid:
    """Place at most ``max_windows`` windows on a regular grid over an image.

    An image with no more than ``max_windows`` whole windows is tiled without
    gaps or overlap (centred); a larger one gets a grid of ``rows x cols``
    cells, with ``rows / cols`` close to ``height / width``, and one window
    centred in each cell.
    """
    if height < window or width < window:
        msg = f"image of {height}x{width} px is smaller than one {window}x{window} window"
        raise ValueError(msg)
    if max_windows < 1:
        msg = f"max_windows must be at least 1, got {max_windows}"
        raise ValueError(msg)
    full_r, full_c = height // window, width // window
    if full_r * full_c <= max_windows:
        ys = tuple((height - full_r * window) // 2 + i * window for i in range(full_r))
        xs = tuple((width - full_c * window) // 2 + j * window for j in range(full_c))
        return WindowGrid(window=window, ys=ys, xs=xs, image_shape=(height, width))
    rows = max(1, min(full_r, int(np.sqrt(max_windows * height / width))))
    cols = max(1, min(full_c, max_windows // rows))
    ys = tuple(round((i + 0.5) * height / rows - window / 2) for i in range(rows))
    xs = tuple(round((j + 0.5) * width / cols - window / 2) for j in range(cols))
    return WindowGrid(window=window, ys=ys, xs=xs, image_shape=(height, width))


def intensity_range(values: np.ndarray) -> tuple[float, float]:
    """The grey values to map to 8-bit 0 and 255, from a sample of pixels.

    Parameters
    ----------
    values : ndarray of uint8 or uint16, any shape
        Pixels (the sampled windows, or a whole small image).

    Returns
    -------
    (lo, hi) : (float, float)
        The :data:`INTENSITY_PERCENTILES` of ``values``, widened to at least
        :data:`MIN_RANGE_FRACTION` of the dtype's full scale (upwards, then
        downwards at the top of the scale).
    """
    if values.dtype not in (np.uint8, np.uint16):
        msg = f"intensity_range needs uint8 or uint16 pixels, got {values.dtype}"
        raise ValueError(msg)
    full = float(np.iinfo(values.dtype).max)
    flat = np.ravel(values)
    hist = np.zeros(int(full) + 1, np.int64)
    for start in range(0, flat.size, 1 << 20):  # bincount widens to int64: keep chunks small
        hist += np.bincount(flat[start : start + (1 << 20)], minlength=hist.size)
    cdf = np.cumsum(hist, dtype=np.float64)
    total = cdf[-1]
    lo = float(np.searchsorted(cdf, total * INTENSITY_PERCENTILES[0] / 100.0, side="left"))
    hi = float(np.searchsorted(cdf, total * INTENSITY_PERCENTILES[1] / 100.0, side="left"))
    span = MIN_RANGE_FRACTION * full
    if hi - lo < span:
        hi = min(lo + span, full)
        lo = hi - span
    return lo, hi


def to_uint8(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map grey values linearly so ``lo`` -> 0 and ``hi`` -> 255, clipped, as uint8."""
    scale = np.float32(255.0 / (hi - lo))
    out = (pixels.astype(np.float32) - np.float32(lo)) * scale + np.float32(0.5)
    result: np.ndarray = np.clip(out, 0, 255).astype(np.uint8)
    return result


def _grey_windows(band: np.ndarray, xs: tuple[int, ...], window: int, rgb: str) -> np.ndarray:
    """Cut windows from one row band; RGB windows become grey (uint8/uint16 kept)."""
    wins = np.stack([band[:, x : x + window] for x in xs])
    if wins.ndim == 3:
        return wins
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    grey = wins.astype(np.float32) @ weights
    if rgb == "inverted_luminance":
        grey = float(np.iinfo(wins.dtype).max) - grey
    result: np.ndarray = np.clip(grey + 0.5, 0, np.iinfo(wins.dtype).max).astype(wins.dtype)
    return result


def evaluate_clarity(
    image: np.ndarray,
    model: LoadedClarityModel,
    *,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    weights: Mapping[str, float] | None = None,
    intensity: tuple[float, float] | None = None,
) -> ClarityResult:
    """Classify windows of an image and score its clarity.

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, 3), uint8 or uint16
        Grey plane (nuclear stain, IF) or RGB (H&E; needs a model whose spec
        supports colour). May be a memory map: only the sampled rows are read.
    model : LoadedClarityModel
        From :func:`load_clarity_model` (the session is built by the caller).
    max_windows : int
        Most windows to evaluate (see :func:`window_grid`).
    batch_size : int
        Windows per inference call; bounds the float buffer
        (``batch_size * channels * window**2 * 4`` bytes).
    weights : mapping, optional
        Weight per category, 0-1; default :data:`DEFAULT_WEIGHTS`.
    intensity : (float, float), optional
        The grey values to map to 8-bit 0 and 255; default :func:`intensity_range` of the sampled
        windows. A part of a larger image (one FOV) passes a map that suits the whole.

    Returns
    -------
    ClarityResult

    Raises
    ------
    ValueError
        Wrong shape or dtype, image smaller than one window, bad weights.
    ModelError
        An RGB image with a model that does not support colour.
    """
    if image.dtype not in (np.uint8, np.uint16):
        msg = f"clarity needs a uint8 or uint16 image, got {image.dtype}"
        raise ValueError(msg)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        msg = f"clarity needs a grey (H, W) or RGB (H, W, 3) image, got shape {image.shape}"
        raise ValueError(msg)
    spec = model.spec
    if image.ndim == 3 and not spec.supports_colour:
        msg = f"clarity model {spec.name} reads grey images only and this image is RGB"
        raise ModelError(msg, hint="Skip clarity for H&E, or configure a model whose rgb mode is not 'reject'")
    w = dict(DEFAULT_WEIGHTS if weights is None else weights)
    if set(w) != set(CATEGORIES) or not all(0.0 <= float(v) <= 1.0 for v in w.values()):
        msg = f"clarity weights must give each of {', '.join(CATEGORIES)} a value from 0 to 1, got {w}"
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be at least 1, got {batch_size}"
        raise ValueError(msg)

    win = spec.window
    grid = window_grid(image.shape[0], image.shape[1], window=win, max_windows=max_windows)
    raw = np.empty((grid.size, win, win), image.dtype)
    for r, y in enumerate(grid.ys):  # one row band at a time: bounded reads of a memmap
        band = np.asarray(image[y : y + win])
        raw[r * len(grid.xs) : (r + 1) * len(grid.xs)] = _grey_windows(band, grid.xs, win, spec.rgb)
    lo, hi = intensity_range(raw) if intensity is None else (float(intensity[0]), float(intensity[1]))
    if not hi > lo:
        msg = f"intensity must be (low, high) with low < high, got {intensity!r}"
        raise ValueError(msg)

    probs = np.empty((grid.size, len(spec.classes)), np.float32)
    for start in range(0, grid.size, batch_size):
        chunk = to_uint8(raw[start : start + batch_size], lo, hi)
        probs[start : start + batch_size] = model.predict_proba(chunk)
    del raw

    classes = np.array([MAP_LABELS.index(c) for c in spec.classes], np.int8)
    win_class = classes[np.argmax(probs, axis=1)]
    scored = np.array([c != BACKGROUND for c in spec.classes])
    wvec = np.array([w.get(c, 0.0) for c in spec.classes], np.float64) * scored
    tissue = win_class != 0
    counts = {label: int(np.count_nonzero(win_class == i)) for i, label in enumerate(MAP_LABELS)}
    counts = {c: counts[c] for c in (*CATEGORIES, BACKGROUND)}
    n_tissue = int(np.count_nonzero(tissue))
    score: float | None
    problem = None
    if n_tissue == 0:
        score = None
        problem = f"no tissue: all {grid.size} windows were classified as background"
    else:
        p = probs[tissue].astype(np.float64)
        mass = (p * scored).sum(axis=1)
        per_window = (p @ wvec) / np.maximum(mass, 1e-12)
        score = float(100.0 * per_window.mean())
    return ClarityResult(
        score=score,
        counts=counts,
        class_map=win_class.reshape(grid.shape),
        grid=grid,
        model=spec.name,
        windows_evaluated=grid.size,
        background_share=1.0 - n_tissue / grid.size,
        intensity_range=(lo, hi),
        problem=problem,
    )
