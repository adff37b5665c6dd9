"""Stitching evaluation for images that come as tiles (tile folders, CZI mosaics).

Every pair of neighbouring fields of view (FOVs: tiles whose nominal
footprints overlap along a side, whatever the layout) is registered on its
nominal overlap: several phase-correlation peaks over the whole searched
range judged by the overlap's NCC (on periodic content the strongest peak is
often an alias), sub-pixel refinement, a distinctness measure, and a "no
information" outcome for featureless or purely periodic overlaps, which is
not a failure (:mod:`qc.registration`, :mod:`qc.stitching.pairs`). The pair
offsets are reconciled into globally consistent positions by least squares
with outlier rejection (:mod:`qc.stitching.solve`). From those come each FOV's
deviation from its nominal position and from its neighbours, the stitching
score, and the registered positions in Fiji's ``TileConfiguration`` format
(:func:`tile_configuration_text`).

Pair results are cached through a :class:`qc.stitching.pair_cache.PairCache` passed
in: a re-run of the same set computes no pair, a set that gained tiles
computes only the new pairs, changed pair parameters invalidate exactly the
entries they affect.

The score
---------
StereoMap Image QC's published stitching criterion: the stitching passes when
**more than 30 % of the FOVs have clear, consistent overlap features** and
**their mean offset quality exceeds 0.7**. imageqc reads it as follows:

* a FOV has *clear, consistent* overlap features when at least one of its
  overlaps registers with a distinct peak, every overlap of it that shows
  features does so (none is a ``mismatch``), every such registration agrees
  with the global solution (none ``rejected``), and the FOV is not out of
  place (below); featureless overlaps neither count for nor against it;
* a pair's *offset quality* is the normalised cross-correlation, in [0, 1],
  of the two tiles' overlap at the found offset; a FOV's is the mean over its
  accepted pairs; the criterion's mean is over the clear, consistent FOVs.

imageqc adds two conditions StereoMap leaves implicit, and keeps them apart,
because a scan that stitches perfectly must not fail merely because its stage
is imprecise, while a tile whose content is out of place must:

* **content**: no FOV may be *out of place*: show features in its overlaps
  that match none of its neighbours; or sit, by its registered content, more
  than the displacement tolerance from where its best-agreeing neighbour
  expects it; or have overlaps that the global solve rejects (they disagree
  with where the other overlaps place it by more than
  ``reject_residual_px``: the FOVs with the most rejected overlaps are
  named). The tolerance is ``max_deviation_px``
  when set, else 20 px (StereoMap's DAPI/IF calibration tolerance) or three
  times the set's median neighbour deviation, whichever is larger: a
  scatter every tile shares is the stage's, not a displaced tile. Such FOVs
  are named (:attr:`StitchingResult.outliers`);
* **stage**: each FOV's stage deviation (its registered minus nominal
  position, relative to the set, whose median deviation is zero; the larger
  of ``|dx|`` and ``|dy|``) is measured and reported, and fails only past
  its own limit: ``stage_limit_px`` (``qc.stitching_stage_limit_px``) when
  set, else a third of the FOV's narrowest nominal overlap with a
  neighbour, so clean sets with stage errors up to a third of the overlap
  pass. Such FOVs are named apart (:attr:`StitchingResult.off_nominal`).

The 0-100 score is the minimum of four sub-scores, each mapping its
threshold to exactly 60:

* share ``s`` of clear, consistent FOVs: ``60 s / 0.3`` up to 0.3, then
  ``60 + 40 (s - 0.3) / 0.7``;
* mean offset quality ``q``: ``60 q / 0.7`` up to 0.7, then
  ``60 + 40 (q - 0.7) / 0.3``;
* placement, from the largest neighbour deviation ``d``: ``100 - 40 d / D``
  up to the displacement tolerance ``D``, then ``60 D / d``; 0 when some
  FOV matches none of its neighbours;
* stage, from the largest stage deviation as a share ``u`` of its FOV's
  limit: ``100 - 40 u^2`` up to 1, then ``60 / u^2`` (an imprecise stage
  well inside its limit costs little).

So the score is 60 or more exactly when every condition holds (an
inconsistent FOV fails the set whatever the sub-scores). StereoMap's
"more than" is strict: a share of exactly 30 % or a quality of exactly 0.7
fails, and the score is then reported as 59.9.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from qc.errors import QCError
from qc.io.model import Tile
from qc.stitching.pair_cache import PairCache
from qc.stitching.pairs import (
    PAIR_ALGORITHM_VERSION,
    STATUS_MISMATCH,
    STATUS_NO_INFO,
    STATUS_OK,
    PairPlan,
    plan_pairs,
    run_pairs,
)
from qc.stitching.solve import solve_displacements

__all__ = [
    "FovResult",
    "PairResult",
    "StitchingCriterion",
    "StitchingParams",
    "StitchingResult",
    "evaluate_stitching",
    "tile_configuration_text",
]

STATUS_REJECTED = "rejected"


@dataclass(frozen=True)
class StitchingParams:
    """Settings of the stitching evaluation.

    The first group changes what a pair registration returns and is part of
    every pair's cache key; the second only changes how pairs are combined
    and scored, so changing it re-scores cached pairs without recomputing.

    Attributes
    ----------
    max_shift_px : int
        Largest deviation from the nominal offset searched, px.
    max_shift_fraction : float
        ... and at most this fraction of the overlap's extent on each axis.
    min_overlap_px : int
        Neighbours overlapping nominally by less than this are not a pair.
    downsample : int
        Factor at which overlaps are correlated; 0 picks it from the overlap
        size (see :func:`qc.stitching.pairs.pair_downsample`).
    window_taper : float
        Tukey-window fraction applied to each overlap before correlating
        (see :func:`qc.registration.phase_correlate`).
    lowpass_sigma_px : float
        Band limit of the correlation peak (see :func:`qc.registration.phase_correlate`).
    ncc_smooth_px : float
        Smoothing before the offset-quality NCC, px.
    min_structure_snr : float
        Below this band-passed signal-to-noise ratio an overlap is featureless.
    peak_candidates : int
        Phase-correlation peaks (local maxima over the whole searched range)
        judged by the NCC of the overlap each implies; the best-agreeing wins.
    exclusion_px : float
        Candidates closer than this to the answer (at the correlated
        resolution, px) do not count against its distinctness.
    min_ncc_margin, min_ncc_gain : float
        A registration is clear when its overlap NCC beats the best candidate
        outside the exclusion radius (the runner-up) by at least
        ``min_ncc_margin`` and by at least ``min_ncc_gain`` times what the
        runner-up lacks to 1 (a chance maximum of a small overlap at 0.35
        against 0.26 is not clear; grid paper at 0.88 against 0.77 is) ...
    min_peak_ratio : float
        ... or its correlation peak is this many times the next one (and the
        overlaps agree, below); an agreeing but unclear one is ambiguous
        (purely periodic or one-dimensional structure: no information).
    min_match_ncc : float
        Overlaps correlating less than this at the found offset disagree
        (mismatch).
    reject_residual_px : float
        A pair disagreeing with the global solution by more is rejected, px.
    max_deviation_px : float or None
        Largest tolerated deviation of a FOV from its best-agreeing neighbour
        (its content displaced against them), px. None (default): 20 px or
        ``displacement_factor`` times the set's median neighbour deviation,
        whichever is larger, so stage scatter the whole set shares is not a
        displacement; a number is used as it is.
    displacement_factor : float
        See ``max_deviation_px``.
    stage_limit_px : float
        Largest tolerated stage deviation of a FOV from its nominal position
        along x or y, px (relative to the set: each connected group of FOVs
        has a median deviation of zero). 0 (default): a third of the FOV's
        narrowest nominal overlap with a neighbour, the largest error at which
        that overlap still registers reliably.
    min_clear_share : float
        StereoMap: share of FOVs with clear, consistent features (strictly more).
    min_mean_quality : float
        StereoMap: mean offset quality of those FOVs (strictly more).
    """

    max_shift_px: int = 200
    max_shift_fraction: float = 0.5
    min_overlap_px: int = 16
    downsample: int = 0
    window_taper: float = 0.5
    lowpass_sigma_px: float = 1.0
    ncc_smooth_px: float = 1.0
    min_structure_snr: float = 0.5
    peak_candidates: int = 8
    exclusion_px: float = 4.0
    min_ncc_margin: float = 0.03
    min_ncc_gain: float = 0.25
    min_peak_ratio: float = 2.0
    min_match_ncc: float = 0.3
    reject_residual_px: float = 3.0
    max_deviation_px: float | None = None
    displacement_factor: float = 3.0
    stage_limit_px: float = 0.0
    min_clear_share: float = 0.30
    min_mean_quality: float = 0.70

    def plan(self, tiles: Sequence[Tile]) -> list[PairPlan]:
        """The neighbouring pairs of ``tiles`` these settings register (:func:`qc.stitching.pairs.plan_pairs`).

        Live QC plans a new tile's pairs with it, so they are the final QC's own pairs, under the same keys.
        """
        return plan_pairs(
            tiles,
            min_overlap_px=self.min_overlap_px,
            max_shift_px=self.max_shift_px,
            max_shift_fraction=self.max_shift_fraction,
        )

    def pair_params(self) -> dict[str, float]:
        """The parameters that change a pair's result (its cache key part)."""
        names = (
            "max_shift_px",
            "max_shift_fraction",
            "downsample",
            "window_taper",
            "lowpass_sigma_px",
            "ncc_smooth_px",
            "min_structure_snr",
            "peak_candidates",
            "exclusion_px",
            "min_ncc_margin",
            "min_ncc_gain",
            "min_peak_ratio",
            "min_match_ncc",
        )
        return {k: getattr(self, k) for k in names}


@dataclass(frozen=True)
class StitchingCriterion:
    """How the set fares against each condition of the pass criterion.

    ``clear_share``: share of FOVs with clear, consistent overlap features;
    ``mean_quality``: their mean offset quality; ``max_deviation_px``: largest
    FOV deviation from its neighbours; ``unmatched``: FOVs whose features
    match no neighbour; ``stage_use``: the largest stage deviation of a FOV
    as a share of its own stage limit (1 is at the limit),
    ``max_stage_deviation_px`` the largest stage deviation; the ``*_score``
    fields are the 0-100 sub-scores whose minimum is the score; the
    thresholds used are repeated (``max_deviation_tolerance_px`` is the
    displacement tolerance in force).
    """

    clear_share: float
    mean_quality: float
    max_deviation_px: float
    unmatched: int
    share_score: float
    quality_score: float
    placement_score: float
    min_clear_share: float
    min_mean_quality: float
    max_deviation_tolerance_px: float
    max_stage_deviation_px: float = 0.0
    stage_use: float = 0.0
    stage_score: float = 100.0


@dataclass(frozen=True)
class PairResult:
    """One neighbouring pair.

    Attributes
    ----------
    a, b : str
        Tile names; b is right of (``direction == "right"``) or below a.
    direction : str
    status : str
        ``"ok"`` (clear registration, used), ``"rejected"`` (clear, but
        inconsistent with the global solution), ``"mismatch"`` (features,
        no agreement), ``"no_information"`` (featureless or ambiguous).
    nominal_offset : (float, float)
        b's nominal position minus a's, ``(dx, dy)`` px.
    measured_offset : (float, float) or None
        b's registered position minus a's, px (``ok``/``rejected`` only).
    deviation_px : float or None
        Length of measured minus nominal offset, px.
    quality : float
        Offset quality in [0, 1] (overlap NCC at the found offset; 0 when
        featureless).
    peak_ratio : float
        The strongest correlation peak over the next one outside the
        exclusion radius when that peak is the answer; when the overlap NCC
        chose another candidate (periodic content), that candidate's peak over
        the strongest one (below 1).
    distinctness : float
        Its overlap NCC minus the best NCC of a candidate offset outside the
        exclusion radius (near 0: ambiguous, e.g. purely periodic content).
    structure_snr : (float, float)
        Band-passed signal-to-noise of a's and b's overlap.
    residual_px : float or None
        Disagreement with the global solution, px.
    cached : bool
        Taken from the cache rather than computed.
    """

    a: str
    b: str
    direction: str
    status: str
    nominal_offset: tuple[float, float]
    measured_offset: tuple[float, float] | None
    deviation_px: float | None
    quality: float
    peak_ratio: float
    structure_snr: tuple[float, float]
    residual_px: float | None
    cached: bool
    distinctness: float = 0.0


@dataclass(frozen=True)
class FovResult:
    """One field of view.

    Attributes
    ----------
    name : str
    row, col : int
    nominal : (float, float)
        Nominal top-left ``(x, y)``, px.
    registered : (float, float) or None
        Registered top-left, px, in the nominal frame (each connected group
        of registered FOVs is placed so its median displacement is zero);
        None when no clear pair reaches the FOV.
    deviation_from_nominal : (float, float) or None
        ``registered - nominal``, px.
    deviation_from_neighbours_px : float or None
        How far the FOV sits from where its best-agreeing neighbour expects
        it: the smallest, over its accepted pairs, of the length of the
        registered minus nominal offset between the two, px. Large only
        when it disagrees with every neighbour.
    quality : float or None
        Mean offset quality of its accepted pairs.
    informative : bool
        At least one of its overlaps shows features.
    clear_consistent : bool
        Counts towards StereoMap's share: it has a clear registration and all
        of its overlaps with features agree (see the module docstring).
    outlier : bool
        Its content is out of place or inconsistent (named in
        :attr:`StitchingResult.outliers`).
    reason : str
        Why it is an outlier or off its nominal stage position, else "".
    stage_deviation_px : float or None
        How far the stage put it from its nominal position: the larger of
        ``|dx|`` and ``|dy|`` of :attr:`deviation_from_nominal`, px.
    stage_limit_px : float
        The stage limit it is held to, px.
    off_nominal : bool
        Its stage deviation exceeds its limit (named in
        :attr:`StitchingResult.off_nominal`).
    """

    name: str
    row: int
    col: int
    nominal: tuple[float, float]
    registered: tuple[float, float] | None
    deviation_from_nominal: tuple[float, float] | None
    deviation_from_neighbours_px: float | None
    quality: float | None
    informative: bool
    clear_consistent: bool
    outlier: bool
    reason: str = ""
    stage_deviation_px: float | None = None
    stage_limit_px: float = 0.0
    off_nominal: bool = False


@dataclass(frozen=True)
class StitchingResult:
    """The stitching evaluation of one tiled image.

    Attributes
    ----------
    score : float
        0-100; 60 or more passes (see the module docstring).
    passed : bool
    criterion : StitchingCriterion
    max_deviation_px : float
        Largest FOV deviation from its neighbours, px (0 when none measured).
    pairs_total, pairs_computed, pairs_cached : int
        Neighbouring pairs, and how many were registered now or reused.
    pairs_informative : int
        Pairs whose overlap showed features.
    fovs : tuple of FovResult
        In the order of the input tiles.
    pairs : tuple of PairResult
    outliers : tuple of str
        Names of the FOVs whose content is out of place or inconsistent.
    grid : (int, int)
        ``(rows, cols)``.
    params : StitchingParams
    algorithm_version : str
    max_stage_deviation_px : float
        Largest stage deviation of a FOV from its nominal position, px.
    off_nominal : tuple of str
        Names of the FOVs whose stage deviation exceeds their limit.
    """

    score: float
    passed: bool
    criterion: StitchingCriterion
    max_deviation_px: float
    pairs_total: int
    pairs_computed: int
    pairs_cached: int
    pairs_informative: int
    fovs: tuple[FovResult, ...]
    pairs: tuple[PairResult, ...] = field(repr=False)
    outliers: tuple[str, ...]
    grid: tuple[int, int]
    params: StitchingParams = field(repr=False)
    algorithm_version: str = PAIR_ALGORITHM_VERSION
    max_stage_deviation_px: float = 0.0
    off_nominal: tuple[str, ...] = ()

    @property
    def registered_positions(self) -> dict[str, tuple[float, float]]:
        """Tile name -> registered top-left ``(x, y)`` px (nominal when unregistered)."""
        return {f.name: f.registered if f.registered is not None else f.nominal for f in self.fovs}

    def summary(self) -> dict[str, object]:
        """The report's ``stitching`` block (see ARCHITECTURE.md).

        Besides the contract's keys: ``max_stage_deviation_px``,
        ``off_nominal`` (FOVs past their stage limit) and ``fovs``, one entry
        per FOV with its ``name``, grid ``row``/``col``, ``nominal`` and
        ``registered`` top-left ``[x, y]`` px (registered null when no clear
        pair reaches it) and ``stage_deviation_px``.
        """
        fovs = [
            {
                "name": f.name,
                "row": f.row,
                "col": f.col,
                "nominal": [round(v, 2) for v in f.nominal],
                "registered": [round(v, 2) for v in f.registered] if f.registered is not None else None,
                "stage_deviation_px": round(f.stage_deviation_px, 2) if f.stage_deviation_px is not None else None,
            }
            for f in self.fovs
        ]
        return {
            "score": self.score,
            "passed": self.passed,
            "max_deviation_px": self.max_deviation_px,
            "pairs_total": self.pairs_total,
            "pairs_computed": self.pairs_computed,
            "pairs_cached": self.pairs_cached,
            "max_stage_deviation_px": self.max_stage_deviation_px,
            "off_nominal": list(self.off_nominal),
            "fovs": fovs,
        }

    def to_dict(self) -> dict[str, object]:
        """Everything, JSON-serialisable (for the report's detail file)."""
        d = asdict(self)
        d["registered_positions"] = self.registered_positions
        return d


def _piecewise(value: float, threshold: float) -> float:
    value = min(max(value, 0.0), 1.0)
    if value <= threshold:
        return 60.0 * (value / threshold)
    return 60.0 + 40.0 * (value - threshold) / (1.0 - threshold)


def _placement(d: float, tol: float, unmatched: int) -> float:
    if unmatched:
        return 0.0
    if d <= tol:
        return 100.0 - 40.0 * (d / tol)
    return 60.0 * tol / d


def _stage(use: float) -> float:
    """Stage sub-score from the largest stage deviation as a share of its limit: gentle well inside it."""
    return 100.0 - 40.0 * use * use if use <= 1.0 else 60.0 / (use * use)


def evaluate_stitching(
    tiles: Sequence[Tile],
    *,
    cache: PairCache | None = None,
    params: StitchingParams = StitchingParams(),
    max_threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> StitchingResult:
    """Evaluate how well a set of tiles stitches.

    Parameters
    ----------
    tiles : sequence of Tile
        The FOVs with grid indices and nominal positions (at least two).
    cache : PairCache, optional
        Pair results and tile digests are read from and written to it (from
        the calling thread only, in batches when it has ``get_many`` /
        ``put_many``).
    params : StitchingParams
    max_threads : int
        Threads decoding tiles and registering pairs.
    progress : callable, optional
        Called as ``progress(done, total)`` in pairs, from the calling thread.

    Returns
    -------
    StitchingResult
    """
    tiles = list(tiles)
    if len(tiles) < 2:
        msg = f"stitching needs at least two tiles, got {len(tiles)}"
        raise QCError(msg, hint="A single field of view has nothing to stitch; skip the stitching metric")
    plans = params.plan(tiles)
    pair_params = params.pair_params()
    if max_threads > 1:
        with ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="qc-stitch") as pool:
            meas, cached = run_pairs(tiles, plans, pair_params, cache=cache, pool=pool, progress=progress)
    else:
        meas, cached = run_pairs(tiles, plans, pair_params, cache=cache, pool=None, progress=progress)

    n = len(tiles)
    nominal = np.array([[t.x, t.y] for t in tiles], float)
    nom_off = [tuple(nominal[p.b] - nominal[p.a]) for p in plans]
    ok = [k for k, m in enumerate(meas) if m.status == STATUS_OK]
    measured = {k: (plans[k].offset[0] - meas[k].shift[0], plans[k].offset[1] - meas[k].shift[1]) for k in ok}
    sol = solve_displacements(
        n,
        [(plans[k].a, plans[k].b) for k in ok],
        np.array([[measured[k][0] - nom_off[k][0], measured[k][1] - nom_off[k][1]] for k in ok]).reshape(-1, 2),
        np.array([max(meas[k].ncc, 0.0) for k in ok]),
        reject_px=params.reject_residual_px,
    )
    accepted = {k: bool(a) for k, a in zip(ok, sol.accepted, strict=False)}
    residual = {k: float(r) for k, r in zip(ok, sol.residual, strict=False)}

    pairs = []
    for k, (p, m) in enumerate(zip(plans, meas, strict=False)):
        status = m.status if m.status != STATUS_OK or accepted[k] else STATUS_REJECTED
        mo = measured.get(k)
        dev = math.hypot(mo[0] - nom_off[k][0], mo[1] - nom_off[k][1]) if mo else None
        res = residual.get(k)
        pairs.append(
            PairResult(
                a=tiles[p.a].name,
                b=tiles[p.b].name,
                direction=p.direction,
                status=status,
                nominal_offset=(float(nom_off[k][0]), float(nom_off[k][1])),
                measured_offset=(float(mo[0]), float(mo[1])) if mo else None,
                deviation_px=dev,
                quality=float(min(max(m.ncc, 0.0), 1.0)) if m.status != STATUS_NO_INFO else 0.0,
                peak_ratio=m.peak_ratio,
                structure_snr=m.snr,
                residual_px=res if res is not None and math.isfinite(res) else None,
                cached=cached[k],
                distinctness=m.distinctness,
            )
        )

    fovs, tol = _fov_results(tiles, plans, pairs, sol.u, params)
    return _score(tiles, fovs, pairs, cached, params, tol)


def _band_px(plan: PairPlan) -> int:
    """Width of a pair's nominal overlap band (across the direction of contact), px."""
    x0, y0, x1, y1 = plan.region_a
    return (x1 - x0) if plan.direction == "right" else (y1 - y0)


def _fov_results(
    tiles: Sequence[Tile],
    plans: Sequence[PairPlan],
    pairs: Sequence[PairResult],
    u: np.ndarray,
    params: StitchingParams,
) -> tuple[list[FovResult], float]:
    by_tile: dict[int, list[int]] = {}
    for k, p in enumerate(plans):
        by_tile.setdefault(p.a, []).append(k)
        by_tile.setdefault(p.b, []).append(k)
    # the displacement tolerance: what the set's own stage scatter makes ordinary
    spread = [
        float(np.linalg.norm(u[p.b] - u[p.a]))
        for p, r in zip(plans, pairs, strict=False)
        if r.status == STATUS_OK and np.isfinite(u[p.a]).all() and np.isfinite(u[p.b]).all()
    ]
    n_rejected = {i: sum(1 for k in ks if pairs[k].status == STATUS_REJECTED) for i, ks in by_tile.items()}
    most_rejected = max(n_rejected.values(), default=0)
    tol = params.max_deviation_px
    if tol is None:
        tol = max(20.0, params.displacement_factor * float(np.median(spread))) if spread else 20.0
    fovs = []
    for i, t in enumerate(tiles):
        mine = by_tile.get(i, [])
        acc = [k for k in mine if pairs[k].status == STATUS_OK]
        informative = any(pairs[k].status != STATUS_NO_INFO for k in mine)
        bad = [k for k in mine if pairs[k].status in (STATUS_MISMATCH, STATUS_REJECTED)]
        rejected = [k for k in mine if pairs[k].status == STATUS_REJECTED]
        reg = dev_nom = nb = quality = stage = None
        limit = params.stage_limit_px or (min(_band_px(plans[k]) for k in mine) / 3.0 if mine else 0.0)
        if acc and np.isfinite(u[i]).all():
            reg = (float(t.x + u[i, 0]), float(t.y + u[i, 1]))
            dev_nom = (float(u[i, 0]), float(u[i, 1]))
            stage = float(max(abs(u[i, 0]), abs(u[i, 1])))
            other = [plans[k].b if plans[k].a == i else plans[k].a for k in acc]
            nb = float(min(np.linalg.norm(u[j] - u[i]) for j in other))
            quality = float(np.mean([pairs[k].quality for k in acc]))
        reasons = []
        if not acc and bad:
            reasons.append(f"its overlaps show features but match none of its {len(bad)} neighbour(s)")
        elif nb is not None and nb > tol:
            reasons.append(f"its content sits {nb:.1f} px from where its neighbours expect it (tolerance {tol:.0f} px)")
        elif rejected and len(rejected) == most_rejected:
            worst = max(pairs[k].residual_px or 0.0 for k in rejected)
            reasons.append(
                f"{len(rejected)} of its overlaps disagree with where the others place it "
                f"(by up to {worst:.1f} px, more than {params.reject_residual_px:g} px): "
                "its content is not where its neighbours say"
            )
        outlier = bool(reasons)
        off = stage is not None and limit > 0 and stage > limit
        if off:
            reasons.append(f"the stage put it {stage:.1f} px off its nominal position (limit {limit:.0f} px)")
        fovs.append(
            FovResult(
                name=t.name,
                row=t.row,
                col=t.col,
                nominal=(float(t.x), float(t.y)),
                registered=reg,
                deviation_from_nominal=dev_nom,
                deviation_from_neighbours_px=nb,
                quality=quality,
                informative=informative,
                clear_consistent=bool(acc) and not bad and not outlier,
                outlier=outlier,
                reason="; ".join(reasons),
                stage_deviation_px=stage,
                stage_limit_px=float(limit),
                off_nominal=off,
            )
        )
    return fovs, float(tol)


def _score(
    tiles: Sequence[Tile],
    fovs: Sequence[FovResult],
    pairs: Sequence[PairResult],
    cached: Sequence[bool],
    params: StitchingParams,
    tol: float,
) -> StitchingResult:
    clear = [f for f in fovs if f.clear_consistent]
    share = len(clear) / len(fovs)
    quality = float(np.mean([f.quality for f in clear])) if clear else 0.0
    devs = [f.deviation_from_neighbours_px for f in fovs if f.deviation_from_neighbours_px is not None]
    max_dev = float(max(devs)) if devs else 0.0
    unmatched = sum(1 for f in fovs if f.outlier and f.deviation_from_neighbours_px is None)
    inconsistent = any(f.outlier for f in fovs)
    staged = [(d, f.stage_limit_px) for f in fovs if (d := f.stage_deviation_px) is not None and f.stage_limit_px > 0]
    max_stage = max((d for d, _ in staged), default=0.0)
    use = max((d / limit for d, limit in staged), default=0.0)
    s_share = _piecewise(share, params.min_clear_share)
    s_quality = _piecewise(quality, params.min_mean_quality)
    s_place = _placement(max_dev, tol, unmatched)
    s_stage = _stage(use)
    passed = (
        share > params.min_clear_share
        and quality > params.min_mean_quality
        and max_dev <= tol
        and not inconsistent
        and use <= 1.0
    )
    score = min(s_share, s_quality, s_place, s_stage)
    if not passed:
        score = min(score, 59.9)
    criterion = StitchingCriterion(
        clear_share=share,
        mean_quality=quality,
        max_deviation_px=max_dev,
        unmatched=unmatched,
        share_score=round(s_share, 1),
        quality_score=round(s_quality, 1),
        placement_score=round(s_place, 1),
        min_clear_share=params.min_clear_share,
        min_mean_quality=params.min_mean_quality,
        max_deviation_tolerance_px=tol,
        max_stage_deviation_px=round(max_stage, 2),
        stage_use=round(use, 3),
        stage_score=round(s_stage, 1),
    )
    n_cached = sum(cached)
    rows = max(t.row for t in tiles) + 1
    cols = max(t.col for t in tiles) + 1
    return StitchingResult(
        score=round(score, 1),
        passed=passed,
        criterion=criterion,
        max_deviation_px=round(max_dev, 2),
        pairs_total=len(pairs),
        pairs_computed=len(pairs) - n_cached,
        pairs_cached=n_cached,
        pairs_informative=sum(1 for p in pairs if p.status != STATUS_NO_INFO),
        fovs=tuple(fovs),
        pairs=tuple(pairs),
        outliers=tuple(f.name for f in fovs if f.outlier),
        grid=(rows, cols),
        params=params,
        max_stage_deviation_px=round(max_stage, 2),
        off_nominal=tuple(f.name for f in fovs if f.off_nominal),
    )


def tile_configuration_text(result: StitchingResult, *, registered: bool = True, decimals: int = 2) -> str:
    """Fiji's ``TileConfiguration.registered.txt`` for the evaluated tiles.

    Parameters
    ----------
    result : StitchingResult
    registered : bool
        Registered positions (FOVs no clear pair reaches keep their nominal
        one); False writes the nominal positions (``TileConfiguration.txt``).
    decimals : int
        Digits after the decimal point.

    Returns
    -------
    str
        ``dim = 2`` and one ``name; ; (x, y)`` line per tile, in input order.
    """
    lines = ["# Define the number of dimensions we are working on", "dim = 2", "", "# Define the image coordinates"]
    for f in result.fovs:
        x, y = (f.registered or f.nominal) if registered else f.nominal
        lines.append(f"{f.name}; ; ({x:.{decimals}f}, {y:.{decimals}f})")
    return "\n".join(lines) + "\n"
