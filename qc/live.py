"""Per-FOV checks for live QC: one tile at a time, while a microscope is still writing a chip's tiles.

Pure library (issue #18): the service side (``daemon/live.py``) feeds tiles as they become complete;
here each field of view (FOV) is checked on its own and the FOVs seen so far are judged.

:func:`check_fov` looks at one decoded tile:

* **Track lines.** The whole-chip detector's building blocks (:mod:`qc.track.coarse`): line evidence
  by a morphological top-hat, area-mean reduced 2x for tiles of 1024 px and more, contrast normalised,
  the grid angle from the whitened power spectrum, and per axis the profile along the lines and its
  dips. Both polarities are tried (dark lines on DAPI, light ones on H&E) and the better kept. A FOV
  holds only a few lines (2-4 per axis for a 1024 px tile at 10x), fewer than the whole-chip template
  fit needs (three), so each axis is matched here with the scale known: every pair of dips read as
  1-4 consecutive template intervals at a scale within ``scale_tolerance`` of the expected one
  (``template.px_per_dnb(um_per_px)``) proposes a placement of the template, and the placement
  explaining the most dips wins. **Lines are present** when on both axes at least ``min_lines``
  template lines are matched and at most one template line inside the FOV goes unmatched
  (an unmatched line is allowed: tissue can hide one). The angle is then refined from the drift of
  the matched lines between the two halves of the FOV.
* **Clarity.** :func:`qc.clarity.evaluate_clarity` with at most ``clarity_windows`` windows, so the
  classes and the score are the whole-chip result's.
* **Exposure.** The share of pixels at the dtype's maximum (saturated) and below ``dark_level`` of
  the range (dark), on the full-resolution pixels.

:func:`check_fovs` runs a tile list through the stitching pair cache (same key-value object, keys
prefixed ``fov|``), hashing and decoding only what the cache does not hold.

:func:`warning_due` and :func:`assess` judge the FOVs seen so far in acquisition order, over a rolling
window of the latest FOVs, so a problem clears by itself when later FOVs are fine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from qc.chip import ChipTemplate
from qc.clarity.evaluate import evaluate_clarity, intensity_range
from qc.clarity.model import CATEGORIES, LoadedClarityModel
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
    "warning_due",
]

#: Version of :func:`check_fov`; bump it whenever it would answer differently for the same inputs
#: (part of every cache key, so old entries are never read again).
FOV_CHECK_VERSION = "fov-2"  # 2: clarity's grey span at least a quarter of the camera's range

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
        (the image's maximum for float data).
    dark_share, dark_level : float
        A FOV is dark (nearly empty) when more than ``dark_share`` of its pixels are below
        ``dark_level`` of the dtype's range.
    clarity_windows : int
        Most clarity windows per FOV.
    """

    um_per_px: float = 0.5
    scale_tolerance: float = 0.1
    min_lines: int = 2
    saturation_share: float = 0.05
    dark_share: float = 0.95
    dark_level: float = 0.02
    clarity_windows: int = 16

    def __post_init__(self) -> None:
        if not (self.um_per_px > 0 and 0 < self.scale_tolerance < 1 and self.min_lines >= 1):
            msg = (
                "FovParams needs um_per_px > 0, 0 < scale_tolerance < 1 and min_lines >= 1, got "
                f"{self.um_per_px}, {self.scale_tolerance}, {self.min_lines}"
            )
            raise ValueError(msg)
        shares = (self.saturation_share, self.dark_share, self.dark_level)
        if not all(0 <= v <= 1 for v in shares) or self.clarity_windows < 1:
            msg = f"FovParams shares and levels must be in 0..1 and clarity_windows >= 1, got {self}"
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
        ``saturated > saturation_share`` and ``dark > dark_share`` of the parameters used.
    polarity : str
        ``"dark"`` or ``"bright"``: the line contrast of the track result (``""`` without a template).
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


def _exposure(pixels: np.ndarray, grey: np.ndarray, params: FovParams) -> tuple[float, float]:
    """(saturated share, dark share) of the pixels."""
    if pixels.dtype.kind in "ui":
        top = float(np.iinfo(pixels.dtype).max)
        low = 0.0 if pixels.dtype.kind == "u" else float(np.iinfo(pixels.dtype).min)
    else:
        top = float(np.nanmax(pixels)) if pixels.size else 0.0
        low = min(0.0, float(np.nanmin(pixels))) if pixels.size else 0.0
    at_top: np.ndarray = np.asarray(pixels >= top)
    if at_top.ndim == 3:
        at_top = np.asarray(at_top.any(axis=2))
    saturated = float(np.count_nonzero(at_top)) / max(at_top.size, 1)
    dark = float(np.count_nonzero(grey < low + params.dark_level * (top - low))) / max(grey.size, 1)
    return saturated, dark


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


def _track(grey: np.ndarray, template: ChipTemplate, params: FovParams) -> _Track:
    h, w = grey.shape
    s0 = template.px_per_dnb(params.um_per_px)
    smin, smax = s0 * (1 - params.scale_tolerance), s0 * (1 + params.scale_tolerance)
    f = 2 if min(h, w) >= 1024 else 1
    kernel = coarse.line_kernel(smax)
    tol = max(1.5, 3.0 / f)
    ev = coarse.reduce_lines(grey, f, kernel=kernel, polarities=("dark", "bright"))
    best: _Track | None = None
    for pol in ("dark", "bright"):
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
            refined: float | None = angle if found else None
            if found and axx is not None and axy is not None:
                drifts = [
                    d
                    for d in (_half_drift(n, valid, angle, axx, 0, tol), _half_drift(n, valid, angle, axy, 1, tol))
                    if d is not None
                ]
                if drifts:
                    refined = angle + float(np.mean(drifts))
            best = _Track(found, refined, lines, pol, rank)
    assert best is not None
    return best


#: Smallest grey span of a FOV's clarity map, as a share of the camera's range (see :func:`_fov_intensity`).
FOV_MIN_SPAN = 0.25


def _fov_intensity(arr: np.ndarray) -> tuple[float, float]:
    """The grey values a FOV's clarity windows map to 8-bit 0 and 255.

    The whole image's map (:func:`qc.clarity.intensity_range`) spans from its dark surface to its
    brightest tissue; a FOV of empty surface alone would be stretched into false texture (read as
    blur). So the FOV's own percentiles are widened to at least :data:`FOV_MIN_SPAN` of the camera's
    range: 255 for 8-bit data; for 16-bit, the FOV's maximum rounded up to a whole bit depth of at
    least 12 bits (cameras write 12-, 14- or 16-bit data in 16-bit files).
    """
    sample = arr[::2, ::2]
    if sample.ndim == 3:
        sample = np.ascontiguousarray(sample).max(axis=2)
    lo, hi = intensity_range(np.ascontiguousarray(sample))
    bits = 8 if arr.dtype == np.uint8 else max(12, int(np.max(sample)).bit_length())
    top = float(2**bits - 1)
    span = FOV_MIN_SPAN * top
    if hi - lo < span:
        hi = min(lo + span, max(top, hi))
        lo = min(lo, hi - span)
    return lo, hi


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
    saturated, dark = _exposure(arr, grey, params)
    track = _Track(False, None, (0, 0), "", (0, 0, 0.0))
    if template is not None and min(grey.shape) >= 64:
        track = _track(grey, template, params)
    counts: dict[str, int] = {}
    score: float | None = None
    if clarity_model is not None and arr.dtype in (np.uint8, np.uint16):
        spec = clarity_model.spec
        if (arr.ndim == 2 or spec.supports_colour) and min(arr.shape[:2]) >= spec.window:
            res = evaluate_clarity(
                arr, clarity_model, max_windows=params.clarity_windows, intensity=_fov_intensity(arr)
            )
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
        over_exposed=saturated > params.saturation_share,
        empty=dark > params.dark_share,
        polarity=track.polarity,
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
        ``on_result(check, cached)`` for each tile as it is done (cached: from the cache).
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
    out: list[FovCheck] = []
    for i, t in enumerate(tiles):
        value = hits.get(keys[i])
        if value is not None:
            check = FovCheck.from_bytes(value).renamed(t)
            cached = True
        else:
            arr = decoded.pop(i) if i in decoded else np.asarray(read(t))
            check = check_fov(arr, t, digest=digests[i], template=template, params=params, clarity_model=clarity_model)
            del arr
            if cache is not None:
                cache.put(keys[i], check.to_bytes())
            cached = False
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
    return {
        "version": FOV_CHECK_VERSION,
        "fovs_total": len(checks),
        "fovs_cached": int(cached),
        "with_lines": sum(c.track_found for c in checks),
        "without_lines": [c.name for c in checks if not c.track_found][:MAX_PROBLEM_FOVS],
        "clarity_counts": clarity,
        "clarity_score_min": round(min(scored), 2) if scored else None,
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
    no_track_share : float
        More than this share of the window's FOVs without track lines is a problem; FOVs covered by
        tissue (under a quarter of their clarity windows background) are left out, as tissue can
        hide the lines.
    angle_spread_deg : float
        A spread of the FOV angles (with lines) beyond this is a problem.
    blurred_share, blurred_score :
        More than ``blurred_share`` of the window's FOVs with tissue (a clarity score, and at least a
        quarter of the windows not background) blurred is a problem: clarity below ``blurred_score``
        with more blurred than over-exposed windows.
    saturated_share : float
        More than this share of the window's FOVs over-exposed is a problem.
    max_pair_deviation_px : float
        A neighbour pair in the window measured ``mismatch``, or shifted by more than this, is a problem.
    """

    start_share: float = 0.15
    start_rows: int = 2
    window: int = 0
    no_track_share: float = 0.5
    angle_spread_deg: float = 0.5
    blurred_share: float = 0.5
    blurred_score: float = 60.0
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


def _tissue_covered(c: FovCheck) -> bool:
    """Tissue over most of the FOV (under a quarter of its clarity windows background): its track lines
    may be hidden under the tissue, so it says nothing about whether the chip shows lines."""
    total = sum(c.clarity.values())
    return total > 0 and c.clarity.get("background", 0) < 0.25 * total


def _has_tissue(c: FovCheck) -> bool:
    """At least a quarter of the FOV's clarity windows show tissue: enough to judge its focus."""
    total = sum(c.clarity.values())
    return total == 0 or total - c.clarity.get("background", 0) >= 0.25 * total


def _blurred(c: FovCheck, score: float) -> bool:
    """Clarity below ``score`` with more blurred than over-exposed windows (a low score from
    over-exposure is the saturation rule's)."""
    if c.clarity_score is None or c.clarity_score >= score:
        return False
    blur = c.clarity.get("mild_blur", 0) + c.clarity.get("severe_blur", 0)
    over = c.clarity.get("mild_overexposure", 0) + c.clarity.get("severe_overexposure", 0)
    return blur > over or not c.clarity


def _spread(angles: list[float]) -> tuple[float, float, float]:
    """(low, high, spread) of the angles; with five or more, the one farthest from the median is left out."""
    a = sorted(angles)
    if len(a) >= 5:
        med = float(np.median(a))
        a.remove(max(a, key=lambda v: abs(v - med)))
    return a[0], a[-1], a[-1] - a[0]


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
    surface = [c for c in win if not _tissue_covered(c)]
    without = [c for c in surface if not c.track_found]
    if surface and len(without) > rules.no_track_share * len(surface):
        out.append(LiveProblem(
            "no_track_lines", _names(without),
            f"{len(without)} of the latest {len(surface)} FOVs not covered by tissue show no track lines; "
            "check focus, exposure and that the chip is on the stage the right way up",
        ))  # fmt: skip
    with_angle = [c for c in win if c.track_found and c.track_angle is not None]
    if len(with_angle) >= 3:
        lo, hi, spread = _spread([float(c.track_angle) for c in with_angle if c.track_angle is not None])
        if spread > rules.angle_spread_deg:
            out.append(LiveProblem(
                "angle_spread", _names(with_angle),
                f"the track lines of the latest {len(with_angle)} FOVs lie at angles from {lo:.2f} to {hi:.2f} "
                f"degrees (spread {spread:.2f} > {rules.angle_spread_deg:g}); the chip or the stage may be moving",
            ))  # fmt: skip
    scored = [c for c in win if c.clarity_score is not None and _has_tissue(c)]
    blurred = [c for c in scored if _blurred(c, rules.blurred_score)]
    if scored and len(blurred) > rules.blurred_share * len(scored):
        worst = min(c.clarity_score for c in blurred if c.clarity_score is not None)
        out.append(LiveProblem(
            "blur", _names(blurred),
            f"{len(blurred)} of the latest {len(scored)} FOVs with tissue are blurred (clarity below "
            f"{rules.blurred_score:g}, lowest {worst:.0f}); check the focus",
        ))  # fmt: skip
    over = [c for c in win if c.over_exposed]
    if len(over) > rules.saturated_share * len(win):
        top = max(c.saturated for c in over)
        out.append(LiveProblem(
            "saturation", _names(over),
            f"{len(over)} of the latest {len(win)} FOVs are over-exposed (up to {top:.0%} of the pixels "
            "saturated); lower the exposure time or the gain",
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
