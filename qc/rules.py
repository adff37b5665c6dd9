"""Which metrics run for which stain, the thresholds, and the verdict with its reasons.

StereoMap's Image QC publishes these pass criteria, and they are the defaults:

===================  =========================  ==========================================
metric               default threshold          role
===================  =========================  ==========================================
track lines          score >= 60                required for every stain
clarity              score >= 80                advisory: never fails QC by itself
stitching            score >= 60                required for DAPI+mIF tile sets; advisory
                                                otherwise unless ``stitching_required``
calibration          offset <= 20 px and        required for DAPI+mIF
                     similarity >= 0.01
===================  =========================  ==========================================

Metrics per stain: DAPI and ssDNA run track + clarity; DAPI+mIF adds
calibration (each IF image against the nuclear image) and stitching; H&E runs
track and clarity (the clarity model reads a grey conversion of the colour
image). Stitching runs on every image that comes as tiles.

Every failed or advisory metric gets a reason a technician can act on: the
number, the threshold, what was seen, and what to try.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "STAINS",
    "MetricCheck",
    "Thresholds",
    "Verdict",
    "check_calibration",
    "check_clarity",
    "check_stitching",
    "check_track",
    "decide",
    "metrics_for",
]

#: Stains as they appear in the report.
STAINS = ("DAPI", "ssDNA", "HE", "DAPI+mIF")

_METRICS = {
    "DAPI": ("track", "clarity"),
    "ssDNA": ("track", "clarity"),
    "HE": ("track", "clarity"),
    "DAPI+mIF": ("track", "clarity", "stitching", "calibration"),
}


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria; the defaults are StereoMap's published ones."""

    track: float = 60.0
    clarity: float = 80.0
    stitching: float = 60.0
    calibration_offset_px: float = 20.0
    calibration_similarity: float = 0.01


@dataclass(frozen=True)
class MetricCheck:
    """One metric of one image, judged.

    ``passed`` is the metric against its threshold; ``required`` says whether
    a failure fails the scan set (otherwise it is an advisory).
    """

    metric: str
    image: str
    score: float | None
    threshold: str
    passed: bool
    required: bool
    reason: str | None = None
    #: The measured value as a person reads it, where one number is not enough
    #: (calibration: offset and similarity).
    detail: str | None = None

    @property
    def fails_qc(self) -> bool:
        return self.required and not self.passed


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reasons: tuple[str, ...]
    checks: tuple[MetricCheck, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def metrics_for(stain: str, *, tiled: bool = False) -> tuple[str, ...]:
    """The metrics run for ``stain``; stitching is added for any tiled input."""
    if stain not in _METRICS:
        msg = f"unknown stain {stain!r}; use one of {', '.join(STAINS)}"
        raise ValueError(msg)
    ms = _METRICS[stain]
    if tiled and "stitching" not in ms:
        ms = (*ms, "stitching")
    return ms


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"


def check_track(image: str, result: Any, thresholds: Thresholds, *, chip: str = "") -> MetricCheck:
    """Track lines: required. ``result`` has ``score`` and optionally ``problem``."""
    score = float(result.score)
    ok = score >= thresholds.track
    reason = None
    if not ok:
        seen = getattr(result, "problem", None) or "the track-line grid was not found reliably"
        serial = f" and that the chip serial ({chip}) is right" if chip else " and that the chip serial is right"
        reason = (
            f"{image}: track line score {_fmt(score)} < {_fmt(thresholds.track)}: {seen}; "
            f"check focus and exposure{serial}"
        )
    return MetricCheck("track", image, score, f">= {_fmt(thresholds.track)}", ok, True, reason)


def check_clarity(image: str, result: Any, thresholds: Thresholds) -> MetricCheck:
    """Clarity: advisory. ``result`` has ``score`` (None when nothing but background), ``counts``."""
    score = result.score
    if score is None:
        reason: str | None = (
            f"{image}: clarity not scored: {getattr(result, 'problem', None) or 'no tissue or chip texture found'} (advisory)"
        )
        return MetricCheck("clarity", image, None, f">= {_fmt(thresholds.clarity)}", False, False, reason)
    score = float(score)
    ok = score >= thresholds.clarity
    reason = None
    if not ok:
        counts = dict(getattr(result, "counts", {}) or {})
        judged = sum(v for k, v in counts.items() if k != "background") or 1
        blur = sum(v for k, v in counts.items() if "blur" in k) / judged
        over = sum(v for k, v in counts.items() if "over" in k) / judged
        bits = []
        if blur >= 0.05:
            bits.append(f"{blur:.0%} of the image looks blurred; check focus and the objective")
        if over >= 0.05:
            bits.append(f"{over:.0%} looks over-exposed; lower exposure time or gain")
        what = "; ".join(bits) or "image quality is below the usual level; check focus and exposure"
        reason = f"{image}: clarity {_fmt(score)} < {_fmt(thresholds.clarity)} (advisory): {what}"
    return MetricCheck("clarity", image, score, f">= {_fmt(thresholds.clarity)}", ok, False, reason)


def check_stitching(
    image: str, result: Any, thresholds: Thresholds, *, required: bool, layout: str = ""
) -> MetricCheck:
    """Stitching: required for DAPI+mIF (or by config), advisory otherwise.

    ``layout`` says where the tiles' nominal positions came from (the overlap
    used and the option that changes it), for the advice.
    """
    overlap = f"the tile overlap ({layout})" if layout else "the tile overlap setting"
    score = float(result.score)
    ok = score >= thresholds.stitching
    reason = None
    if not ok:
        outliers = list(getattr(result, "outliers", ()) or ())
        crit = getattr(result, "criterion", None)
        off = list(getattr(result, "off_nominal", ()) or ())
        if outliers:
            what = f"tile(s) {', '.join(map(str, outliers[:5]))} sit away from their neighbours"
            what += f" (largest deviation {result.max_deviation_px:.0f} px); re-scan or re-stitch those fields of view"
        elif off:
            limit = min((f.stage_limit_px for f in result.fovs if f.off_nominal), default=0.0)
            what = (
                f"the stage put tile(s) {', '.join(map(str, off[:5]))} up to {result.max_stage_deviation_px:.0f} px "
                f"off their nominal positions (limit {limit:.0f} px; the tiles themselves stitch); check the stage "
                "calibration, or raise qc.stitching_stage_limit_px if the overlap allows"
            )
        elif crit is not None and getattr(crit, "clear_share", 1.0) <= getattr(crit, "min_clear_share", 0.3):
            what = (
                f"only {crit.clear_share:.0%} of fields of view have clear overlap features "
                f"(needs more than {crit.min_clear_share:.0%}); check {overlap} and focus"
            )
        else:
            what = f"tile overlaps do not agree well; check stage calibration and {overlap}"
        tag = "" if required else " (advisory)"
        reason = f"{image}: stitching score {_fmt(score)} < {_fmt(thresholds.stitching)}{tag}: {what}"
    return MetricCheck("stitching", image, score, f">= {_fmt(thresholds.stitching)}", ok, required, reason)


def check_calibration(image: str, result: Any, thresholds: Thresholds, *, reference: str) -> MetricCheck:
    """Calibration of an IF image against the nuclear image: required for DAPI+mIF."""
    dx, dy = (float(v) for v in result.offset_px)
    offset = (dx * dx + dy * dy) ** 0.5
    sim = float(result.similarity)
    far = offset > thresholds.calibration_offset_px
    unlike = sim < thresholds.calibration_similarity
    ok = not far and not unlike
    reason = None
    if unlike:
        reason = (
            f"{image}: calibration similarity {sim:.3f} < {thresholds.calibration_similarity:g} against {reference}: "
            "the IF image does not match the nuclear image; check that both come from the same chip and region"
        )
    elif far:
        reason = (
            f"{image}: calibration offset {offset:.1f} px > {thresholds.calibration_offset_px:g} px "
            f"(dx {dx:+.1f}, dy {dy:+.1f}) against {reference}: the IF image is shifted; "
            "re-acquire with the same stage position or re-export the registered images"
        )
    thr = f"offset <= {thresholds.calibration_offset_px:g} px, similarity >= {thresholds.calibration_similarity:g}"
    return MetricCheck(
        "calibration", image, sim, thr, ok, True, reason, detail=f"offset {offset:.1f} px, similarity {sim:.3f}"
    )


def decide(checks: list[MetricCheck] | tuple[MetricCheck, ...], *, problems: tuple[str, ...] = ()) -> Verdict:
    """The scan set's verdict: fail when any required metric failed or a problem stopped QC.

    ``reasons`` lists the failures first, then the advisories (marked so).
    """
    failures = [c.reason for c in checks if c.fails_qc and c.reason]
    advisories = [c.reason for c in checks if not c.required and not c.passed and c.reason]
    failed = bool(problems) or any(c.fails_qc for c in checks)
    return Verdict("fail" if failed else "pass", (*problems, *failures, *advisories), tuple(checks))
