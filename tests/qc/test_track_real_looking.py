"""Track lines on full-size chips that look like real stitched scans (issue #12).

Real stitched 10x nuclear-stain scans have a chip surface about 10 grey levels
of 255, track lines only a few levels darker, per-FOV brightness steps and
vignetting, saturated tissue and dark debris (``qc.testing.chips.REAL_LOOKING``).
Until the coarse search read line evidence at full resolution, every S1-sized
(20,580 px) such chip failed with "no line grid found" while a 10,000 px crop
of the same image passed: the plain area mean diluted the lines below the seams.
These tests run the chips at their real sizes: S0.5 (10,584 px), S1
(20,580 px, through ``imageqc qc``) and a 2 x 2 cm chip (40,572 px, memory-mapped).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from daemon.cli import main
from qc.testing.chips import generate_chip, real_looking, write_chip_tiff
from qc.track import PASS_SCORE, find_track_lines
from tests.qc.test_track import _assert_accurate

S05, S1, S2x2 = 10_584, 20_580, 40_572  # chip widths in px at 10x (qc.chip: 2940 x (units x 6.8 + 0.2))


@pytest.mark.parametrize(
    ("size", "params"),
    [
        (S05, real_looking(angle_deg=7.5)),
        (S05, real_looking("ssDNA", dtype="uint16", angle_deg=-3.2)),
        (S05, real_looking(angle_deg=12.0)),  # beyond cellbin2's 8 degree limit
        (S05, real_looking(angle_deg=0.4, fov_gain=0.1)),  # milder seams failed the same way at S1
        (12_000, real_looking(angle_deg=-1.1, scale=2.0)),  # 20x: lines 6 px
        (S05, real_looking("HE", angle_deg=0.7)),  # lines lighter than the surface
    ],
    ids=["DAPI-u8-7.5deg", "ssDNA-u16", "12deg", "seams-10pct", "20x", "HE-bright-lines"],
)
def test_real_looking_s05_chips_pass_with_the_exact_grid(size, params, shared_data):
    chip = generate_chip(width=size, height=size, seed=21, data_dir=shared_data, **params)
    r = find_track_lines(chip.image, "SS2")
    assert r.passed, r
    assert r.problem == ""
    _assert_accurate(r, chip.truth.grid)
    assert r.polarity == params["line_polarity"] if "line_polarity" in params else r.polarity == "dark"


def test_real_looking_s1_chip_passes_through_imageqc_qc(tmp_path, shared_data, capsys):
    """The reported failure: a 20,580 px real-looking chip, QC'd by the command a technician runs."""
    path = tmp_path / "SS200000135TL_D1.tif"
    truth = write_chip_tiff(
        path, tile=(512, 512), width=S1, height=S1, seed=22, data_dir=shared_data, **real_looking(angle_deg=1.3)
    )
    assert main(["qc", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "pass", report["reasons"]
    track = report["images"][0]["track"]
    assert track["passed"] and track["score"] >= PASS_SCORE
    assert track["polarity"] == "dark"
    assert abs(track["angle_deg"] - truth.angle_deg) <= 0.05
    assert track["scale"] == pytest.approx(list(truth.scale), rel=0.002)


def test_real_looking_s1_chip_without_track_lines_fails_with_the_reason(shared_data):
    chip = generate_chip(width=S1, height=S1, seed=23, data_dir=shared_data, **real_looking(lines=False))
    r = find_track_lines(chip.image, "SS2")
    assert not r.passed
    assert r.problem == "no line grid found"


def test_real_looking_heavy_blur_fails_with_the_reason(shared_data):
    chip = generate_chip(
        width=S05, height=S05, seed=24, data_dir=shared_data, **real_looking(angle_deg=1.0, blur_sigma=8.0)
    )
    r = find_track_lines(chip.image, "SS2")
    assert not r.passed
    assert r.problem in ("no line grid found", "track lines too faint or blurred to locate at full resolution")


@pytest.mark.slow
def test_real_looking_2x2cm_chip_memory_mapped(tmp_path, shared_data):
    """A 2 x 2 cm chip (40,572 px, 1.6 GB) read through a memory map, never copied whole."""
    path = tmp_path / "SS200000108BR_A3B4.tif"
    truth = write_chip_tiff(
        path, tile=None, width=S2x2, height=S2x2, seed=25, data_dir=shared_data, **real_looking(angle_deg=-0.8)
    )
    image = tifffile.memmap(path, mode="r")
    assert isinstance(image, np.memmap)
    r = find_track_lines(image, "SS200000108BR_A3B4")
    assert r.passed, r
    _assert_accurate(r, truth.grid)
    assert r.downsample >= 20
