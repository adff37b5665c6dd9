"""Per-FOV checks for live QC: one tile at a time, while a microscope is still writing a chip's tiles.

Pure library (issue #18): the service side (``daemon/live.py``) feeds tiles as they become complete;
here each field of view (FOV) is checked on its own and the FOVs seen so far are judged.

:func:`check_fov` looks at one decoded tile:

* **Track lines.** The whole-chip detector's building blocks (:mod:`qc.track.coarse`): line evidence
  by a morphological top-hat, area-mean reduced 2x for tiles of 1024 px and more, contrast normalised,
  the grid angle from the whitened power spectrum, and per axis the profile along the lines and its
  dips. The usual polarity is tried first (dark lines on grey fluorescence, light ones on RGB H&E),
  the other only when it finds no lines. A FOV holds only a few lines (2-4 per axis for a 1024 px
  tile at 10x), fewer than the whole-chip template fit needs (three), so each axis is matched here
  with the scale known: every pair of dips read as
  1-4 consecutive template intervals at a scale within ``scale_tolerance`` of the expected one
  (``template.px_per_dnb(um_per_px)``) proposes a placement of the template, and the placement
  explaining the most dips wins. **Lines are present** when on both axes at least ``min_lines``
  template lines are matched and at most one template line inside the FOV goes unmatched
  (an unmatched line is allowed: tissue can hide one). The angle is then refined from the drift of
  the matched lines between the two halves of the FOV.
* **Focus.** A model-free measure (:attr:`FovCheck.focus`): at about 1 um per pixel, the ratio of
  the energy of the finest difference-of-Gaussians band to the next one, over the pixels that hold
  structure (coarse band well above the FOV's quiet floor) and are not next to a saturated pixel.
  Defocus takes the fine band first, whatever the brightness; bare chip surface (noise, faint lines)
  has no structure and no value. Below ``focus_blurred`` the FOV is **blurred**.
* **Clarity.** :func:`qc.clarity.evaluate_clarity` with at most ``clarity_windows`` windows, so the
  classes and the score are the whole-chip result's. Information only: the model was not trained on
  dark real-looking chips and scores sharp ones low.
* **Exposure.** The share of pixels at the dtype's maximum (saturated) and below ``dark_level`` of
  the range (dark); the share of the upper half of the range that is clipped (well exposed tissue
  clips its brightest nuclei, tissue at too high a gain piles up at the maximum); the FOV's darkest
  level and the share of it that looks like bare chip surface (where track lines should show).

:func:`check_fovs` runs a tile list through the stitching pair cache (same key-value object, keys
prefixed ``fov|``), hashing and decoding only what the cache does not hold.

:func:`warning_due` and :func:`assess` judge the FOVs seen so far in acquisition order, over a rolling
window of the latest FOVs, so a problem clears by itself when later FOVs are fine. What real chips
look like is no problem: lines are judged only on FOVs that show bare surface near the scan's
surface level (:func:`open_fovs`; lines are seldom visible under tissue), blur on the focus measure,
saturation on clipping far beyond what well exposed tissue shows, the angle spread without strays.
Measured on real-looking and easy scans by ``benchmarks/bench_fov_rules.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from qc.chip import ChipTemplate
from qc.clarity.evaluate import evaluate_clarity
from qc.clarity.model import CATEGORIES, LoadedClarityModel
from qc.io._mosaic import ahead
from qc.io.model import Tile, array_digest
from qc.stitching.pair_cache import PairCache, cache_get_many, cache_put_many, digest_key
from qc.track import coarse

__all__ = [
    "FOV_CHECK_VERSION",
    "FovCheck",
    "FovParams",
    "LivePair",
    "LiveProblem",
    "WarningRules",
    "assess",
    "check_fov",
    "check_fovs",
    "clarity_model_id",
    "fov_key",
    "fov_summary",
    "open_fovs",
    "warning_due",
]

#: Version of :func:`check_fov`; bump it whenever it would answer differently for the same inputs
#: (part of every cache key, so old entries are never read again).
FOV_CHECK_VERSION = "fov-3"  # 3: model-free focus, bare-surface and clipped-signal measures

#: Most FOV names a :class:`LiveProblem` lists.
MAX_PROBLEM_FOVS = 20


@dataclass(frozen=True)
class FovParams:
    """What a per-FOV check depends on besides the pixels (all of it is in the cache key).

    Attributes
    ----------
    um_per_px : float
        Expected pixel size, um; with the template's DNB pitch it gives the line spacing in px.
    scale_tolerance : float
        Accepted relative error of that scale.
    min_lines : int
        Template lines matched on each axis to call the lines present.
    saturation_share : float
        A FOV is over-exposed when more than this share of its pixels is at the dtype's maximum
        (the image's maximum for float data). Real DAPI tissue clips 8-20 % of a FOV it fills: the
        default sits well above that.
    clipped_share : float
        A FOV is over-exposed, too, when more than this share of its bright pixels (those in the upper
        half of the range, at least ``min_bright_share`` of the FOV) is saturated. Well exposed tissue
        spreads over the upper half with its brightest nuclei clipped (0.35-0.65 of it saturated on
        real-looking chips); tissue at too high a gain piles up at the maximum (above 0.85), whatever
        share of the FOV the tissue covers.
    min_bright_share : float
        Fewer bright pixels than this share of the FOV are not judged for clipping.
    lifted_level, lifted_saturated : float
        A FOV is over-exposed, too, when even its darkest part (:attr:`FovCheck.level`) is above
        ``lifted_level`` of the range while more than ``lifted_saturated`` of it is saturated: the
        gain lifts everything, surface and tissue (the darkest part of a FOV that well exposed
        real-looking tissue fills is below 0.27 of the range).
    focus_blurred : float
        A FOV is blurred when its focus measure (:attr:`FovCheck.focus`) is below this.
    dark_share, dark_level : float
        A FOV is dark (nearly empty) when more than ``dark_share`` of its pixels are below
        ``dark_level`` of the dtype's range.
    clarity_windows : int
        Most clarity windows per FOV.
    """

    um_per_px: float = 0.5
    scale_tolerance: float = 0.1
    min_lines: int = 2
    saturation_share: float = 0.35
    dark_share: float = 0.95
    dark_level: float = 0.02
    clarity_windows: int = 8
    clipped_share: float = 0.75
    min_bright_share: float = 0.02
    lifted_level: float = 0.33
    lifted_saturated: float = 0.05
    focus_blurred: float = 0.45

    def __post_init__(self) -> None:
        if not (self.um_per_px > 0 and 0 < self.scale_tolerance < 1 and self.min_lines >= 1):
            msg = (
                "FovParams needs um_per_px > 0, 0 < scale_tolerance < 1 and min_lines >= 1, got "
                f"{self.um_per_px}, {self.scale_tolerance}, {self.min_lines}"
            )
            raise ValueError(msg)
        shares = (
            self.saturation_share, self.dark_share, self.dark_level, self.clipped_share,
            self.min_bright_share, self.lifted_level, self.lifted_saturated,
        )  # fmt: skip
        if not all(0 <= v <= 1 for v in shares) or self.clarity_windows < 1 or not self.focus_blurred > 0:
            msg = f"FovParams shares and levels must be in 0..1, clarity_windows >= 1 and focus_blurred > 0, got {self}"
            raise ValueError(msg)

    def key_part(self) -> str:
        """The parameters as stable text (sorted JSON), for cache keys."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class FovCheck:
    """One FOV's checks (:func:`check_fov`); immutable, cached by content digest.

    Attributes
    ----------
    name, row, col :
        The tile's name and grid index.
    digest : str
        The tile's content digest.
    track_found : bool
        Track lines present (see the module docstring for the rule).
    track_angle : float or None
        Grid angle, degrees, :mod:`qc.track.grid` conventions (as the whole-chip ``angle_deg``);
        None when no lines were matched.
    track_lines : (int, int)
        Template lines matched (vertical family, horizontal family).
    clarity : dict
        Clarity class -> window count (the shipped model's classes and ``background``); empty without a model.
    clarity_score : float or None
        0-100 as the whole-chip clarity score; None without a model or when every window is background.
    saturated, dark : float
        Shares (0-1) of saturated and of dark pixels.
    over_exposed, empty : bool
        Over-exposed: ``saturated > saturation_share``, or ``clipped > clipped_share``, or
        ``level > lifted_level`` with ``saturated > lifted_saturated``; empty: ``dark > dark_share``.
    polarity : str
        ``"dark"`` or ``"bright"``: the line contrast of the track result (``""`` without a template).
    focus : float or None
        Model-free focus measure: the fine-to-coarse band energy ratio of a difference-of-Gaussians
        pyramid over the FOV's structured, unsaturated pixels, at about 1 um per pixel (the FOV is
        area-reduced by ``round(1 / um_per_px)``, so a blur is judged by its size on the chip). At 10x,
        sharp real-looking and easy FOVs measure 0.5-0.85, FOVs blurred by a Gaussian of 4 px or more
        below 0.35 (``benchmarks/bench_fov_rules.py``). None when too little of the FOV holds
        structure (bare chip surface).
    blurred : bool
        ``focus < focus_blurred`` of the parameters used (False without a focus measure).
    surface : float
        Share (0-1) of the FOV that looks like bare chip surface: cells of about 4 um neither
        clearly brighter than the FOV's darkest (``level``; on bright field RGB: grey, not stained)
        nor holding a saturated pixel. A FOV
        that tissue fills has no surface of its own to compare with: :func:`assess` also compares
        ``level`` with the darkest FOVs of the scan.
    level : float
        The FOV's darkest level: the 2nd percentile of its 4 um cell means, as a share of the range.
    clipped : float
        Share (0-1) of the FOV's bright pixels (upper half of the range) that are saturated; 0
        when they are fewer than ``min_bright_share`` of the FOV.
    """

    name: str
    row: int
    col: int
    digest: str
    track_found: bool
    track_angle: float | None
    track_lines: tuple[int, int]
    clarity: dict[str, int]
    clarity_score: float | None
    saturated: float
    dark: float
    over_exposed: bool = False
    empty: bool = False
    polarity: str = ""
    focus: float | None = None
    blurred: bool = False
    surface: float = 0.0
    level: float = 0.0
    clipped: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the report's per-FOV entry)."""
        return {
            "name": self.name,
            "row": self.row,
            "col": self.col,
            "digest": self.digest,
            "track_found": self.track_found,
            "track_angle": None if self.track_angle is None else round(self.track_angle, 4),
            "track_lines": list(self.track_lines),
            "clarity": dict(self.clarity),
            "clarity_score": None if self.clarity_score is None else round(self.clarity_score, 2),
            "saturated": round(self.saturated, 5),
            "dark": round(self.dark, 5),
            "over_exposed": self.over_exposed,
            "empty": self.empty,
            "polarity": self.polarity,
            "focus": None if self.focus is None else round(self.focus, 4),
            "blurred": self.blurred,
            "surface": round(self.surface, 4),
            "level": round(self.level, 5),
            "clipped": round(self.clipped, 4),
        }

    def to_bytes(self) -> bytes:
        """Compact JSON (the cached value)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> FovCheck:
        v = json.loads(data)
        return cls(
            name=str(v["name"]),
            row=int(v["row"]),
            col=int(v["col"]),
            digest=str(v["digest"]),
            track_found=bool(v["track_found"]),
            track_angle=None if v["track_angle"] is None else float(v["track_angle"]),
            track_lines=(int(v["track_lines"][0]), int(v["track_lines"][1])),
            clarity={str(k): int(n) for k, n in v["clarity"].items()},
            clarity_score=None if v["clarity_score"] is None else float(v["clarity_score"]),
            saturated=float(v["saturated"]),
            dark=float(v["dark"]),
            over_exposed=bool(v.get("over_exposed", False)),
            empty=bool(v.get("empty", False)),
            polarity=str(v.get("polarity", "")),
            focus=None if v.get("focus") is None else float(v["focus"]),
            blurred=bool(v.get("blurred", False)),
            surface=float(v.get("surface", 0.0)),
            level=float(v.get("level", 0.0)),
            clipped=float(v.get("clipped", 0.0)),
        )

    def renamed(self, tile: Tile) -> FovCheck:
        """The same result for ``tile`` (a cached entry is keyed by content, not by name or place)."""
        if (self.name, self.row, self.col) == (tile.name, tile.row, tile.col):
            return self
        d = asdict(self)
        d.update(name=tile.name, row=tile.row, col=tile.col)
        d["track_lines"] = tuple(d["track_lines"])
        return FovCheck(**d)


# -- identity and keys ----------------------------------------------------------------------------

_MODEL_IDS: dict[tuple[str, int, int], str] = {}


def clarity_model_id(model: LoadedClarityModel | None) -> str | None:
    """A clarity model's identity for cache keys: its name, classes, window and the file's SHA-256.

    The file is hashed once per process (memoised by path, size and modification time).
    """
    if model is None:
        return None
    spec = model.spec
    try:
        st = os.stat(spec.path)
        memo = (str(spec.path), st.st_size, st.st_mtime_ns)
        digest = _MODEL_IDS.get(memo)
        if digest is None:
            with open(spec.path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            _MODEL_IDS[memo] = digest
    except OSError:
        digest = "unreadable"
    return f"{spec.name}:{','.join(spec.classes)}:{spec.window}:{spec.rgb}:{digest}"


def fov_key(digest: str, params: FovParams, model_id: str | None, template: ChipTemplate | None = None) -> str:
    """Cache key of one FOV check: ``fov|`` and the SHA-256 of the version, digest, parameters,
    model identity and template (``template`` may be omitted when there is none)."""
    payload = json.dumps(
        [FOV_CHECK_VERSION, digest, params.key_part(), model_id, _template_id(template)],
        separators=(",", ":"),
    )
    return "fov|" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _template_id(template: ChipTemplate | None) -> str | None:
    if template is None:
        return None
    return f"{template.name}:{','.join(map(str, template.offsets))}:{template.pitch_nm:g}"


# -- one FOV --------------------------------------------------------------------------------------


def _range(pixels: np.ndarray) -> tuple[float, float]:
    """(low, top) of the pixel range: the dtype's for integers, the data's for floats."""
    if pixels.dtype.kind in "ui":
        top = float(np.iinfo(pixels.dtype).max)
        low = 0.0 if pixels.dtype.kind == "u" else float(np.iinfo(pixels.dtype).min)
    else:
        top = float(np.nanmax(pixels)) if pixels.size else 0.0
        low = min(0.0, float(np.nanmin(pixels))) if pixels.size else 0.0
    return low, top


def _exposure(pixels: np.ndarray, grey: np.ndarray, params: FovParams) -> tuple[float, float, np.ndarray]:
    """(saturated share, dark share, saturated mask) of the pixels."""
    low, top = _range(pixels)
    if pixels.ndim == 3:  # channel by channel: a reduction over the last, short axis is slow in numpy
        at_top: np.ndarray = (pixels[..., 0] >= top) | (pixels[..., 1] >= top) | (pixels[..., 2] >= top)
    else:
        at_top = np.asarray(pixels >= top)
    saturated = float(np.count_nonzero(at_top)) / max(at_top.size, 1)
    dark = float(np.count_nonzero(grey < low + params.dark_level * (top - low))) / max(grey.size, 1)
    return saturated, dark, at_top


def _levels(grey: np.ndarray, low: float, top: float) -> np.ndarray:
    """``grey`` as float32 on a 0-255 scale of its range."""
    span = top - low if top > low else 1.0
    out: np.ndarray = (grey.astype(np.float32) - np.float32(low)) * np.float32(255.0 / span)
    return out


def _reduce(a: np.ndarray, f: int) -> np.ndarray:
    """Area mean over ``f x f`` blocks (float32); the ragged edge is dropped."""
    if f <= 1:
        return a
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    out: np.ndarray = cv2.resize(a[:h, :w], (w // f, h // f), interpolation=cv2.INTER_AREA)
    return out


#: Focus: the pixel size (um) the measure works at, the first band's sigma there (px), how far above the
#: FOV's quiet floor the coarse band must be for a pixel to count as structure, and the least share of such pixels
_FOCUS_UM = 1.0
_FOCUS_SIGMA = 0.5
_FOCUS_STRUCTURE = 25.0
_FOCUS_MIN_SHARE = 0.05


def _focus(lv: np.ndarray, sat: np.ndarray, um_per_px: float) -> float | None:
    """Fine-to-coarse band energy ratio over the structured, unsaturated pixels (see :class:`FovCheck`).

    ``lv`` is the FOV on a 0-255 scale, ``sat`` its saturated mask. The FOV is area-reduced to about
    :data:`_FOCUS_UM` um per pixel; bands are differences of Gaussians of sigma s, s*sqrt(3)... so
    each blur is one more step of the previous one. Pixels next to a saturated one are left out
    (clipping makes flat areas with hard edges), and so are pixels whose coarse band energy is not
    well above the FOV's quiet floor (its 10th percentile): noise on bare surface is not structure.
    """
    f = max(1, round(_FOCUS_UM / um_per_px))
    g = _reduce(lv, f)
    sr = _reduce(sat.view(np.uint8).astype(np.float32), f) > 0 if sat.any() else None
    if min(g.shape) < 32:
        return None
    b1 = cv2.GaussianBlur(g, (0, 0), _FOCUS_SIGMA)
    b2 = cv2.GaussianBlur(b1, (0, 0), _FOCUS_SIGMA * math.sqrt(3.0))
    b4 = cv2.GaussianBlur(b2, (0, 0), _FOCUS_SIGMA * math.sqrt(12.0))
    fine, coarse_band = b1 - b2, b2 - b4
    energy = cv2.blur(coarse_band * coarse_band, (15, 15))
    floor = float(np.percentile(energy, 10))
    mask = energy > max(_FOCUS_STRUCTURE * floor, 1.0)
    if sr is not None:
        mask &= ~(cv2.dilate(sr.view(np.uint8), np.ones((5, 5), np.uint8)) > 0)
    if np.count_nonzero(mask) < _FOCUS_MIN_SHARE * mask.size:
        return None
    e2 = float(np.mean(np.square(coarse_band[mask])))
    if e2 <= 0:
        return None
    return math.sqrt(float(np.mean(np.square(fine[mask]))) / e2)


#: Cover: cell side (um) of the surface map; a cell is brighter than bare surface when above the FOV's
#: darkest cells (their 2nd percentile) by this factor and at least this many levels of 255; bright pixels
#: (for clipping) are at or above this share of the range
_CELL_UM = 4.0
_SURFACE_FACTOR = 3.0
_SURFACE_STEP = 8.0
_BRIGHT = 0.5
#: Bright field: a cell is stained tissue when its colour (max - min channel, levels of 255) is above this;
#: the bare chip surface is grey
_STAIN_CHROMA = 20.0


def _cover(
    lv: np.ndarray, sat: np.ndarray, um_per_px: float, *, chroma: np.ndarray | None = None
) -> tuple[float, float, float, float]:
    """(surface, level, bright share, clipped) of the FOV (see :class:`FovCheck`).

    ``lv`` is the FOV on a 0-255 scale, ``sat`` its saturated mask. ``chroma`` (colour, 0-255 scale)
    is given for bright field (RGB): there the level is taken from the inverted image (tissue
    absorbs) and a cell is bare surface when it is grey (:data:`_STAIN_CHROMA`); on fluorescence
    when it is not clearly brighter than the FOV's darkest cells.
    """
    c = max(1, round(_CELL_UM / um_per_px))
    cells = _reduce(lv if chroma is None else 255.0 - lv, c)
    if cells.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    satc = _reduce(sat.view(np.uint8).astype(np.float32), c) if sat.any() else None
    lo = float(np.percentile(cells, 2))
    if chroma is None:
        quiet = cells <= max(_SURFACE_FACTOR * lo, lo + _SURFACE_STEP)
    else:
        quiet = _reduce(chroma, c) <= _STAIN_CHROMA
    if satc is not None:
        quiet &= satc == 0
    surface = float(np.count_nonzero(quiet)) / cells.size
    bright = np.asarray(lv >= _BRIGHT * 255.0)
    n_bright = int(np.count_nonzero(bright))
    clipped = float(np.count_nonzero(sat & bright)) / n_bright if n_bright else 0.0
    return surface, lo / 255.0, n_bright / max(lv.size, 1), clipped


@dataclass(frozen=True)
class _Axis:
    matched: int
    expected: int
    scale: float
    phase: float
    strength: float
    positions: np.ndarray  # profile positions of the matched dips


def _match_axis(dips: coarse.Dips, tmpl: ChipTemplate, srange: tuple[float, float], tol: float) -> _Axis | None:
    """The template placement (scale within ``srange``) that explains the most dips of one profile.

    Hypotheses: every pair of dips read as 1-4 consecutive template intervals. Each is scored by
    the template lines inside the profile's valid range that have a dip within ``tol``.
    """
    pos = dips.pos
    if pos.size < 2:
        return None
    offs = np.asarray(tmpl.offsets, float)
    q = np.asarray(tmpl.positions, float)
    n9 = len(offs)
    i, j = np.triu_indices(pos.size, 1)
    d = pos[j] - pos[i]
    spans, starts = [], []
    for j0 in range(n9):
        for m in range(1, 5):
            spans.append(sum(offs[(j0 + t) % n9] for t in range(m)))
            starts.append(q[j0])
    span = np.asarray(spans)[None, :]
    s = d[:, None] / span
    ok = (s >= srange[0]) & (s <= srange[1])
    if not ok.any():
        return None
    pi = np.broadcast_to(pos[i][:, None], s.shape)[ok]
    st = np.broadcast_to(np.asarray(starts)[None, :], s.shape)[ok]
    s = s[ok]
    phase = pi - s * st
    # predicted lines of each hypothesis inside [lo, hi]
    lo, hi = dips.lo, dips.hi
    kmax = math.ceil((hi - lo) / (srange[0] * float(offs.min()))) + n9 + 2
    k0 = (np.floor((lo - phase) / (s * tmpl.period)).astype(np.int64) - 1) * n9
    k = k0[:, None] + np.arange(kmax + n9)[None, :]
    x = phase[:, None] + s[:, None] * tmpl.line_positions(k)
    inside = (x >= lo - tol) & (x <= hi + tol)
    nearest = np.clip(np.searchsorted(pos, x), 1, pos.size - 1)
    left = np.abs(pos[nearest - 1] - x) < np.abs(pos[nearest] - x)
    nearest = np.where(left, nearest - 1, nearest)
    hit = inside & (np.abs(pos[nearest] - x) <= tol)
    matched = hit.sum(axis=1)
    strength = (dips.strength[nearest] * hit).sum(axis=1)
    expected = (inside & (x >= lo) & (x <= hi)).sum(axis=1)
    missed = np.maximum(expected - matched, 0)
    best = int(np.lexsort((strength, -missed, matched))[-1])
    hits = np.unique(nearest[best][hit[best]])
    return _Axis(int(hits.size), int(expected[best]), float(s[best]), float(phase[best]), float(strength[best]),
                 pos[hits])  # fmt: skip


def _lines_ok(ax: _Axis | None, params: FovParams) -> bool:
    return ax is not None and ax.matched >= params.min_lines and ax.expected - ax.matched <= 1


@dataclass(frozen=True)
class _Track:
    found: bool
    angle: float | None
    lines: tuple[int, int]
    polarity: str
    rank: tuple[int, int, float]


def _half_drift(n: np.ndarray, valid: np.ndarray, angle: float, ax: _Axis, axis: int, tol: float) -> float | None:
    """Residual angle (deg) from how the matched lines of one family move between the FOV's two halves."""
    h, w = n.shape
    if min(h, w) < 64 or ax.positions.size == 0:
        return None
    rot, mat = coarse._rotate(n, angle)
    vrot = cv2.warpAffine(valid.view(np.uint8), mat, (w, h), flags=cv2.INTER_NEAREST)
    # x-family (vertical) lines: profile along columns in the top and bottom halves
    halves = (slice(0, h // 2), slice(h // 2, h)) if axis == 0 else (slice(0, w // 2), slice(w // 2, w))
    found: list[np.ndarray] = []
    for sl in halves:
        if axis == 0:
            part, cnt = rot[sl].sum(axis=0), vrot[sl].sum(axis=0, dtype=np.float64)
        else:
            part, cnt = rot[:, sl].sum(axis=1), vrot[:, sl].sum(axis=1, dtype=np.float64)
        dips = coarse.find_dips(part / np.maximum(cnt, 1.0), cnt, min_snr=3.0)
        found.append(dips.pos)
    shifts = []
    for p in ax.positions:
        a, b = found
        if a.size == 0 or b.size == 0:
            continue
        pa, pb = a[np.argmin(np.abs(a - p))], b[np.argmin(np.abs(b - p))]
        if abs(pa - p) <= tol and abs(pb - p) <= tol:
            shifts.append(pb - pa)
    if not shifts:
        return None
    dist = (h if axis == 0 else w) / 2.0
    # a vertical line leaning right going down (x grows with y) is a clockwise turn: negative
    # here, as the angle convention has positive clockwise and x = x0 - y * sin(angle)
    sign = -1.0 if axis == 0 else 1.0
    return sign * math.degrees(math.atan2(float(np.median(shifts)), dist))


def _track(grey: np.ndarray, template: ChipTemplate, params: FovParams, *, bright_first: bool = False) -> _Track:
    """Track lines of one FOV. The usual polarity is tried first (dark lines on fluorescence, light
    ones on bright field: ``bright_first``), the other only when the first finds no lines."""
    h, w = grey.shape
    s0 = template.px_per_dnb(params.um_per_px)
    smin, smax = s0 * (1 - params.scale_tolerance), s0 * (1 + params.scale_tolerance)
    f = 2 if min(h, w) >= 1024 else 1
    kernel = coarse.line_kernel(smax)
    tol = max(1.5, 3.0 / f)
    best: _Track | None = None
    fit: tuple[np.ndarray, np.ndarray, float, _Axis | None, _Axis | None] | None = None
    for pol in ("bright", "dark") if bright_first else ("dark", "bright"):
        if best is not None and best.found:
            break
        ev = coarse.reduce_lines(grey, f, kernel=kernel, polarities=(pol,))
        n, valid = coarse.normalise(coarse.line_dips(ev.pop(pol), f, kernel))
        cands = coarse.estimate_angle(n, peaks=2)
        for k, (angle, prominence) in enumerate(cands):
            if k and prominence < 0.3 * cands[0][1]:
                continue  # as the whole-chip search: a weak second ray is no grid
            px, cx, py, cy, _ = coarse.profiles(n, valid, angle)
            axx = _match_axis(coarse.find_dips(px, cx), template, (smin / f, smax / f), tol)
            axy = _match_axis(coarse.find_dips(py, cy), template, (smin / f, smax / f), tol)
            found = _lines_ok(axx, params) and _lines_ok(axy, params)
            lines = (axx.matched if axx else 0, axy.matched if axy else 0)
            rank = (int(found), min(lines), (axx.strength if axx else 0.0) + (axy.strength if axy else 0.0))
            if best is not None and rank <= best.rank:
                continue
            best = _Track(found, angle if found else None, lines, pol, rank)
            fit = (n, valid, angle, axx, axy)
    assert best is not None and fit is not None
    n, valid, angle, axx, axy = fit
    if best.found and axx is not None and axy is not None:
        drifts = [
            d
            for d in (_half_drift(n, valid, angle, axx, 0, tol), _half_drift(n, valid, angle, axy, 1, tol))
            if d is not None
        ]
        if drifts:
            best = replace(best, angle=angle + float(np.mean(drifts)))
    return best


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        msg = f"a FOV must be a 2-D grey array or H x W x 3 RGB, got shape {arr.shape}"
        raise ValueError(msg)
    if arr.dtype.kind not in "uif":
        msg = f"a FOV's dtype must be integer or float, got {arr.dtype}"
        raise ValueError(msg)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return arr


def check_fov(
    pixels: np.ndarray,
    tile: Tile,
    *,
    digest: str,
    template: ChipTemplate | None,
    params: FovParams,
    clarity_model: LoadedClarityModel | None,
) -> FovCheck:
    """Check one FOV: track lines, clarity and exposure (see the module docstring).

    Parameters
    ----------
    pixels : ndarray, shape (H, W) or (H, W, 3)
        The tile's decoded pixels (grey uint8/uint16/float, or RGB).
    tile : Tile
        Its name and grid index.
    digest : str
        Its content digest (recorded, and the cache key's part).
    template : ChipTemplate or None
        The chip's track-line template; None skips the track check (``track_found`` False).
    params : FovParams
    clarity_model : LoadedClarityModel or None
        None skips clarity (empty counts, no score); an RGB FOV with a grey-only model too.

    Returns
    -------
    FovCheck
    """
    arr = _check_pixels(pixels)
    grey = coarse.to_grey(arr)
    saturated, dark, sat = _exposure(arr, grey, params)
    lv = _levels(grey, *_range(arr))
    focus = _focus(lv, sat, params.um_per_px)
    chroma = None
    if arr.ndim == 3:
        low, top = _range(arr)
        span = np.float32(255.0 / (top - low if top > low else 1.0))
        r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
        hi, lo_ = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
        chroma = (hi.astype(np.float32) - lo_.astype(np.float32)) * span
    surface, level, bright, clipped = _cover(lv, sat, params.um_per_px, chroma=chroma)
    if bright < params.min_bright_share:
        clipped = 0.0
    track = _Track(False, None, (0, 0), "", (0, 0, 0.0))
    if template is not None and min(grey.shape) >= 64:
        track = _track(grey, template, params, bright_first=arr.ndim == 3)
    counts: dict[str, int] = {}
    score: float | None = None
    if clarity_model is not None and arr.dtype in (np.uint8, np.uint16):
        spec = clarity_model.spec
        if (arr.ndim == 2 or spec.supports_colour) and min(arr.shape[:2]) >= spec.window:
            res = evaluate_clarity(arr, clarity_model, max_windows=params.clarity_windows)
            counts = {c: int(n) for c, n in res.counts.items()}
            score = res.score
    return FovCheck(
        name=tile.name,
        row=int(tile.row),
        col=int(tile.col),
        digest=digest,
        track_found=track.found,
        track_angle=track.angle,
        track_lines=track.lines,
        clarity=counts,
        clarity_score=score,
        saturated=saturated,
        dark=dark,
        over_exposed=saturated > params.saturation_share
        or clipped > params.clipped_share
        or (level > params.lifted_level and saturated > params.lifted_saturated),
        empty=dark > params.dark_share,
        polarity=track.polarity,
        focus=focus,
        blurred=focus is not None and focus < params.focus_blurred,
        surface=surface,
        level=level,
        clipped=clipped,
    )


# -- a tile list through the cache ---------------------------------------------------------------


def check_fovs(
    tiles: Sequence[Tile],
    *,
    cache: PairCache | None,
    template: ChipTemplate | None,
    params: FovParams,
    clarity_model: LoadedClarityModel | None,
    loader: Callable[[Tile], np.ndarray] | None = None,
    on_result: Callable[[FovCheck, bool], None] | None = None,
    threads: int = 1,
) -> list[FovCheck]:
    """Every tile's :class:`FovCheck`, in the order given, through the cache.

    Digests are memoised under each tile's identity (``digest:`` keys, as
    :func:`qc.stitching.pairs.run_pairs` does, so the two share them), results under
    :func:`fov_key`. Only tiles whose result is not cached are decoded (once: a tile without a cheap
    digest is hashed from the same decode).

    Parameters
    ----------
    loader : callable, optional
        ``loader(tile) -> pixels``; default ``tile.read()``.
    on_result : callable, optional
        ``on_result(check, cached)`` for each tile as it is done (cached: from the cache), in the
        order given.
    threads : int
        Tiles decoded and checked at once (each holds one decoded tile).
    """
    read = loader if loader is not None else (lambda t: t.read())
    model_id = clarity_model_id(clarity_model)
    digests: dict[int, str] = {}
    decoded: dict[int, np.ndarray] = {}
    if cache is not None:
        ident = {i: digest_key(t.identity) for i, t in enumerate(tiles) if t.identity}
        got = cache_get_many(cache, ident.values())
        digests.update({i: got[k].decode("ascii") for i, k in ident.items() if k in got})
    fresh_digests: dict[str, bytes] = {}
    for i, t in enumerate(tiles):
        if i in digests:
            continue
        if t.digest_fn is not None:
            digests[i] = t.digest_fn()
        else:
            arr = np.asarray(read(t))
            decoded[i] = arr
            digests[i] = array_digest(arr)
        if t.identity:
            fresh_digests[digest_key(t.identity)] = digests[i].encode("ascii")
    if cache is not None:
        cache_put_many(cache, fresh_digests)
    keys = {i: fov_key(digests[i], params, model_id, template) for i in range(len(tiles))}
    hits = cache_get_many(cache, keys.values()) if cache is not None else {}

    def compute(i: int) -> FovCheck:
        t = tiles[i]
        arr = decoded.pop(i) if i in decoded else np.asarray(read(t))
        check = check_fov(arr, t, digest=digests[i], template=template, params=params, clarity_model=clarity_model)
        del arr
        if cache is not None:
            cache.put(keys[i], check.to_bytes())
        return check

    out: list[FovCheck] = []
    misses = [i for i in range(len(tiles)) if keys[i] not in hits]
    with contextlib.closing(ahead(compute, misses, max(1, threads))) as computed:
        for i, t in enumerate(tiles):
            value = hits.get(keys[i])
            if value is not None:
                check, cached = FovCheck.from_bytes(value).renamed(t), True
            else:
                check, cached = next(computed), False  # the misses come in the order of the tiles
            out.append(check)
            if on_result is not None:
                on_result(check, cached)
    return out


def fov_summary(checks: Sequence[FovCheck], *, cached: int = 0) -> dict[str, Any]:
    """The report's per-image ``fov_checks`` block: counts, then one entry per FOV."""
    clarity = dict.fromkeys(CATEGORIES, 0)
    for c in checks:
        for k, n in c.clarity.items():
            clarity[k] = clarity.get(k, 0) + n
    scored = [c.clarity_score for c in checks if c.clarity_score is not None]
    focused = [c.focus for c in checks if c.focus is not None]
    return {
        "version": FOV_CHECK_VERSION,
        "fovs_total": len(checks),
        "fovs_cached": int(cached),
        "with_lines": sum(c.track_found for c in checks),
        "without_lines": [c.name for c in checks if not c.track_found][:MAX_PROBLEM_FOVS],
        "clarity_counts": clarity,
        "clarity_score_min": round(min(scored), 2) if scored else None,
        "blurred": sum(c.blurred for c in checks),
        "focus_min": round(min(focused), 4) if focused else None,
        "over_exposed": sum(c.over_exposed for c in checks),
        "dark": sum(c.empty for c in checks),
        "fovs": [c.to_dict() for c in checks],
    }


# -- judging the FOVs seen so far --------------------------------------------------------------


@dataclass(frozen=True)
class WarningRules:
    """When live QC warns, and about what (see :func:`assess`).

    Attributes
    ----------
    start_share, start_rows :
        Warn only after this share of the grid, or this many full rows, whichever comes first.
    window : int
        Judge the latest ``window`` FOVs in acquisition order; 0 = one row (the grid's columns), at least 5.
        Lines and focus are judged on the open and the focus-measured FOVs of the window, or when it
        holds too few (``min_open``, ``min_scored``), on the latest that many of the last three windows.
    no_track_share : float
        More than this share of the window's open FOVs without track lines is a problem. A FOV is
        open when at least ``open_surface`` of it looks like bare chip surface and its darkest level
        is near the scan's surface (see :func:`open_fovs`): lines are seldom visible under tissue,
        so FOVs that tissue fills are not judged. Not raised while any of the last three windows'
        FOVs is blurred: lines out of focus vanish, and the blur warning says why.
    open_surface : float
        Share of bare surface that makes a FOV open.
    min_open : int
        Fewer open FOVs in the window than this: lines are not judged.
    angle_spread_deg : float
        A spread of the FOV angles (with lines, neither over-exposed nor blurred) beyond this is a problem; strays
        (far from the median compared with the others' deviation, see :func:`_spread`) are left out.
    blurred_share : float
        More than this share of the window's FOVs with a focus measure flagged ``blurred`` is a problem.
    min_scored : int
        Fewer FOVs with a focus measure in the window than this: focus is not judged.
    saturated_share : float
        More than this share of the window's FOVs with notable clipping (2 % of their pixels
        saturated, or over-exposed) over-exposed is a problem. Real tissue clips; a FOV is
        over-exposed only beyond that (:class:`FovParams`), and FOVs of bare surface, where a high
        gain clips nothing, do not dilute the share.
    max_pair_deviation_px : float
        A neighbour pair in the window measured ``mismatch``, or shifted by more than this, is a problem.
    """

    start_share: float = 0.15
    start_rows: int = 2
    window: int = 0
    no_track_share: float = 0.5
    open_surface: float = 0.5
    min_open: int = 3
    angle_spread_deg: float = 0.5
    blurred_share: float = 0.5
    min_scored: int = 2
    saturated_share: float = 0.3
    max_pair_deviation_px: float = 50.0


@dataclass(frozen=True)
class LiveProblem:
    """A problem the FOVs seen so far show.

    ``code`` is one of ``no_track_lines``, ``angle_spread``, ``blur``, ``saturation``,
    ``stitching``; ``fovs`` names the FOVs behind it (at most :data:`MAX_PROBLEM_FOVS`);
    ``reason`` is one sentence with the numbers.
    """

    code: str
    fovs: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class LivePair:
    """A registered neighbour pair as live QC knows it: ``b`` right of or below ``a``; ``shift``
    ``(dx, dy)`` px is the measured deviation from the nominal offset."""

    a: str
    b: str
    status: str
    shift: tuple[float, float]
    ncc: float = field(default=0.0)


def warning_due(seen: Sequence[FovCheck], grid: tuple[int, int], rules: WarningRules) -> bool:
    """Whether enough of the grid was seen to warn: ``start_share`` of it, or ``start_rows`` full rows."""
    rows, cols = grid
    if not seen:
        return False
    if len(seen) >= rules.start_share * rows * cols:
        return True
    per_row: dict[int, set[int]] = {}
    for c in seen:
        per_row.setdefault(c.row, set()).add(c.col)
    full = sum(1 for cs in per_row.values() if len(cs) >= cols)
    return full >= rules.start_rows


def _names(checks: Sequence[FovCheck]) -> tuple[str, ...]:
    return tuple(c.name for c in checks[:MAX_PROBLEM_FOVS])


#: Angles farther from the window's median than this many median absolute deviations, and than
#: :data:`_STRAY_MIN_DEG`, are strays (a FOV whose few lines were misread), left out of the spread
_STRAY_MADS = 3.0
_STRAY_MIN_DEG = 0.2


def _spread(angles: list[float]) -> tuple[float, float, float]:
    """(low, high, spread) of the angles, strays left out: those farther from the median than
    :data:`_STRAY_MADS` median absolute deviations and :data:`_STRAY_MIN_DEG`. Angles that drift
    (a moving stage) spread evenly and stay in; a few misread FOVs do not make a spread."""
    a = np.asarray(sorted(angles), float)
    med = float(np.median(a))
    mad = float(np.median(np.abs(a - med)))
    kept = a[np.abs(a - med) <= max(_STRAY_MADS * mad, _STRAY_MIN_DEG)]
    return float(kept[0]), float(kept[-1]), float(kept[-1] - kept[0])


#: A FOV is near the scan's surface level when its darkest level is at most this factor times the
#: scan's surface level, or this much (share of the range) above it
_OPEN_LEVEL_FACTOR = 3.0
_OPEN_LEVEL_STEP = 0.02


def open_fovs(window: Sequence[FovCheck], seen: Sequence[FovCheck], rules: WarningRules) -> list[FovCheck]:
    """The FOVs of ``window`` where track lines should show: at least ``rules.open_surface`` bare
    surface (:attr:`FovCheck.surface`), and a darkest level (:attr:`FovCheck.level`) near the scan's
    surface level, the lowest level of the FOVs of ``seen`` (the darkest part of a FOV that shows any
    bare surface is that surface). Neither empty nor over-exposed FOVs count, nor are they open: lines
    in clipped FOVs are not trusted. A FOV that saturating tissue fills has little surface; one that unsaturated tissue fills
    has its own darkest level far above the surface seen elsewhere in the scan."""
    levels = [c.level for c in seen if not (c.empty or c.over_exposed)]
    if not levels:
        return []
    ref = min(levels)
    top = max(_OPEN_LEVEL_FACTOR * ref, ref + _OPEN_LEVEL_STEP)
    return [c for c in window if c.surface >= rules.open_surface and not (c.empty or c.over_exposed) and c.level <= top]


#: How many windows back the rules look for enough open or focus-measured FOVs
_LOOKBACK = 3
#: FOVs with at least this share of saturated pixels are the ones the saturation rule weighs
_NOTABLE_SATURATION = 0.02


def _latest(candidates: list[FovCheck], win: list[FovCheck], least: int) -> list[FovCheck]:
    """``candidates`` (in order, from the latest few windows) that are in the window ``win``; when
    fewer than ``least``, the latest ``least`` of them: a window whose FOVs are mostly tissue, or
    bare surface, is judged with the FOVs before it instead of not at all (no warnings that come
    and go with the tissue's outline)."""
    names = {c.name for c in win}
    inside = [c for c in candidates if c.name in names]
    return inside if len(inside) >= least else candidates[-least:]


def assess(
    seen: Sequence[FovCheck], pairs: Sequence[LivePair], grid: tuple[int, int], rules: WarningRules
) -> list[LiveProblem]:
    """The problems the latest FOVs show (empty until :func:`warning_due`).

    ``seen`` is in acquisition order; the latest ``window`` FOVs are judged, so a problem clears
    when enough later FOVs are fine. ``pairs`` are the neighbour pairs measured so far; those
    touching a FOV of the window count.
    """
    if not warning_due(seen, grid, rules):
        return []
    n = rules.window if rules.window > 0 else max(grid[1], 5)
    win = list(seen[-n:])
    out: list[LiveProblem] = []
    back = list(seen[-_LOOKBACK * n :])
    scored = _latest([c for c in back if c.focus is not None], win, rules.min_scored)
    blurred = [c for c in scored if c.blurred]
    blurry = len(scored) >= rules.min_scored and len(blurred) > rules.blurred_share * len(scored)
    if blurry:
        worst = min(c.focus for c in blurred if c.focus is not None)
        out.append(LiveProblem(
            "blur", _names(blurred),
            f"{len(blurred)} of the latest {len(scored)} FOVs with structure are blurred (focus measure as low "
            f"as {worst:.2f}); check the focus",
        ))  # fmt: skip
    opened = _latest(open_fovs(back, seen, rules), win, rules.min_open)
    without = [c for c in opened if not c.track_found]
    unfocused = blurry or any(c.blurred for c in back)
    if not unfocused and len(opened) >= rules.min_open and len(without) > rules.no_track_share * len(opened):
        out.append(LiveProblem(
            "no_track_lines", _names(without),
            f"{len(without)} of the latest {len(opened)} FOVs that show bare chip surface show no track lines; "
            "check focus, exposure and that the chip is on the stage the right way up",
        ))  # fmt: skip
    with_angle = [c for c in win if c.track_found and c.track_angle is not None and not (c.over_exposed or c.blurred)]
    if len(with_angle) >= 3:
        lo, hi, spread = _spread([float(c.track_angle) for c in with_angle if c.track_angle is not None])
        if spread > rules.angle_spread_deg:
            out.append(LiveProblem(
                "angle_spread", _names(with_angle),
                f"the track lines of the latest {len(with_angle)} FOVs lie at angles from {lo:.2f} to {hi:.2f} "
                f"degrees (spread {spread:.2f} > {rules.angle_spread_deg:g}); the chip or the stage may be moving",
            ))  # fmt: skip
    clipping = [c for c in win if c.saturated >= _NOTABLE_SATURATION or c.over_exposed]
    over = [c for c in clipping if c.over_exposed]
    if over and len(over) > rules.saturated_share * len(clipping):
        top = max(c.saturated for c in over)
        out.append(LiveProblem(
            "saturation", _names(over),
            f"{len(over)} of the latest {len(clipping)} FOVs with saturated pixels are over-exposed (up to "
            f"{top:.0%} of the pixels saturated, most of their bright signal clipped); lower the exposure time "
            "or the gain",
        ))  # fmt: skip
    names = {c.name for c in win}
    bad = [
        p
        for p in pairs
        if (p.a in names or p.b in names)
        and (p.status == "mismatch" or math.hypot(*p.shift) > rules.max_pair_deviation_px)
    ]
    if bad:
        worst_pair = max(bad, key=lambda p: math.hypot(*p.shift))
        fovs: list[str] = []
        for p in bad:
            fovs.extend(x for x in (p.a, p.b) if x not in fovs)
        mism = sum(p.status == "mismatch" for p in bad)
        out.append(LiveProblem(
            "stitching", tuple(fovs[:MAX_PROBLEM_FOVS]),
            f"{len(bad)} neighbour pairs of the latest FOVs do not fit together ({mism} whose overlaps do not "
            f"match, largest offset {math.hypot(*worst_pair.shift):.0f} px > {rules.max_pair_deviation_px:g} px "
            f"between {worst_pair.a} and {worst_pair.b}); check the stage and the tile overlap",
        ))  # fmt: skip
    return out
