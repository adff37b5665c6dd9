"""Neighbouring-FOV pairs: which to register, how, and how to reuse them.

Internal to :mod:`qc.stitching`. A pair is two tiles whose nominal
footprints overlap along a side (:func:`plan_pairs`), whatever the layout. Each pair is registered
on its nominal overlap (:func:`measure_pair`) and the measurement is cached
under a key of both tiles' content digests, the direction, the whole-pixel
nominal offset, the pair parameters and :data:`PAIR_ALGORITHM_VERSION`
(:func:`qc.stitching.pair_cache.pair_key`).

:func:`run_pairs` walks the grid row by row: it resolves the digests of a
row (memoised by tile identity, so a warm run hashes nothing), looks the
pairs that row completes up in the cache, decodes only the tiles that an
uncached pair needs (each tile at most once, keeping only its overlap
strips), registers the missing pairs on a thread pool and stores them. At
most two rows of strips are held at any time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from qc.errors import QCError
from qc.io.model import Tile, array_digest
from qc.registration import (
    ncc_surface,
    overlap_ncc,
    peak_candidates,
    phase_correlate,
    structure_snr,
    to_gray_float,
)
from qc.stitching.pair_cache import PairCache, cache_get_many, cache_put_many, digest_key, pair_key

__all__ = [
    "PAIR_ALGORITHM_VERSION",
    "PairMeasurement",
    "PairPlan",
    "measure_pair",
    "pair_downsample",
    "plan_pairs",
    "run_pairs",
]

#: Version of the pair registration; bump it whenever :func:`measure_pair`
#: would return a different answer for the same inputs (invalidates the cache).
PAIR_ALGORITHM_VERSION = "pair-3"  # 3: several correlation peaks judged by overlap NCC, distinctness

_PEAK_RATIO_CAP = 1000.0

STATUS_OK = "ok"
STATUS_NO_INFO = "no_information"
STATUS_MISMATCH = "mismatch"


@dataclass(frozen=True)
class PairPlan:
    """Where two neighbouring tiles overlap nominally.

    ``a``/``b`` index the tile list (b is right of or below a); ``offset`` is
    b's whole-pixel nominal offset from a, ``(dx, dy)``; ``region_a`` and
    ``region_b`` are the overlap ``(x0, y0, x1, y1)`` in each tile's own
    pixels; ``max_shift`` is the largest deviation searched, ``(y, x)``.
    """

    a: int
    b: int
    direction: str
    offset: tuple[int, int]
    region_a: tuple[int, int, int, int]
    region_b: tuple[int, int, int, int]
    max_shift: tuple[int, int]


@dataclass(frozen=True)
class PairMeasurement:
    """What registering one pair found (the cached value).

    ``shift`` is the displacement ``(dx, dy)`` of b's overlap content relative
    to a's, so b's true offset from a is ``plan.offset - shift``;
    ``distinctness`` is the answer's overlap NCC minus the best NCC of a
    candidate offset outside the exclusion radius (see :func:`measure_pair`).
    """

    status: str
    shift: tuple[float, float]
    ncc: float
    peak: float
    peak_ratio: float
    snr: tuple[float, float]
    distinctness: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "s": self.status,
                "d": [round(self.shift[0], 4), round(self.shift[1], 4)],
                "n": round(self.ncc, 5),
                "p": round(self.peak, 5),
                "r": round(self.peak_ratio, 3),
                "q": [round(self.snr[0], 3), round(self.snr[1], 3)],
                "m": round(self.distinctness, 5),
            },
            separators=(",", ":"),
        ).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> PairMeasurement:
        v = json.loads(data)
        return cls(
            status=v["s"],
            shift=(float(v["d"][0]), float(v["d"][1])),
            ncc=float(v["n"]),
            peak=float(v["p"]),
            peak_ratio=float(v["r"]),
            snr=(float(v["q"][0]), float(v["q"][1])),
            distinctness=float(v.get("m", 0.0)),
        )


def plan_pairs(
    tiles: Sequence[Tile], *, min_overlap_px: int, max_shift_px: int, max_shift_fraction: float
) -> list[PairPlan]:
    """The neighbour pairs: tiles whose nominal footprints overlap along a side.

    Neighbours come from the nominal positions, not from grid indices, so any
    layout works (a serpentine, an L shape, a sparse or brick-like set from a
    ``TileConfiguration.txt`` or a CZI mosaic). Two tiles are a pair when
    their footprints overlap in a band at least ``min_overlap_px`` wide that
    runs along at least half of the shorter tile's side: the minimum shared
    area of a side neighbour, which keeps corner (diagonal) contacts out. The
    band's orientation gives the direction: a vertical band makes b the
    ``right`` neighbour of a, a horizontal one the ``down`` neighbour.
    """
    n = len(tiles)
    if n < 2:
        return []
    xy = np.array([[round(t.x), round(t.y)] for t in tiles], np.int64)
    wh = np.array([[t.width, t.height] for t in tiles], np.int64)
    found: list[tuple[int, int, str]] = []
    for i in range(n - 1):
        j = np.arange(i + 1, n)
        lo = np.maximum(xy[i], xy[j])
        hi = np.minimum(xy[i] + wh[i], xy[j] + wh[j])
        ext = hi - lo  # overlap extent (x, y)
        short = np.minimum(wh[i], wh[j])
        band = (ext >= min_overlap_px).all(axis=1) & ((2 * ext >= short).any(axis=1))
        for k in np.flatnonzero(band):
            jj = int(j[k])
            ti, tj = tiles[i], tiles[jj]
            if (ti.row, ti.col) == (tj.row, tj.col) and (xy[i] == xy[jj]).all():
                msg = (
                    f"tiles {ti.name!r} and {tj.name!r} both claim grid position row {ti.row}, col {ti.col} "
                    "at the same nominal position"
                )
                raise QCError(
                    msg, hint="Check the tile names, the TileConfiguration or the mosaic metadata for duplicates"
                )
            # a vertical band (narrow in x relative to the tile) is a left/right contact
            right = ext[k, 0] * short[k, 1] <= ext[k, 1] * short[k, 0]
            axis = 0 if right else 1
            a, b = (i, jj) if xy[jj, axis] - xy[i, axis] >= 0 else (jj, i)
            found.append((a, b, "right" if right else "down"))
    plans = []
    for ia, ib, direction in sorted(
        found, key=lambda f: (tiles[f[0]].row, tiles[f[0]].col, f[2] != "right", f[0], f[1])
    ):
        ta, tb = tiles[ia], tiles[ib]
        ix, iy = round(tb.x - ta.x), round(tb.y - ta.y)
        x0, y0 = max(0, ix), max(0, iy)
        x1, y1 = min(ta.width, ix + tb.width), min(ta.height, iy + tb.height)
        sy = int(min(max_shift_px, max_shift_fraction * (y1 - y0)))
        sx = int(min(max_shift_px, max_shift_fraction * (x1 - x0)))
        plans.append(
            PairPlan(
                a=ia,
                b=ib,
                direction=direction,
                offset=(ix, iy),
                region_a=(x0, y0, x1, y1),
                region_b=(x0 - ix, y0 - iy, x1 - ix, y1 - iy),
                max_shift=(sy, sx),
            )
        )
    return plans


def measure_pair(
    patch_a: np.ndarray, patch_b: np.ndarray, plan: PairPlan, params: Mapping[str, float]
) -> PairMeasurement:
    """Register two overlap patches and classify the outcome.

    Candidates are the strongest local maxima of the phase-correlation
    surface over the whole searched range (up to ``peak_candidates``), judged
    by the NCC of the overlap each implies. When the strongest peak is clear
    (``min_peak_ratio`` times the next one outside ``exclusion_px``) and its
    overlap agrees best, it is the answer (textured tissue: one phase
    correlation). Otherwise (periodic content such as grid paper or a chip's
    track grid, where the strongest peak is often a period alias) every
    whole-pixel offset of the range is scored by its overlap NCC
    (:func:`qc.registration.ncc_surface`), the best one and the runner-up
    (the best local maximum more than ``exclusion_px`` away) are settled at
    full resolution, and the best is the answer when it is clear: it beats
    the runner-up by ``min_ncc_margin`` and by ``min_ncc_gain`` of what the
    runner-up lacks to 1. Its sub-pixel part comes from a phase correlation
    of the region the patches share there. ``distinctness`` is the answer's
    NCC minus the runner-up's.

    * ``no_information``: either patch lacks structure (flat, or noise only),
      or no answer is clear although the patches agree at the strongest
      peak (purely periodic or one-dimensional structure such as a single
      track line);
    * ``mismatch``: both have structure but they do not agree at the answer
      (overlap NCC below ``min_match_ncc``), or it sits on the edge of the
      searched range (the true offset lies beyond it);
    * ``ok``: the patches agree at a clear answer.
    """
    snr_a, snr_b = structure_snr(patch_a), structure_snr(patch_b)
    if min(snr_a, snr_b) < params["min_structure_snr"]:
        return PairMeasurement(STATUS_NO_INFO, (0.0, 0.0), 0.0, 0.0, 1.0, (snr_a, snr_b), 0.0)
    ds = pair_downsample(patch_a.shape[:2], int(params["downsample"]))
    a, b = to_gray_float(patch_a), to_gray_float(patch_b)
    if ds > 1:  # correlate on an area-mean view; quality is still measured at full resolution
        size = (patch_a.shape[1] // ds, patch_a.shape[0] // ds)
        a = cv2.resize(a, size, interpolation=cv2.INTER_AREA)
        b = cv2.resize(b, size, interpolation=cv2.INTER_AREA)
    h, w = a.shape
    sy, sx = plan.max_shift
    ms = (min(-(-sy // ds), h // 2 - 1), min(-(-sx // ds), w // 2 - 1))
    excl = float(params["exclusion_px"])
    smooth = params["ncc_smooth_px"]
    sigma = smooth / ds if smooth / ds > 0.3 else 0.0
    cands = peak_candidates(
        a,
        b,
        max_shift=ms,
        window=params["window_taper"],
        lowpass_sigma_px=params["lowpass_sigma_px"],
        count=int(params["peak_candidates"]),
    )
    top = cands[0]
    rivals = [c for c in cands[1:] if math.hypot(c.dx - top.dx, c.dy - top.dy) > excl]
    second = max((c.peak for c in rivals), default=0.0)
    ratio = 1.0 if top.peak <= 0 else _PEAK_RATIO_CAP if second <= 0 else min(_PEAK_RATIO_CAP, top.peak / second)
    sa, sb = (cv2.GaussianBlur(a, (0, 0), sigma), cv2.GaussianBlur(b, (0, 0), sigma)) if sigma else (a, b)
    top_ncc = overlap_ncc(sa, sb, (round(top.dx), round(top.dy)))
    rival_ncc = max([overlap_ncc(sa, sb, (round(c.dx), round(c.dy))) for c in rivals[:1]] + [0.0])
    clear = False
    fast = ratio >= params["min_peak_ratio"] and top_ncc >= rival_ncc
    if fast:  # the clear correlation peak agrees best
        dx, dy, peak, at_limit, ok = top.dx * ds, top.dy * ds, top.peak, top.at_search_limit, True
        distinct = top_ncc - rival_ncc
    else:
        (ax, ay), at_limit, distinct, clear = _best_agreeing(patch_a, patch_b, sa, sb, ms, ds, params)
        if clear:  # an alias-ridden correlation surface, but the overlap agrees clearly best at one offset
            dx, dy = _subpixel_at(patch_a, patch_b, ax, ay, params)
            peak = next((c.peak for c in cands if abs(c.dx * ds - ax) <= ds and abs(c.dy * ds - ay) <= ds), 0.0)
            ratio = min(_PEAK_RATIO_CAP, peak / top.peak) if top.peak > 0 else 0.0
            ok = True
        else:  # nothing is clear: judge the strongest peak as it is (ambiguous, or a mismatch)
            dx, dy, peak, at_limit = top.dx * ds, top.dy * ds, top.peak, top.at_search_limit
            ok = ratio >= params["min_peak_ratio"]
    if fast and ds == 1 and sigma == smooth:  # the same views, smoothed alike, at the same offset: measured already
        ncc = top_ncc
    else:
        ncc = overlap_ncc(patch_a, patch_b, (round(dx), round(dy)), smooth_px=smooth)
    if at_limit or ncc < params["min_match_ncc"]:
        status = STATUS_MISMATCH
    elif ok:
        status = STATUS_OK
    else:
        status = STATUS_NO_INFO
    return PairMeasurement(status, (dx, dy), ncc, peak, ratio, (snr_a, snr_b), float(distinct))


def _best_agreeing(
    patch_a: np.ndarray,
    patch_b: np.ndarray,
    sa: np.ndarray,
    sb: np.ndarray,
    ms: tuple[int, int],
    ds: int,
    params: Mapping[str, float],
) -> tuple[tuple[int, int], bool, float, bool]:
    """The whole-pixel offset whose overlap agrees best, exhaustively: ``((dx, dy), at_limit, distinctness, clear)``.

    ``sa``/``sb`` are the (smoothed) correlation views at 1/``ds`` resolution;
    the best offset and the runner-up (best local maximum more than
    ``exclusion_px`` away) found there are settled at full resolution.
    """
    h, w = sa.shape
    surface = ncc_surface(sa, sb, max_shift=ms)
    iy, ix = np.unravel_index(int(np.argmax(surface)), surface.shape)
    local = cv2.dilate(surface, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    my, mx = np.nonzero(surface >= local)
    far = np.hypot(my - iy, mx - ix) > float(params["exclusion_px"])
    smooth = params["ncc_smooth_px"]
    best = _local_best(patch_a, patch_b, (int(ix) - ms[1]) * ds, (int(iy) - ms[0]) * ds, ds, smooth)
    limit = _edge((int(ix) - ms[1], int(iy) - ms[0]), ms, h, w)
    runner_ncc = 0.0
    if far.any():
        k = int(np.argmax(surface[my[far], mx[far]]))
        rxy = (int(mx[far][k]) - ms[1], int(my[far][k]) - ms[0])
        runner = _local_best(patch_a, patch_b, rxy[0] * ds, rxy[1] * ds, ds, smooth)
        if runner[2] > best[2]:  # at full resolution the runner-up agrees better
            best, runner, limit = runner, best, _edge(rxy, ms, h, w)
        runner_ncc = max(runner[2], 0.0)
    distinct = best[2] - runner_ncc
    clear = distinct >= max(params["min_ncc_margin"], params["min_ncc_gain"] * (1.0 - runner_ncc))
    return (best[0], best[1]), limit, distinct, clear


def _shared(patch_a: np.ndarray, patch_b: np.ndarray, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts of two same-size patches that show the same content at whole-pixel shift ``(dx, dy)``."""
    h, w = patch_a.shape[:2]
    return (
        patch_a[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)],
        patch_b[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)],
    )


def _edge(at: tuple[int, int], ms: tuple[int, int], h: int, w: int) -> bool:
    """Whether a shift ``(dx, dy)`` lies on the edge of a restricted search range."""
    return (ms[0] < h // 2 - 1 and abs(at[1]) == ms[0]) or (ms[1] < w // 2 - 1 and abs(at[0]) == ms[1])


def _local_best(
    patch_a: np.ndarray, patch_b: np.ndarray, dx: int, dy: int, ds: int, smooth_px: float
) -> tuple[int, int, float]:
    """The whole-pixel shift within ``ds + 1`` px of ``(dx, dy)`` whose overlap agrees best, and that NCC.

    ``(dx, dy)`` was found at 1/``ds`` resolution; the overlap NCC over the
    region the patches share there settles it at full resolution.
    """
    r = ds + 1
    ra, rb = _shared(patch_a, patch_b, dx, dy)
    if min(ra.shape[:2]) < 4 * r:
        return dx, dy, overlap_ncc(patch_a, patch_b, (dx, dy), smooth_px=smooth_px)
    local = ncc_surface(ra, rb, max_shift=r, smooth_px=smooth_px)
    ey, ex = np.unravel_index(int(np.argmax(local)), local.shape)
    return dx + int(ex) - local.shape[1] // 2, dy + int(ey) - local.shape[0] // 2, float(local[ey, ex])


def _subpixel_at(
    patch_a: np.ndarray, patch_b: np.ndarray, dx: int, dy: int, params: Mapping[str, float]
) -> tuple[float, float]:
    """Sub-pixel shift near whole-pixel ``(dx, dy)``: phase correlation of the region the patches share there."""
    ra, rb = _shared(patch_a, patch_b, dx, dy)
    if min(ra.shape[:2]) < 8:
        return float(dx), float(dy)
    est = phase_correlate(
        ra,
        rb,
        max_shift=2,
        window=params["window_taper"],
        lowpass_sigma_px=params["lowpass_sigma_px"],
        compute_ncc=False,
    )
    if abs(est.dx) > 1 or abs(est.dy) > 1:  # no peak at the answer: keep the whole pixel
        return float(dx), float(dy)
    return dx + est.dx, dy + est.dy


def pair_downsample(shape: tuple[int, int], requested: int) -> int:
    """Factor at which an overlap of ``shape`` is correlated.

    ``requested`` > 0 is used as is; 0 means automatic: one step per 96 px of
    the overlap's short side, at most 4 (a 10 % overlap of a 2048 px tile is
    correlated at half resolution, a 92 px one at full resolution). Nuclei
    stay several pixels wide, and the sub-pixel fit keeps the offset to about
    0.1 px of the full-resolution grid.
    """
    if requested > 0:
        return int(requested)
    return int(max(1, min(min(shape) // 96, 4)))


def _gray_same_dtype(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        g = arr[..., :3].astype(np.float32).mean(axis=2)
        result: np.ndarray = (
            np.rint(g).astype(arr.dtype) if np.issubdtype(arr.dtype, np.integer) else g.astype(arr.dtype)
        )
        return result
    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[..., 0]
    return arr


def run_pairs(
    tiles: Sequence[Tile],
    plans: Sequence[PairPlan],
    params: Mapping[str, float],
    *,
    cache: PairCache | None,
    pool: ThreadPoolExecutor | None,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[PairMeasurement], list[bool]]:
    """Measure every planned pair, reusing cached ones.

    Returns the measurements (in plan order) and, for each, whether it came
    from the cache.
    """
    n = len(plans)
    results: list[PairMeasurement | None] = [None] * n
    cached = [False] * n
    done = 0
    pmap = pool.map if pool is not None else map
    digests: dict[int, str] = {}
    strips: dict[tuple[int, int], np.ndarray] = {}  # (plan index, 0 for a / 1 for b) -> patch
    decoded: set[int] = set()
    pairs_of: dict[int, list[int]] = {}
    for k, p in enumerate(plans):
        pairs_of.setdefault(p.a, []).append(k)
        pairs_of.setdefault(p.b, []).append(k)

    if cache is not None:  # digests memoised by identity: one batch for the whole set
        ident = {i: digest_key(t.identity) for i, t in enumerate(tiles) if t.identity}
        got = cache_get_many(cache, ident.values())
        for i, key in ident.items():
            if key in got:
                digests[i] = got[key].decode("ascii")

    def decode(i: int, need_digest: bool) -> tuple[int, str | None, dict[tuple[int, int], np.ndarray]]:
        t = tiles[i]
        arr = np.asarray(t.read())
        if arr.shape[:2] != (t.height, t.width):
            msg = f"tile {t.name!r} decoded to {arr.shape[:2]} px but declares {t.height}x{t.width}"
            raise QCError(msg, hint="The tile file and the mosaic metadata disagree; re-export the scan")
        dig = array_digest(arr) if need_digest else None
        keep = {}
        for k in pairs_of.get(i, []):
            if results[k] is not None:
                continue
            role = 0 if plans[k].a == i else 1
            x0, y0, x1, y1 = plans[k].region_a if role == 0 else plans[k].region_b
            keep[(k, role)] = np.ascontiguousarray(_gray_same_dtype(arr[y0:y1, x0:x1]))
        return i, dig, keep

    def digest_only(i: int) -> tuple[int, str]:
        return i, tiles[i].digest()

    def ensure_decoded(idx: Sequence[int]) -> None:
        todo = [i for i in idx if i not in decoded]
        unhashed = {i for i in todo if i not in digests}  # a tile already digested is not hashed again
        for i, dig, keep in pmap(lambda i: decode(i, i in unhashed), todo):
            decoded.add(i)
            if dig is not None:
                digests[i] = dig
            strips.update(keep)

    def compute(k: int) -> tuple[int, PairMeasurement]:
        p = plans[k]
        return k, measure_pair(strips[(k, 0)], strips[(k, 1)], p, params)

    rows: dict[int, list[int]] = {}
    for i, t in enumerate(tiles):
        rows.setdefault(t.row, []).append(i)
    seen: set[int] = set()
    for r in sorted(rows):
        row = rows[r]
        seen.update(row)
        # 1. digests of this row's tiles (cheap digest_fn, else decode once).
        missing = [i for i in row if i not in digests]
        cheap = [i for i in missing if tiles[i].digest_fn is not None]
        for i, dig in pmap(digest_only, cheap):
            digests[i] = dig
        ensure_decoded([i for i in missing if tiles[i].digest_fn is None])
        if cache is not None:
            memo = {digest_key(tid): digests[i].encode("ascii") for i in missing if (tid := tiles[i].identity)}
            cache_put_many(cache, memo)
        # 2. pairs completed by this row: look them up, compute the rest.
        ready = [k for k in range(n) if results[k] is None and plans[k].a in seen and plans[k].b in seen]
        keys = {
            k: pair_key(
                digests[plans[k].a],
                digests[plans[k].b],
                plans[k].direction,
                plans[k].offset,
                params,
                PAIR_ALGORITHM_VERSION,
            )
            for k in ready
        }
        hits = cache_get_many(cache, keys.values()) if cache is not None else {}
        todo = []
        for k in ready:
            if keys[k] in hits:
                results[k] = PairMeasurement.from_bytes(hits[keys[k]])
                cached[k] = True
                done += 1
            else:
                todo.append(k)
        if progress is not None and hits:
            progress(done, n)
        ensure_decoded(sorted({plans[k].a for k in todo} | {plans[k].b for k in todo}))
        fresh = {}
        for k, meas in pmap(compute, todo):
            results[k] = meas
            fresh[keys[k]] = meas.to_bytes()
            done += 1
            if progress is not None:
                progress(done, n)
        if cache is not None:
            cache_put_many(cache, fresh)
        # 3. drop strips no pending pair needs.
        for done_pair in [k for k in strips if results[k[0]] is not None]:
            del strips[done_pair]
    final = [m for m in results if m is not None]
    if len(final) != n:  # pragma: no cover - every plan's tiles are in some row
        msg = f"{n - len(final)} of {n} tile pairs were never measured"
        raise QCError(msg, hint="This is a bug in imageqc; please report it with the tile list")
    return final, cached
