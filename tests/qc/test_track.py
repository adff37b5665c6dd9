"""Track-line detection and template fit (qc.track) on generated chips with known answers."""

from __future__ import annotations

import json
import tracemalloc

import cv2
import numpy as np
import pytest
import tifffile

from qc.chip import TEMPLATES
from qc.testing.chips import generate_chip, real_looking, write_chip_tiff
from qc.track import PASS_SCORE, GridModel, TrackResult, find_track_lines

# accuracy required on clean chips (issue: angle 0.05 deg, origin 2 px, scale 0.2 %)
ANGLE_TOL, ORIGIN_TOL, SCALE_TOL = 0.05, 2.0, 0.002


def _origin_error(found: GridModel, truth: GridModel) -> float:
    """Distance from the true origin to the nearest period crossing of the found grid, px."""
    p = found.template.period
    uv = found.image_to_chip(*truth.origin_px)
    near = found.chip_to_image(round(uv[0] / p) * p, round(uv[1] / p) * p)
    return float(np.hypot(*(near - np.asarray(truth.origin_px))))


def _assert_accurate(r: TrackResult, truth: GridModel) -> None:
    assert r.found
    assert abs(r.angle_deg - truth.angle_deg) <= ANGLE_TOL
    assert r.scale[0] == pytest.approx(truth.scale[0], rel=SCALE_TOL)
    assert r.scale[1] == pytest.approx(truth.scale[1], rel=SCALE_TOL)
    assert _origin_error(r.grid, truth) <= ORIGIN_TOL
    # reported in the canonical form of qc.track.grid
    assert r.grid.canonical() == r.grid


def _size(scale: float) -> int:
    # enough chip in view: about 5 lines per axis at the largest scale
    return 4000 if scale >= 1.5 else 3000


@pytest.mark.parametrize(
    ("angle", "scale"),
    [
        (-10.0, 0.5),
        (-7.3, 1.0),
        (-2.2, 2.5),
        (0.0, 0.5),
        (0.0, 1.0),
        (1.7, 1.5),
        (4.4, 2.0),
        (10.0, 1.0),
        (10.0, 2.5),
        (-10.0, 1.8),
    ],
)
def test_clean_chip_known_answer(angle, scale):
    n = _size(scale)
    chip = generate_chip(
        width=n, height=n, angle_deg=angle, scale=scale, tissue_fraction=0.3, seed=int(100 + angle * 10 + scale * 7)
    )
    r = find_track_lines(chip.image, "SS2")
    _assert_accurate(r, chip.truth.grid)
    assert r.score >= 95
    assert r.passed and r.problem == ""
    assert r.template_recall == pytest.approx(1.0, abs=0.05)
    assert r.residual_px < 0.5
    # every line crossing the image is matched, with template indices counted from the origin
    g = chip.truth.grid
    assert set(r.lines_x) <= set(g.lines_in_image(0, n, n))
    assert len(r.lines_x) >= 0.95 * r.expected_lines[0]


@pytest.mark.parametrize(
    "conditions",
    [
        dict(tissue_fraction=0.0),
        dict(tissue_fraction=0.35, line_contrast=0.25),
        dict(tissue_fraction=0.7),
        dict(tissue_fraction=0.5, line_contrast=0.15, noise=0.02),
        dict(tissue_fraction=0.5, illumination=1.0),
        dict(tissue_fraction=0.5, dtype="uint16"),
        dict(tissue_fraction=0.5, stain="ssDNA", dtype="uint16", gain=2.5),
        dict(tissue_fraction=0.5, stain="HE"),
        dict(tissue_fraction=0.6, stain="HE", line_contrast=0.2, illumination=0.8),
        dict(tissue_fraction=0.4, blur_sigma=1.5),
        dict(tissue_fraction=0.4, scale=(1.0, 1.004)),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_conditions_still_pass(conditions):
    params = dict(width=3000, height=3000, angle_deg=-3.1, scale=1.2, seed=7)
    params.update(conditions)
    chip = generate_chip(**params)
    r = find_track_lines(chip.image, chip.truth.template)
    assert r.score >= PASS_SCORE, r
    _assert_accurate(r, chip.truth.grid)


def test_no_track_lines_fails_with_a_reason():
    for stain, dtype in (("DAPI", "uint8"), ("ssDNA", "uint16"), ("HE", "uint8")):
        chip = generate_chip(
            width=3000, height=3000, stain=stain, dtype=dtype, lines=False, tissue_fraction=0.6, seed=3
        )
        r = find_track_lines(chip.image, "SS2")
        assert r.score < PASS_SCORE
        assert not r.passed and not r.found
        assert r.problem == "no line grid found"
        assert r.grid is None and len(r.grid_lines()) == 0


def test_blank_image_fails():
    r = find_track_lines(np.full((1000, 1200), 17, np.uint8), "SS2")
    assert r.score == 0 and r.problem == "no line grid found"


def test_heavy_blur_fails():
    chip = generate_chip(width=3000, height=3000, angle_deg=2.0, blur_sigma=10.0, tissue_fraction=0.4, seed=10)
    r = find_track_lines(chip.image, "SS2")
    assert r.score < PASS_SCORE
    assert r.problem in ("no line grid found", "track lines too faint or blurred to locate at full resolution")


def test_moderate_blur_reports_blur():
    chip = generate_chip(width=4000, height=4000, angle_deg=2.0, blur_sigma=8.0, tissue_fraction=0.4, seed=10)
    r = find_track_lines(chip.image, "SS2")
    assert r.score < PASS_SCORE
    assert "blurred" in r.problem
    assert r.line_width_px > 6


@pytest.mark.parametrize(("chip_template", "used"), [("SS2", "SS1"), ("SS2", "DP84"), ("SS1", "SS2"), ("DP84", "SS2")])
def test_wrong_template_scores_low(chip_template, used):
    chip = generate_chip(width=3000, height=3000, angle_deg=2.0, template=chip_template, tissue_fraction=0.3, seed=11)
    right = find_track_lines(chip.image, chip_template)
    assert right.score >= 95
    wrong = find_track_lines(chip.image, used)
    assert wrong.score < PASS_SCORE
    assert wrong.template == used
    if wrong.found:
        assert wrong.problem == f"grid found but spacing does not match the {used} template"


def test_lines_visible_in_part_of_the_chip_only():
    chip = generate_chip(
        width=4000, height=4000, angle_deg=-4.0, tissue_fraction=0.8, tissue_line_visibility=0.0, seed=12
    )
    r = find_track_lines(chip.image, "SS2")
    assert r.score < PASS_SCORE
    assert r.area_share < 0.4
    assert r.problem == f"lines found in only {r.area_share:.0%} of the chip area"
    # what was found is still right
    _assert_accurate(r, chip.truth.grid)


def test_bright_lines_with_bright_polarity():
    chip = generate_chip(width=3000, height=3000, angle_deg=5.0, tissue_fraction=0.3, seed=13)
    inverted = 255 - chip.image
    r = find_track_lines(inverted, "SS2", polarity="bright")
    assert r.passed and r.polarity == "bright"
    _assert_accurate(r, chip.truth.grid)
    # the default tries both polarities and keeps the one that fits
    auto = find_track_lines(inverted, "SS2")
    assert auto.polarity == "bright" and auto.score >= 95
    _assert_accurate(auto, chip.truth.grid)
    assert find_track_lines(chip.image, "SS2").polarity == "dark"
    forced = find_track_lines(inverted, "SS2", polarity="dark")
    assert forced.score < auto.score and forced.polarity == "dark"


def test_memmap_input_is_read_without_a_full_float_copy(tmp_path):
    path = tmp_path / "chip.tif"
    truth = write_chip_tiff(
        path, tile=None, width=8000, height=8000, angle_deg=1.1, scale=0.9, tissue_fraction=0.5, seed=14
    )
    image = tifffile.memmap(path, mode="r")
    tracemalloc.start()
    try:
        r = find_track_lines(image, "SS2")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_accurate(r, truth.grid)
    # a float32 copy of the image alone would be 256 MB
    assert peak < 160e6, peak


def test_serial_or_template_object_select_the_template():
    chip = generate_chip(width=3000, height=3000, angle_deg=1.0, template="DP84", scale=1.4, seed=15)
    for template in ("DP8400000006BL_E4", TEMPLATES["DP84"], "DP84"):
        r = find_track_lines(chip.image, template)
        assert r.template == "DP84" and r.passed


def test_result_reports_and_draws():
    chip = generate_chip(width=3000, height=2500, angle_deg=-6.0, scale=0.8, seed=16)
    r = find_track_lines(chip.image, "SS2")
    d = r.as_dict()
    json.dumps(d)
    assert d["score"] == round(r.score, 1) and d["passed"] is True
    assert d["angle_deg"] == pytest.approx(r.angle_deg, abs=1e-4)
    assert set(d) >= {"score", "passed", "angle_deg", "scale", "origin_px", "template_recall", "problem"}
    assert r.image_size == (3000, 2500)
    lines = r.grid_lines()
    assert len(lines) == len(chip.truth.grid.grid_lines(3000, 2500))
    # the drawn lines lie on the true lines to within the accuracy bounds
    truth = chip.truth.grid
    mid = (lines.segments[:, :2] + lines.segments[:, 2:]) / 2
    uv = truth.image_to_chip(mid[:, 0], mid[:, 1])
    fam = uv[np.arange(len(uv)), lines.axis]
    off_px = np.abs(fam - truth.line_positions(lines.index)) * 0.8
    assert off_px.max() < 2.0
    # thumbnails: the same lines on a smaller canvas are fewer or equal
    assert len(r.grid_lines(1000, 1000)) <= len(lines)
    empty = find_track_lines(np.zeros((500, 500), np.uint8), "SS2").as_dict()
    json.dumps(empty)
    assert empty["angle_deg"] is None and empty["score"] == 0.0


def test_threads_restored_and_inputs_checked():
    before = cv2.getNumThreads()
    chip = generate_chip(width=1500, height=1500, seed=17)
    find_track_lines(chip.image, "SS2", max_threads=1)
    assert cv2.getNumThreads() == before
    with pytest.raises(ValueError, match="2-D grey"):
        find_track_lines(np.zeros(1000, np.uint8), "SS2")
    with pytest.raises(ValueError, match="too small"):
        find_track_lines(np.zeros((40, 4000), np.uint8), "SS2")
    with pytest.raises(ValueError, match="polarity"):
        find_track_lines(chip.image, "SS2", polarity="dim")
    with pytest.raises(ValueError, match="dtype"):
        find_track_lines(np.zeros((100, 100), bool), "SS2")


@pytest.mark.slow
def test_full_size_chip_from_a_memmapped_tiff(tmp_path):
    """A 1 cm chip at 10x: 20000 x 20000 uint8 DAPI, read as a memory map."""
    path = tmp_path / "SS200000135TL_D1.tif"
    truth = write_chip_tiff(
        path, tile=None, width=20000, height=20000, angle_deg=-1.3, tissue_fraction=0.5, illumination=0.4, seed=18
    )
    image = tifffile.memmap(path, mode="r")
    tracemalloc.start()
    try:
        r = find_track_lines(image, "SS200000135TL_D1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_accurate(r, truth.grid)
    assert r.score >= 95
    assert r.expected_lines[0] >= 60
    assert peak < 400e6, peak  # a float32 copy would be 1.6 GB


def test_real_stain_crops_have_no_grid(shared_data):
    """The real Stereo-seq crops in shared/data carry no track lines: nothing may be 'found'."""
    files = sorted((shared_data / "stereo_crops").glob("*/input/*.tif"))
    assert len(files) >= 4
    for f in files:
        r = find_track_lines(tifffile.imread(f), "SS2")
        assert r.score < PASS_SCORE, f
        assert r.problem == "no line grid found", f


@pytest.mark.parametrize("factor", [4, 5])
def test_half_resolution_evidence_finds_faint_lines_exactly(factor):
    """From a reduction factor of 4 the top-hat runs on 2 x 2 sums (issue #16): real-looking 3-level lines
    are still found with the issue-#5 accuracy, at even factors (whole blocks) and odd ones (area resampling)."""
    chip = generate_chip(width=4000, height=4000, seed=31 + factor, **real_looking(angle_deg=2.3))
    r = find_track_lines(chip.image, "SS2", downsample=factor)
    assert r.downsample == factor
    _assert_accurate(r, chip.truth.grid)
    assert r.score >= PASS_SCORE and r.polarity == "dark"


def test_threads_do_not_change_the_result():
    """Windows are measured on several threads (issue #16): the fit is the same as on one."""
    chip = generate_chip(width=3000, height=3000, seed=5, angle_deg=1.1, tissue_fraction=0.3)
    one = find_track_lines(chip.image, "SS2", max_threads=1)
    two = find_track_lines(chip.image, "SS2", max_threads=2)
    assert (one.score, one.angle_deg, one.scale, one.origin_px) == (two.score, two.angle_deg, two.scale, two.origin_px)
    assert one.measurements_found == two.measurements_found
    np.testing.assert_array_equal(one.crossings, two.crossings)


def test_shared_spectrum_bins_give_the_same_angles():
    """The polarities share the spectrum's bins (issue #16): the same candidates as bins of their own."""
    from qc.track import coarse

    chip = generate_chip(width=1200, height=900, seed=6, angle_deg=3.3, tissue_fraction=0.3)
    n, _ = coarse.normalise(chip.image.astype(np.float32))
    own = coarse.estimate_angle(n)
    assert coarse.estimate_angle(n, bins=coarse.spectrum_bins(*n.shape)) == own
    assert coarse.estimate_angle(n, bins=coarse.spectrum_bins(64, 64)) == own  # bins of another shape are ignored
    assert abs(own[0][0] - 3.3) < 0.1
