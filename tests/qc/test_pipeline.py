"""run_qc end to end on generated chips with known answers, and the outputs it writes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from qc.io import open_scan_set
from qc.pipeline import QCSettings, _layout_note, run_qc, write_run_outputs
from qc.stitching import MemoryPairCache
from qc.testing.chips import generate_chip, generate_if, write_chip_tiff
from qc.testing.tiles import make_tile_set, write_tile_folder

CHIP = "SS200000135TL_D1"
SIZE = 3000
GEOM = {"width": SIZE, "height": SIZE, "scale": (0.5, 0.5), "angle_deg": 1.5}


@pytest.fixture(scope="module")
def sets(tmp_path_factory, shared_data):
    """Generated scan sets, each in its own folder."""
    root = tmp_path_factory.mktemp("sets")

    def chip(folder: str, name: str = CHIP, **kw) -> Path:
        d = root / folder
        d.mkdir(exist_ok=True)
        path = d / f"{name}.tif"
        write_chip_tiff(path, tile=None, data_dir=shared_data, **{**GEOM, "seed": 5, **kw})
        return d

    out = {
        "dapi": chip("dapi"),
        "nolines": chip("nolines", lines=False),
        "blurred": chip("blurred", blur_sigma=10.0),
        "u16": chip("u16", dtype="uint16"),
        "he": chip("he", stain="HE"),
    }
    # DAPI + two IF images: one shifted by a known offset, one from another chip
    mif = root / "mif"
    mif.mkdir()
    dapi = generate_chip(data_dir=shared_data, seed=5, **GEOM)
    tifffile.imwrite(mif / f"{CHIP}.tif", dapi.image)
    good = generate_if(dapi.truth, offset_px=(12, -7), data_dir=shared_data)
    tifffile.imwrite(mif / f"{CHIP}_CD31_IF.tif", good.image)
    out["mif"] = mif
    bad = root / "mif_bad"
    bad.mkdir()
    tifffile.imwrite(bad / f"{CHIP}.tif", dapi.image)
    tifffile.imwrite(bad / f"{CHIP}_CD31_IF.tif", good.image)
    other = generate_if(dapi.truth, related=False, data_dir=shared_data, seed=9)
    tifffile.imwrite(bad / f"{CHIP}_CD68_IF.tif", other.image)
    out["mif_bad"] = bad
    # the nuclear image as a tile folder (Go Optical style) with stage jitter
    tiles = root / "tiles"
    tiles.mkdir()
    ts = make_tile_set(dapi.image, rows=3, cols=3, tile_size=900, overlap=0.1, jitter_px=3, seed=2)
    write_tile_folder(ts, tiles / CHIP)
    out["tiles"] = tiles
    return out


def _qc(folder: Path, **kw):
    paths = sorted(folder.iterdir())
    with open_scan_set(paths) as scan:
        return run_qc(scan, QCSettings(**kw), MemoryPairCache())


def test_a_clean_dapi_chip_passes_with_the_right_geometry(sets):
    stages = []
    with open_scan_set(sorted(sets["dapi"].iterdir())) as scan:
        rep = run_qc(scan, QCSettings(), progress=lambda s, p: stages.append((s, p)))
    d = rep.as_dict()
    assert d["schema"] == "imageqc.report/1" and d["chip"] == CHIP and d["stain"] == "DAPI"
    assert d["verdict"] == "pass", d["reasons"]
    img = d["images"][0]
    assert img["role"] == "nuclear" and img["format"] == "tiff" and img["width"] == SIZE and img["dtype"] == "uint8"
    assert img["track"]["passed"] and img["track"]["score"] >= 90
    assert abs(img["track"]["angle_deg"] - 1.5) < 0.05
    assert all(abs(s - 0.5) / 0.5 < 0.002 for s in img["track"]["scale"])
    assert img["clarity"]["score"] is not None and img["clarity"]["model"]
    assert img["stitching"] is None and img["calibration"] is None
    assert d["software"]["name"] == "imageqc"
    assert next(s for s, _ in stages) == "read" and stages[-1] == ("verdict", 100.0)
    assert [p for _, p in stages] == sorted(p for _, p in stages)
    # seconds per stage that ran (the service's stage histograms, #19), adding up to about the whole run
    assert set(d["stage_s"]) == {"read", "track", "clarity", "verdict"}
    assert all(v >= 0 for v in d["stage_s"].values()) and sum(d["stage_s"].values()) <= d["duration_s"] + 0.01
    assert d["stage_s"]["track"] > 0


def test_no_track_lines_fails_with_the_reason(sets):
    rep = _qc(sets["nolines"])
    assert rep.verdict == "fail"
    assert rep.reasons[0].startswith(f"{CHIP}: track line score ")
    assert "check focus and exposure" in rep.reasons[0]


def test_heavy_blur_fails(sets):
    rep = _qc(sets["blurred"])
    assert rep.verdict == "fail"
    track = rep.as_dict()["images"][0]["track"]
    assert track["score"] < 60 and track["problem"]


@pytest.mark.parametrize(("key", "stain", "dtype"), [("u16", "DAPI", "uint16"), ("he", "HE", "uint8")])
def test_16_bit_and_he_variants(sets, key, stain, dtype):
    rep = _qc(sets[key])
    d = rep.as_dict()
    assert d["stain"] == stain and d["images"][0]["dtype"] == dtype
    assert d["images"][0]["track"]["passed"], d["reasons"]
    assert d["verdict"] == "pass", d["reasons"]


def test_dapi_mif_calibration_recovers_the_offset_and_writes_outputs(sets, tmp_path):
    paths = sorted(sets["mif"].iterdir())
    with open_scan_set(paths) as scan:
        rep = run_qc(scan, QCSettings())
        out = write_run_outputs(rep, tmp_path / "out")
    d = rep.as_dict()
    assert d["stain"] == "DAPI+mIF" and d["verdict"] == "pass", d["reasons"]
    cal = next(i for i in d["images"] if i["role"] == "IF")["calibration"]
    assert cal["reference"] == CHIP and cal["passed"]
    assert abs(cal["offset_px"][0] - 12) <= 1 and abs(cal["offset_px"][1] + 7) <= 1
    # the output folder, pictures and archive
    assert out.folder.name.startswith(f"{CHIP}_") and out.archive is not None
    assert json.loads(out.report.read_text())["verdict"] == "pass"
    names = sorted(p.name for p in out.pictures)
    assert names == [
        f"{CHIP}_CD31_IF_calibration.png",
        f"{CHIP}_clarity.png",
        f"{CHIP}_summary.png",
        f"{CHIP}_track.png",
    ]
    for p in out.pictures:
        pic = cv2.imread(str(p))
        assert pic is not None and max(pic.shape[:2]) <= 2600 and pic.std() > 5
    with tarfile.open(out.archive) as tar:
        members = tar.getnames()
    # SAW's layout: the IPR named as the archive at the root, imageqc's files in their own folder
    assert members[0] == f"{out.folder.name}.ipr" and out.archive.name == f"{out.folder.name}.tar.gz"
    assert "imageqc/report.json" in members
    assert f"imageqc/pictures/{CHIP}_track.png" in members
    assert not list(tmp_path.glob("out/.*")), "temporary build folders left behind"


def test_dapi_mif_reads_the_nuclear_image_once(sets):
    """Track, clarity and calibration share one read of the nuclear plane (issue #14: it was read twice)."""
    paths = sorted(sets["mif_bad"].iterdir())
    with open_scan_set(paths) as scan:
        reads: list[int] = []
        plane = scan.nuclear.plane
        scan.nuclear.plane = lambda index=0: reads.append(index) or plane(index)
        rep = run_qc(scan, QCSettings())
    assert rep.as_dict()["stain"] == "DAPI+mIF"
    assert reads == [0]
    cals = [i["calibration"] for i in rep.as_dict()["images"] if i["role"] == "IF"]
    assert len(cals) == 2 and all(c is not None for c in cals)


def test_an_unrelated_if_image_fails_calibration(sets):
    rep = _qc(sets["mif_bad"])
    assert rep.verdict == "fail"
    assert len(rep.reasons) == 1 and rep.reasons[0].startswith(f"{CHIP}_CD68_IF: calibration "), rep.reasons
    cal = {i["name"]: i["calibration"] for i in rep.as_dict()["images"] if i["role"] == "IF"}
    assert cal[f"{CHIP}_CD31_IF"]["passed"] and not cal[f"{CHIP}_CD68_IF"]["passed"]


def test_a_tile_folder_gets_stitching_and_a_fiji_tile_configuration(sets, tmp_path):
    cache = MemoryPairCache()
    paths = [sets["tiles"] / CHIP]
    with open_scan_set(paths) as scan:
        rep = run_qc(scan, QCSettings(), cache)
        out = write_run_outputs(rep, tmp_path, archive=False)
    img = rep.as_dict()["images"][0]
    assert img["format"] == "tiles" and img["fov_grid"] == [3, 3]
    st = img["stitching"]
    assert st["pairs_total"] == 12 and st["pairs_computed"] == 12 and st["pairs_cached"] == 0
    assert st["passed"] and st["required"] is False  # advisory for a DAPI set
    fiji = out.folder / "stitching" / CHIP / "TileConfiguration.registered.txt"
    assert fiji.read_text().startswith("#") or "dim = 2" in fiji.read_text()
    assert (out.folder / "pictures" / f"{CHIP}_stitching.png").exists()
    with open_scan_set(paths) as scan:  # warm: every pair from the cache
        again = run_qc(scan, QCSettings(), cache).as_dict()["images"][0]["stitching"]
    assert again["pairs_computed"] == 0 and again["pairs_cached"] == 12
    with open_scan_set(paths) as scan:  # what the stitching advice would say about where the positions came from
        note = _layout_note(scan.images[0])
    assert note == "used 10%, from the microscope's metadata in the folder, which overrides tile_overlap"
    (chk,) = [c for c in rep.checks if c["metric"] == "stitching"]
    assert chk["passed"] and chk["required"] is False and chk["threshold"] == ">= 60"


def test_if_images_without_a_nuclear_image_fail_with_what_is_missing(sets, tmp_path):
    only_if = tmp_path / f"{CHIP}_CD31_IF.tif"
    only_if.write_bytes((sets["mif"] / f"{CHIP}_CD31_IF.tif").read_bytes())
    with open_scan_set([only_if], chip=CHIP) as scan:
        rep = run_qc(scan, QCSettings())
    assert rep.verdict == "fail"
    assert "no nuclear-stain or H&E image" in rep.reasons[0] and f"{CHIP}.tif" in rep.reasons[0]


def test_a_name_that_is_not_a_serial_uses_the_default_template_and_says_so(sets, tmp_path):
    src = sets["dapi"] / f"{CHIP}.tif"
    dst = tmp_path / "mouse_brain_3.tif"
    dst.write_bytes(src.read_bytes())
    with open_scan_set([dst]) as scan:
        rep = run_qc(scan, QCSettings())
    track = rep.as_dict()["images"][0]["track"]
    assert "not a chip serial" in track["note"] and track["template"] == "SS2"
    assert rep.verdict == "pass"


def test_the_report_is_strict_json(sets):
    rep = _qc(sets["dapi"])
    text = rep.to_json()
    assert "NaN" not in text and "Infinity" not in text
    assert np.isfinite(json.loads(text)["duration_s"])


def test_pictures_follow_the_rules_decision_not_the_metrics_own_default(sets, tmp_path):
    """The track picture's header shows the site's decision (its thresholds), which the run records."""
    from qc.pictures import STRIPE_PX, VERDICT_COLOURS, pictures_from_artifacts

    report = _qc(sets["dapi"])
    assert report.artifacts["passed"][("track", CHIP)] is report.images[0].track["passed"] is True

    def stripe(artifacts, folder):
        folder.mkdir()
        pics = {p.name: p for p in pictures_from_artifacts(artifacts, folder)}
        top = cv2.imread(str(pics[f"{CHIP}_track.png"]))[:STRIPE_PX].reshape(-1, 3)
        (colour,) = {tuple(int(v) for v in px) for px in top}
        return colour

    assert stripe(report.artifacts, tmp_path / "as-run") == VERDICT_COLOURS["pass"]
    # a stricter site threshold fails the same score: the picture says fail although the metric's own 60 passes
    stricter = {**report.artifacts, "passed": {("track", CHIP): False}}
    assert stripe(stricter, tmp_path / "stricter") == VERDICT_COLOURS["fail"]


def test_a_warm_tile_folder_is_read_once_and_its_stitching_picture_shows_it_fused(sets, tmp_path, monkeypatch):
    """With every pair cached (as after live QC), QC reads each tile file once: the plane, the thumbnail
    and the fused view of the stitching picture all come from that read (issue #18)."""
    import qc.io.tiles as tiles_mod

    cache = MemoryPairCache()
    paths = [sets["tiles"] / CHIP]
    with open_scan_set(paths) as scan:
        run_qc(scan, QCSettings(), cache)
    reads: list[str] = []
    real = tiles_mod.read_tile_file
    monkeypatch.setattr(
        tiles_mod, "read_tile_file", lambda path, *a, **k: reads.append(path.name) or real(path, *a, **k)
    )
    with open_scan_set(paths) as scan:
        names = sorted(t.name for t in scan.images[0].tiles)
        reads.clear()
        rep = run_qc(scan, QCSettings(), cache)
    assert sorted(reads) == names
    fused, f = rep.artifacts["fused_thumbs"][CHIP]
    thumb, f2 = rep.artifacts["thumbs"][CHIP]
    assert f == f2 and fused.shape == thumb.shape and fused.dtype == thumb.dtype
    # the same chip (its correctness against the generator's truth: tests/qc/test_stitching_preview.py); the
    # registered positions keep the stitching's own frame, within a few pixels of the nominal one
    inner = fused[4:-4, 4:-4].astype(float).ravel()
    best = max(
        np.corrcoef(inner, thumb[4 + dy : thumb.shape[0] - 4 + dy, 4 + dx : thumb.shape[1] - 4 + dx].ravel())[0, 1]
        for dy in range(-2, 3)
        for dx in range(-2, 3)
    )
    assert best > 0.6, best  # 0.74: tiles off their nominal place by up to a preview pixel; another chip ~0
    out = write_run_outputs(rep, tmp_path, archive=False)
    assert (out.folder / "pictures" / f"{CHIP}_stitching.png").exists()
