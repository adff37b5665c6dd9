"""SAW's IPR: every spec field written with its type, read back; known answers from generated chips.

Issue #13 (parts 1 and 5). The schema below is written out here from SAW's IPR
v0.2.1 spec and cellbin2 1.2.1, independently of :mod:`qc.ipr`, so a field the
writer drops or retypes fails a test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from qc.chip import template_for
from qc.io import open_image, open_scan_set
from qc.io.model import ScanSet
from qc.ipr import (
    FLOAT_PLACEHOLDER,
    INT_PLACEHOLDER,
    IPR_VERSION,
    SPELLINGS,
    STR_PLACEHOLDER,
    IPRError,
    default_qc_result_file,
    ipr_group_name,
    read_ipr,
    saw_refusals,
    write_ipr,
)
from qc.pipeline import QCSettings, run_qc
from qc.report import ImageReport, QCReport
from qc.stitching import MemoryPairCache
from qc.testing.chips import generate_chip, generate_if
from qc.testing.tiles import make_tile_set, write_tile_folder
from qc.track import GridModel

CHIP = "SS200000135TL_D1"
SIZE = 3000
GEOM = {"width": SIZE, "height": SIZE, "scale": (0.5, 0.5), "angle_deg": 1.5}
IF_OFFSET = (12, -7)
TAGS = {"Make": "Zeiss", "Model": "Axio Scan.Z1", "DateTime": "2024:05:06 07:08:09", "Software": "ZEN 3.4"}

# Field kinds: i int, f float, s str, b bool, a array attribute, d dataset, g group.
# "A|B": the spec's name A and cellbin2's B, both written with the same value.


def _fields(**kinds: str) -> dict[str, str]:
    return {name: kind for kind, names in kinds.items() for name in names.split()}


IMAGE_INFO = _fields(
    i="BitDepth Brightness ChannelCount FOVHeight FOVWidth Pitch ScanCols ScanRows",
    f="ExposureTime Gamma Overlap PixelSizeX PixelSizeY ScanObjective Sharpness",
    s="AppFileVer DeviceSN Gain Illuminance Manufacture|Manufacturer Model QCResultFile STOmicsChipSN ScanChannel "
    "ScanTime StereoResepVersion|RegisterVersion WhiteBalance",
    b="BackgroundBalance ColorEnhancement Contrast DistortionCorrection GammaShift StitchedImage",
    d="RGBScale",
)
QC_INFO = _fields(
    i="ClarityOverlap GoodFOVCount|GoodFovCount QCPassFlag TotalFOVCount|TotalFovCount TrackCrossQCPassFlag "
    "TrackLineChannel ScopeStitchQCPassFlag",
    f="ClarityScore TrackLineScore ScopeStitchQCScore TemplateRecall TemplateValidArea",
    s="ClarityCounts Experimenter ImageQCVersion RemarkInfo StainType",
    a="ClarityCutSize",
    d="ScopeStitchQCMatrix ClarityArr|ClarityPreds",
    g="CrossPoints",
)
STITCH = _fields(f="StitchingScore", s="TemplateSource WhichStitch", d="TemplatePoint TransformTemplate",
                 g="BGIStitch ScopeStitch StitchEval")  # fmt: skip
SCOPE_STITCH = _fields(
    i="GlobalHeight GlobalWidth", d="GlobalLoc ScopeJitterDiff ScopeHorizontalJitter ScopeVerticalJitter"
)
BGI_STITCH = _fields(i="StitchedGlobalHeight StitchedGlobalWidth", d="StitchedGlobalLoc")
STITCH_EVAL = _fields(f="MaxDeviation", d="GlobalDeviation StitchEvalH StitchEvalV")
REGISTER = _fields(
    i="CounterRot90 RegistrationScore|RegisterScore XStart YStart",
    f="OffsetX OffsetY Rotation ScaleX ScaleY ManualRotation ManualScaleX ManualScaleY",
    b="Flip", a="MatrixShape", d="MatrixTemplate",
)  # fmt: skip
TISSUE_SEG = _fields(i="TissueSegScore", a="TissueSegShape", d="TissueMask")
CELL_SEG = _fields(a="CellSegShape", d="CellMask CellSegTrace")
SCHEMA = {"ImageInfo": IMAGE_INFO, "QCInfo": QC_INFO, "Stitch": STITCH, "Stitch/ScopeStitch": SCOPE_STITCH,
          "Stitch/BGIStitch": BGI_STITCH, "Stitch/StitchEval": STITCH_EVAL, "Register": REGISTER,
          "TissueSeg": TISSUE_SEG, "CellSeg": CELL_SEG}  # fmt: skip
MANUAL_STATE = ["calibration", "cellseg", "register", "stitch", "tissueseg"]
KINDS = {"i": np.integer, "f": np.floating, "b": np.bool_, "s": str}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data) -> dict[str, tuple[QCReport, Path, object]]:
    """QC runs on generated scan sets, each with its IPR: (report, ipr path, extra truth)."""
    root = tmp_path_factory.mktemp("ipr")
    dapi = generate_chip(data_dir=shared_data, seed=5, **GEOM)
    nolines = generate_chip(data_dir=shared_data, seed=5, lines=False, **GEOM)
    ifimg = generate_if(dapi.truth, offset_px=IF_OFFSET, data_dir=shared_data)
    tiles = make_tile_set(dapi.image, rows=3, cols=3, tile_size=900, overlap=0.1, jitter_px=3, seed=2)
    folders = {name: root / name for name in ("dapi", "nolines", "mif", "tiles")}
    for folder in folders.values():
        folder.mkdir()
    tags = [(271, "s", 0, TAGS["Make"], True), (272, "s", 0, TAGS["Model"], True)]
    tifffile.imwrite(folders["dapi"] / f"{CHIP}.tif", dapi.image, extratags=tags, software=TAGS["Software"],
                     datetime=TAGS["DateTime"])  # fmt: skip
    tifffile.imwrite(folders["nolines"] / f"{CHIP}.tif", nolines.image)
    tifffile.imwrite(folders["mif"] / f"{CHIP}.tif", dapi.image)
    tifffile.imwrite(folders["mif"] / f"{CHIP}_CD31_IF.tif", ifimg.image)
    write_tile_folder(tiles, folders["tiles"] / CHIP)
    truth = {"dapi": dapi.truth, "nolines": nolines.truth, "mif": ifimg.truth, "tiles": tiles}
    out = {}
    for name, folder in folders.items():
        with open_scan_set(sorted(folder.iterdir())) as scan:
            report = run_qc(scan, QCSettings(operator="tech@example.org"), MemoryPairCache())
            out[name] = (report, write_ipr(report, scan, root / "out" / name), truth[name])
    return out


def _true_crossings(grid: GridModel, width: int, height: int) -> np.ndarray:
    """Every true grid crossing near the image: x, y, template index x, template index y."""
    kx, ky = grid.lines_in_image(0, width, height), grid.lines_in_image(1, width, height)
    gx, gy = (a.ravel() for a in np.meshgrid(kx, ky, indexing="ij"))
    xy = grid.chip_to_image(grid.line_positions(gx), grid.line_positions(gy)).reshape(-1, 2)
    return np.column_stack([xy, gx % 9, gy % 9])


def _match(points: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each point to its nearest true crossing, and whether the template indices agree."""
    d = np.hypot(points[:, None, 0] - truth[None, :, 0], points[:, None, 1] - truth[None, :, 1])
    k = np.argmin(d, axis=1)
    return d[np.arange(len(points)), k], np.all(points[:, 2:] == truth[k, 2:], axis=1)


def _kind_ok(value, kind: str) -> bool:
    if kind == "a":
        return isinstance(value, np.ndarray) and value.ndim == 1
    return isinstance(value, KINDS[kind])


@pytest.mark.parametrize("key", ["dapi", "mif", "tiles"])
def test_every_spec_field_is_written_with_its_type(runs, key):
    report, path, _ = runs[key]
    with h5py.File(path, "r") as f:
        assert f.attrs["IPRVersion"] == IPR_VERSION and set(f.attrs) == {"IPRVersion"}
        assert f["Preview"].dtype == np.uint8 and f["Preview"].shape == (0,)
        assert dict(f["ManualState"].attrs) == dict.fromkeys(MANUAL_STATE, False)
        assert dict(f["StereoResepSwitch"].attrs) == dict.fromkeys(MANUAL_STATE[1:], False)
        groups = {ipr_group_name(CHIP, im, report.stain) for im in report.images}
        assert set(f) == {"Preview", "ManualState", "StereoResepSwitch"} | groups
        for group in groups:
            for sub, fields in SCHEMA.items():
                g = f[f"{group}/{sub}"]
                for spelled, kind in fields.items():
                    for name in spelled.split("|"):
                        where = f"{group}/{sub}/{name}"
                        if kind == "g":
                            assert isinstance(g.get(name), h5py.Group), where
                        elif kind == "d":
                            assert isinstance(g.get(name), h5py.Dataset), where
                        else:
                            assert name in g.attrs, where
                            assert _kind_ok(g.attrs[name], kind), (where, type(g.attrs[name]))
            if group.endswith("_IF"):
                cal = f[f"{group}/Calibration"]
                assert isinstance(cal.attrs["CalibrationQCPassFlag"], np.integer)
                scope = {k: type(v) for k, v in cal["Scope"].attrs.items()}
                assert scope == dict.fromkeys(["Confidence", "OffsetX", "OffsetY"], np.float64)
            else:
                assert "Calibration" not in f[group]


def test_values_and_placeholders_read_back(runs):
    report, path, _ = runs["dapi"]
    rec = read_ipr(path)
    assert rec.ipr_version == IPR_VERSION and list(rec.images) == ["DAPI"]
    im = rec.images["DAPI"]
    info, qc = im.image_info, im.qc_info
    assert info["QCResultFile"] == path.stem == default_qc_result_file(report)
    assert info["STOmicsChipSN"] == CHIP and info["Pitch"] == 500
    assert (info["BitDepth"], info["ChannelCount"], info["StitchedImage"]) == (8, 1, True)
    assert (info["ScanRows"], info["ScanCols"]) == (INT_PLACEHOLDER, INT_PLACEHOLDER)
    assert info["Overlap"] == FLOAT_PLACEHOLDER
    # FOVs of a stitched image: cellbin2's 2000-DNB cut at the fitted scale (0.5 px/DNB)
    assert (info["FOVWidth"], info["FOVHeight"]) == (1000, 1000)
    assert (info["ExposureTime"], info["Gain"], info["Brightness"], info["PixelSizeX"]) == (
        FLOAT_PLACEHOLDER, STR_PLACEHOLDER, INT_PLACEHOLDER, FLOAT_PLACEHOLDER)  # fmt: skip
    assert im.image_info["RGBScale"].tolist() == [INT_PLACEHOLDER] * 3
    # the file's own TIFF tags
    assert (info["Manufacture"], info["Manufacturer"], info["Model"]) == ("Zeiss", "Zeiss", "Axio Scan.Z1")
    assert info["ScanTime"] == TAGS["DateTime"]
    assert info["AppFileVer"] == STR_PLACEHOLDER  # a TIFF's Software tag names the writer, not the microscope
    d = report.as_dict()["images"][0]
    assert qc["StainType"] == "DAPI" and qc["Experimenter"] == "tech@example.org"
    assert qc["ImageQCVersion"] == f"imageqc {report.software_version}"
    assert qc["TrackLineScore"] == pytest.approx(d["track"]["score"], abs=0.05) and qc["TrackLineChannel"] == 0
    assert qc["ClarityScore"] == pytest.approx(d["clarity"]["score"], abs=0.01)
    assert qc["TemplateRecall"] == pytest.approx(d["track"]["template_recall"], abs=1e-4)
    assert qc["ClarityCutSize"][0] == qc["ClarityCutSize"][1] > 0 and qc["ClarityOverlap"] == 0
    assert qc["ClarityArr"].ndim == 2 and qc["ClarityArr"].dtype == np.int8
    assert qc["RemarkInfo"] == STR_PLACEHOLDER and qc["ChipDetectQCPassFlag"] == 0
    assert qc["ChipBBox"]["IsAvailable"] is False and qc["ChipBBox"]["LeftTop"].tolist() == [FLOAT_PLACEHOLDER] * 2
    assert (qc["ScopeStitchQCScore"], qc["ScopeStitchQCPassFlag"]) == (FLOAT_PLACEHOLDER, 0)
    st = im.stitch
    assert (st["ScopeStitch"]["GlobalWidth"], st["ScopeStitch"]["GlobalHeight"]) == (SIZE, SIZE)
    assert st["StitchingScore"] == FLOAT_PLACEHOLDER and st["StitchEval"]["MaxDeviation"] == FLOAT_PLACEHOLDER
    assert st["BGIStitch"]["StitchedGlobalLoc"].size == 0 and st["TransformTemplate"].size == 0
    reg = im.register
    assert (reg["OffsetX"], reg["XStart"], reg["Flip"], reg["MatrixShape"], reg["Method"]) == (
        FLOAT_PLACEHOLDER, INT_PLACEHOLDER, False, (), STR_PLACEHOLDER)  # fmt: skip
    assert im.tissue_seg["TissueSegScore"] == INT_PLACEHOLDER and im.cell_seg["CellMask"].size == 0
    assert im.calibration is None and rec.preview.size == 0


def test_pass_and_fail_set_the_flags_saw_checks(runs):
    good, bad = read_ipr(runs["dapi"][1]), read_ipr(runs["nolines"][1])
    assert runs["dapi"][0].verdict == "pass" and runs["nolines"][0].verdict == "fail"
    assert good.images["DAPI"].qc_info["QCPassFlag"] == 1 and good.images["DAPI"].qc_info["TrackCrossQCPassFlag"] == 1
    qc = bad.images["DAPI"].qc_info
    assert (qc["QCPassFlag"], qc["TrackCrossQCPassFlag"]) == (0, 0)
    assert qc["RemarkInfo"].startswith(f"{CHIP}: track line score")
    # the fit is written whenever one was made (as cellbin2 does); the flag says not to trust it
    assert qc["TrackLineScore"] < 60 and bad.images["DAPI"].stitch["TemplatePoint"].shape[1] == 4
    assert saw_refusals(good, f"{runs['dapi'][1].stem}.tar.gz") == ()
    assert any("SAW-A40004" in p for p in saw_refusals(bad))
    assert any("SAW-A40002" in p for p in saw_refusals(good, f"{CHIP}.tar.gz"))


def test_register_holds_the_fitted_angle_and_scale(runs):
    _, path, truth = runs["dapi"]
    reg = read_ipr(path).images["DAPI"].register
    # cellbin2's Rotation: degrees, positive clockwise on screen (y down), as qc.track.grid; ScaleX/Y: px per DNB
    assert abs(reg["Rotation"] - truth.angle_deg) < 0.05
    assert abs(reg["ScaleX"] / truth.scale[0] - 1) < 0.002 and abs(reg["ScaleY"] / truth.scale[1] - 1) < 0.002


def test_template_points_are_the_true_crossings_with_cellbin2_indices(runs):
    _, path, truth = runs["dapi"]
    tp = read_ipr(path).images["DAPI"].stitch["TemplatePoint"]
    true = _true_crossings(truth.grid, SIZE, SIZE)
    inside = true[(true[:, 0] >= 0) & (true[:, 0] <= SIZE) & (true[:, 1] >= 0) & (true[:, 1] <= SIZE)]
    assert tp.shape[1] == 4 and tp.dtype == np.float64 and abs(len(tp) - len(inside)) <= 2
    assert np.all((tp[:, 2:] >= 0) & (tp[:, 2:] <= 8))
    dist, same = _match(tp, true)
    assert dist.max() <= 2.0 and same.all()


def test_cross_points_are_measured_crossings_grouped_by_fov(runs):
    report, path, truth = runs["dapi"]
    qc = read_ipr(path).images["DAPI"].qc_info
    points = qc["CrossPoints"]
    assert set(points) <= {f"{r}_{c}" for r in range(3) for c in range(3)} and len(points) >= 8
    allp = np.concatenate(list(points.values()))
    assert allp.shape[1] == 4 and len(allp) == len(report.artifacts["track"][CHIP].crossings)
    dist, same = _match(allp, _true_crossings(truth.grid, SIZE, SIZE))
    assert dist.max() <= 2.0 and same.all()
    for key, p in points.items():  # each point lies in its 1000 px FOV cell
        r, c = map(int, key.split("_"))
        assert np.all(p[:, 0] // 1000 == c) and np.all(p[:, 1] // 1000 == r)
    assert qc["GoodFOVCount"] == sum(len(p) > 3 for p in points.values()) and qc["TotalFOVCount"] == 9


def test_dapi_mif_calibration_offsets_follow_cellbin2s_sign(runs):
    report, path, truth = runs["mif"]
    rec = read_ipr(path)
    assert set(rec.images) == {"DAPI", "CD31_IF"} and report.stain == "DAPI+mIF"
    ifg = rec.images["CD31_IF"]
    scope = ifg.calibration["Scope"]
    # cellbin2 translates the IF image by (OffsetX, OffsetY) onto DAPI: minus where its content sits
    assert abs(scope["OffsetX"] + truth.offset_px[0]) <= 1 and abs(scope["OffsetY"] + truth.offset_px[1]) <= 1
    assert ifg.calibration["CalibrationQCPassFlag"] == 1 and 0.01 <= scope["Confidence"] <= 1
    assert ifg.qc_info["QCPassFlag"] == 1 and ifg.qc_info["StainType"] == "CD31_IF"
    assert (ifg.qc_info["TrackLineScore"], ifg.register["Rotation"]) == (FLOAT_PLACEHOLDER, FLOAT_PLACEHOLDER)
    assert ifg.qc_info["TrackCrossQCPassFlag"] == 0 and ifg.stitch["TemplatePoint"].shape == (0, 4)
    assert rec.images["DAPI"].qc_passed and rec.images["DAPI"].calibration is None
    assert saw_refusals(rec) == ()


def test_tile_set_positions_nominal_and_registered(runs):
    report, path, tiles = runs["tiles"]
    im = read_ipr(path).images["DAPI"]
    info, st = im.image_info, im.stitch
    assert (info["StitchedImage"], info["ScanRows"], info["ScanCols"]) == (False, 3, 3)
    assert (info["FOVWidth"], info["FOVHeight"]) == (900, 900)
    assert info["Overlap"] == pytest.approx(0.1, abs=1e-6)
    loc = st["ScopeStitch"]["GlobalLoc"]
    assert loc.shape == (3, 3, 2) and loc.dtype == np.int64
    assert loc[1, 2].tolist() == [2 * tiles.step_x, tiles.step_y]  # nominal (microscope) positions, x then y
    reg = st["BGIStitch"]["StitchedGlobalLoc"]
    true = np.array([[tiles.true_positions[tiles.tile(r, c).name] for c in range(3)] for r in range(3)])
    diff = reg - true
    assert reg.min(axis=(0, 1)).tolist() == [0, 0]
    assert np.ptp(diff[..., 0]) <= 2 and np.ptp(diff[..., 1]) <= 2  # registered = truth up to one shift
    result = report.artifacts["stitching"][CHIP]
    ev = st["StitchEval"]
    assert ev["MaxDeviation"] == pytest.approx(result.max_deviation_px)
    assert ev["StitchEvalH"].shape == ev["StitchEvalV"].shape == ev["GlobalDeviation"].shape == (3, 3)
    assert ev["StitchEvalH"][0, 2] == FLOAT_PLACEHOLDER and ev["StitchEvalV"][2, 0] == FLOAT_PLACEHOLDER
    assert st["StitchingScore"] == pytest.approx(result.score)
    assert im.qc_info["ScopeStitchQCPassFlag"] == int(result.passed)
    assert im.qc_info["TotalFOVCount"] == 9 and set(im.cross_points) <= {f"{r}_{c}" for r in range(3) for c in range(3)}
    assert (st["BGIStitch"]["StitchedGlobalWidth"], st["BGIStitch"]["StitchedGlobalHeight"]) == tuple(
        int(v) for v in reg.max(axis=(0, 1)) + 900)  # fmt: skip


def test_the_report_carries_each_fovs_registered_position_as_the_ipr_does(runs):
    report, path, tiles = runs["tiles"]
    (img,) = [i for i in report.as_dict()["images"] if i["stitching"]]
    fovs = img["stitching"]["fovs"]
    assert len(fovs) == 9 and {(f["row"], f["col"]) for f in fovs} == {(t.row, t.col) for t in tiles.tiles}
    reg = np.array([f["registered"] for f in fovs])
    loc = read_ipr(path).images["DAPI"].stitch["BGIStitch"]["StitchedGlobalLoc"]
    assert np.abs(np.array([loc[f["row"], f["col"]] for f in fovs]) - (reg - reg.min(axis=0))).max() <= 0.5 + 1e-6
    for f in fovs:
        t = tiles.tile(f["row"], f["col"])
        assert f["nominal"] == [t.x, t.y]
        assert f["stage_deviation_px"] is not None and f["stage_deviation_px"] >= 0
    assert img["stitching"]["off_nominal"] == [] and img["stitching"]["max_stage_deviation_px"] >= 0


@pytest.mark.parametrize("key", ["dapi", "tiles", "mif"])
def test_both_spellings_where_spec_and_cellbin2_differ(runs, key):
    _, path, _ = runs[key]
    with h5py.File(path, "r") as f:
        for group in (g for g in f if g not in ("Preview", "ManualState", "StereoResepSwitch")):
            for sub, spec, other in SPELLINGS:
                g = f[f"{group}/{sub}"]
                if spec in g.attrs:
                    assert other in g.attrs and g.attrs[spec] == g.attrs[other], (group, spec)
                else:
                    assert np.array_equal(g[spec][()], g[other][()]), (group, spec)
        qc = f["DAPI/QCInfo"].attrs
        assert qc["GoodFOVCount"] == qc["GoodFovCount"] > 0


def test_no_lzf_anywhere(runs):
    compressed = 0
    for _, path, _ in runs.values():
        with h5py.File(path, "r") as f:
            datasets = []
            f.visititems(
                lambda name, obj, datasets=datasets: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None
            )
            assert all(d.compression in (None, "gzip") for d in datasets)
            compressed += sum(d.compression == "gzip" for d in datasets)
    assert compressed > 0


def test_damaged_files_raise_ipr_error_naming_what(runs, tmp_path):
    src = runs["dapi"][1]
    truncated = tmp_path / "truncated.ipr"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(IPRError) as e:
        read_ipr(truncated)
    assert e.value.where == "the file" and "HDF5" in str(e.value)
    missing = tmp_path / "missing_group.ipr"
    shutil.copy(src, missing)
    with h5py.File(missing, "a") as f:
        del f["DAPI/QCInfo"]
    with pytest.raises(IPRError, match="DAPI/QCInfo: group is missing") as e:
        read_ipr(missing)
    assert e.value.path == missing
    no_flag = tmp_path / "no_flag.ipr"
    shutil.copy(src, no_flag)
    with h5py.File(no_flag, "a") as f:
        del f["DAPI/QCInfo"].attrs["QCPassFlag"]
        del f.attrs["IPRVersion"]
    with pytest.raises(IPRError, match="IPRVersion: attribute is missing"):
        read_ipr(no_flag)
    with h5py.File(no_flag, "a") as f:
        f.attrs["IPRVersion"] = "0.1.0"
    with pytest.raises(IPRError, match="DAPI/QCInfo/QCPassFlag: attribute is missing"):
        read_ipr(no_flag)
    text = tmp_path / "notes.ipr"
    text.write_text("not an ipr")
    with pytest.raises(IPRError, match="not a readable HDF5 file"):
        read_ipr(text)
    with pytest.raises(IPRError, match="does not exist"):
        read_ipr(tmp_path / "absent.ipr")
    old = tmp_path / "old.ipr"
    shutil.copy(src, old)
    with h5py.File(old, "a") as f:
        f.attrs["IPRVersion"] = "0.1.0"
    assert any("SAW-A40001" in p for p in saw_refusals(read_ipr(old)))


def test_write_arguments_and_naming(runs, tmp_path):
    report, _, _ = runs["nolines"]
    with open_scan_set(sorted((runs["nolines"][1].parents[2] / "nolines").iterdir())) as scan:
        named = write_ipr(report, scan, tmp_path / "a" / "run.ipr", qc_result_file=f"{CHIP}_SC_20240506_070809_0.1.0")
        folder = write_ipr(report, scan, tmp_path / "b")
        for bad in ("../x", "x.tar.gz", "", "a/b"):
            with pytest.raises(ValueError, match="qc_result_file"):
                write_ipr(report, scan, tmp_path / "c", qc_result_file=bad)
        with pytest.raises(ValueError, match=r"must end in \.ipr"):
            write_ipr(report, scan, tmp_path / "c.h5")
        with pytest.raises(ValueError, match="chip"):
            write_ipr(report, ScanSet(chip="C02533C1", images=list(scan.images)), tmp_path / "d")
    assert read_ipr(named).images["DAPI"].image_info["QCResultFile"] == f"{CHIP}_SC_20240506_070809_0.1.0"
    assert folder == tmp_path / "b" / f"{default_qc_result_file(report)}.ipr"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["a", "b", "run.ipr", folder.name])


def test_report_alone_and_czi_metadata(shared_data, tmp_path):
    """No artifacts (a report read back from JSON): scalars from the blocks, empty point sets; CZI facts."""
    img = open_image(shared_data / "czi" / "mosaic_test.czi", name=CHIP, role="nuclear")
    with img:
        im = ImageReport(name=CHIP, role="nuclear", format="czi", width=img.width, height=img.height, dtype="uint16",
                         fov_grid=img.fov_grid, channels=tuple(img.channels), pixel_size_um=img.pixel_size_um,
                         track={"score": 12.5, "passed": False, "angle_deg": 0.3, "scale": [1.0, None]})  # fmt: skip
        report = QCReport(chip=CHIP, stain="ssDNA", verdict="fail", reasons=(f"{CHIP}: track line score 12 < 60",),
                          images=(im,), duration_s=1.0, software_version="0.1.0",
                          started_at=1_700_000_000.0)  # fmt: skip
        path = write_ipr(report, ScanSet(CHIP, [img]), tmp_path)
    rec = read_ipr(path)
    g = rec.images["ssDNA"]
    info = g.image_info
    assert (info["Model"], info["ScanObjective"]) == ("Axio Observer.Z1 / 7", 10.0)
    assert info["ScanTime"] == "2019-12-07T00:34:54.3773097Z" and info["AppFileVer"].startswith("ZEN 2.6")
    assert info["Manufacture"] == STR_PLACEHOLDER  # the file names no maker: never guessed
    assert info["PixelSizeX"] == pytest.approx(1.083, abs=1e-3) and info["BitDepth"] == 16
    assert (info["StitchedImage"], info["ScanRows"], info["ScanCols"]) == (False, 1, 2)
    assert g.register["Rotation"] == 0.3 and g.register["ScaleY"] == FLOAT_PLACEHOLDER
    assert g.qc_info["TrackLineScore"] == 12.5 and g.qc_info["QCPassFlag"] == 0
    assert g.stitch["TemplatePoint"].shape == (0, 4) and g.qc_info["CrossPoints"] == {}
    assert g.stitch["ScopeStitch"]["GlobalLoc"].shape == (1, 2, 2)
    assert g.stitch["BGIStitch"]["StitchedGlobalLoc"].size == 0
    assert path.name == f"{CHIP}_20231114_221320_0.1.0.ipr"


def test_group_names_follow_saw():
    assert ipr_group_name(CHIP, f"{CHIP}_CD31_IF", "DAPI+mIF") == "CD31_IF"
    assert ipr_group_name(CHIP, CHIP, "DAPI+mIF") == "DAPI"
    assert ipr_group_name(CHIP, CHIP, "ssDNA") == "ssDNA"
    assert ipr_group_name(CHIP, CHIP, "HE") == "HE"
    assert ipr_group_name(CHIP, "CD8-a_IF", "DAPI+mIF") == "CD8-a_IF"
    assert len(template_for(CHIP).offsets) == 9  # CrossPoints/TemplatePoint indices are k mod 9
