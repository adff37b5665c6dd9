"""Verdict rules: which metrics run, thresholds, and reasons a technician can act on."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from qc.rules import (
    Thresholds,
    check_calibration,
    check_clarity,
    check_stitching,
    check_track,
    decide,
    metrics_for,
)

T = Thresholds()


def test_metrics_per_stain_follow_the_architecture():
    assert metrics_for("DAPI") == ("track", "clarity")
    assert metrics_for("ssDNA") == ("track", "clarity")
    assert metrics_for("HE") == ("track", "clarity")
    assert metrics_for("DAPI+mIF") == ("track", "clarity", "stitching", "calibration")
    assert metrics_for("DAPI", tiled=True) == ("track", "clarity", "stitching")
    with pytest.raises(ValueError, match="unknown stain"):
        metrics_for("Hoechst")


@pytest.mark.parametrize(("score", "passed"), [(59.9, False), (60.0, True), (100.0, True), (0.0, False)])
def test_track_threshold_is_60_and_required(score, passed):
    chk = check_track(
        "SS200000135TL_D1", NS(score=score, problem="few track crossings found"), T, chip="SS200000135TL_D1"
    )
    assert chk.passed is passed and chk.required
    if not passed:
        assert chk.reason == (
            f"SS200000135TL_D1: track line score {score:.0f} < 60: few track crossings found; "
            "check focus and exposure and that the chip serial (SS200000135TL_D1) is right"
        )


def test_clarity_is_advisory_and_says_what_it_saw():
    res = NS(
        score=62.0,
        counts={
            "good": 50,
            "mild_blur": 10,
            "severe_blur": 30,
            "mild_overexposure": 0,
            "severe_overexposure": 10,
            "background": 100,
        },
    )
    chk = check_clarity("C02533C", res, T)
    assert not chk.passed and not chk.required and not chk.fails_qc
    assert "clarity 62 < 80 (advisory)" in chk.reason and "40% of the image looks blurred" in chk.reason
    assert "10% looks over-exposed" in chk.reason
    none = check_clarity("C02533C", NS(score=None, counts={}, problem="only background found"), T)
    assert not none.fails_qc and "only background found" in none.reason


def test_stitching_required_only_when_asked_and_names_the_tile():
    res = NS(score=30.0, max_deviation_px=44.0, outliers=("FOV_0001_0002",), criterion=None)
    assert check_stitching("A02677B5", res, T, required=True).fails_qc
    adv = check_stitching("A02677B5", res, T, required=False)
    assert not adv.fails_qc and "(advisory)" in adv.reason and "FOV_0001_0002" in adv.reason


def test_stitching_advice_names_the_overlap_used_and_the_option_that_changes_it():
    """#15: "check the tile overlap setting" said neither which overlap was used nor where to change it."""
    res = NS(score=20.0, max_deviation_px=3.0, outliers=(), criterion=NS(clear_share=0.1, min_clear_share=0.3))
    layout = (
        "used 10%, the default, as nothing gave one; set the watch root's tile_overlap, or imageqc qc --tile-overlap"
    )
    chk = check_stitching("A02677B5", res, T, required=True, layout=layout)
    assert chk.fails_qc and f"check the tile overlap ({layout}) and focus" in chk.reason


def test_a_stage_off_nominal_is_told_apart_from_tiles_that_do_not_stitch():
    fovs = (NS(off_nominal=True, stage_limit_px=40.0), NS(off_nominal=False, stage_limit_px=40.0))
    res = NS(
        score=45.0,
        max_deviation_px=30.0,
        outliers=(),
        off_nominal=("FOV_0000_0001",),
        fovs=fovs,
        max_stage_deviation_px=61.0,
        criterion=NS(clear_share=1.0, min_clear_share=0.3),
    )
    chk = check_stitching("A02677B5", res, T, required=True)
    assert (
        chk.fails_qc
        and "stage put tile(s) FOV_0000_0001 up to 61 px off their nominal positions (limit 40 px" in chk.reason
    )
    assert "qc.stitching_stage_limit_px" in chk.reason and "sit away from their neighbours" not in chk.reason


@pytest.mark.parametrize(
    ("offset", "sim", "passed", "words"),
    [
        ((3.0, -4.0), 0.5, True, None),
        ((16.0, 13.0), 0.5, False, "offset 20.6 px > 20 px"),
        ((0.0, 0.0), 0.005, False, "similarity 0.005 < 0.01"),
    ],
)
def test_calibration_offset_and_similarity(offset, sim, passed, words):
    chk = check_calibration("X_CD31_IF", NS(offset_px=offset, similarity=sim), T, reference="X")
    assert chk.passed is passed and chk.required
    if words:
        assert words in chk.reason


def test_verdict_fails_on_required_metrics_or_problems_and_lists_advisories_last():
    track_ok = check_track("c", NS(score=90.0, problem=""), T)
    clarity_bad = check_clarity("c", NS(score=50.0, counts={"good": 1, "severe_blur": 1}), T)
    v = decide([track_ok, clarity_bad])
    assert v.verdict == "pass" and len(v.reasons) == 1 and "(advisory)" in v.reasons[0]
    track_bad = check_track("c", NS(score=10.0, problem="no line grid found"), T)
    v = decide([clarity_bad, track_bad])
    assert v.verdict == "fail" and "track line score 10" in v.reasons[0] and "(advisory)" in v.reasons[1]
    v = decide([track_ok], problems=("c_CD31_IF: cannot read the image",))
    assert v.verdict == "fail" and v.reasons == ("c_CD31_IF: cannot read the image",)


def test_site_thresholds_apply():
    strict = Thresholds(track=80, calibration_offset_px=5)
    assert not check_track("c", NS(score=75.0, problem=""), strict).passed
    assert not check_calibration("c_IF", NS(offset_px=(6.0, 0.0), similarity=0.9), strict, reference="c").passed
