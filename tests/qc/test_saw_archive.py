"""The archive SAW takes (issue #13): SAW's layout, named as its IPR's QCResultFile, read back for re-QC."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import h5py
import pytest
import tifffile

from qc.errors import UnsafeArchiveError
from qc.io import open_scan_set
from qc.ipr import IPRError, read_ipr
from qc.pipeline import QCSettings, run_qc, write_run_outputs
from qc.stitching import MemoryPairCache
from qc.testing.chips import generate_chip, generate_if
from qc.testing.tiles import make_tile_set, write_tile_folder

CHIP = "SS200000135TL_D1"
GEOM = {"width": 2500, "height": 2500, "scale": (0.6, 0.6), "angle_deg": 1.2}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mif_set(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("mif")
    dapi = generate_chip(data_dir=shared_data, seed=41, **GEOM)
    tifffile.imwrite(root / f"{CHIP}.tif", dapi.image)
    tifffile.imwrite(
        root / f"{CHIP}_CD31_IF.tiff", generate_if(dapi.truth, offset_px=(9, -5), data_dir=shared_data).image
    )
    return root


def _qc(paths, out, cache=None):
    with open_scan_set(paths) as scan:
        report = run_qc(scan, QCSettings(), cache)
        written = write_run_outputs(report, out, scan_set=scan)
    return report, written


def _ipr_from(archive: Path, tmp: Path) -> tuple[list[str], Path]:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        ipr = tmp / names[0]
        ipr.write_bytes(tar.extractfile(names[0]).read())
    return names, ipr


def test_dapi_mif_archive_is_what_saw_takes(mif_set, tmp_path):
    before = {p.name: _digest(p) for p in mif_set.iterdir()}
    report, out = _qc(sorted(mif_set.iterdir()), tmp_path / "out")
    assert report.verdict == "pass", report.reasons
    stem = out.folder.name
    assert out.archive.name == f"{stem}.tar.gz"
    names, ipr = _ipr_from(out.archive, tmp_path)
    # the IPR at the root, named as the archive; images as cellbin2 lays them out
    assert names[0] == f"{stem}.ipr"
    assert f"DAPI/{CHIP}_DAPI.tif" in names
    assert f"IF/CD31_IF/{CHIP}_CD31_IF.tif" in names
    assert {"imageqc/report.json", f"imageqc/pictures/{CHIP}_track.png", f"imageqc/{stem}.ipr"} - set(names) == {
        f"imageqc/{stem}.ipr"
    }
    # the images go in unchanged, and the microscope's files are untouched
    with tarfile.open(out.archive) as tar:
        stored = hashlib.sha256(tar.extractfile(f"IF/CD31_IF/{CHIP}_CD31_IF.tif").read()).hexdigest()
    assert stored == before[f"{CHIP}_CD31_IF.tiff"]
    assert {p.name: _digest(p) for p in mif_set.iterdir()} == before
    # the IPR names the archive and carries the verdict and the calibration
    rec = read_ipr(ipr)
    assert set(rec.images) == {"DAPI", "CD31_IF"}
    assert all(im.image_info["QCResultFile"] == stem for im in rec.images.values())
    assert rec.images["DAPI"].qc_passed
    scope = rec.images["CD31_IF"].calibration["Scope"]
    assert abs(scope["OffsetX"] + 9) <= 1 and abs(scope["OffsetY"] - 5) <= 1  # cellbin2: the shift moving IF onto DAPI
    with h5py.File(ipr) as f:  # SAW's reader needs no filter beyond gzip
        f.visititems(
            lambda _n, obj: isinstance(obj, h5py.Dataset) and obj.compression not in (None, "gzip") and pytest.fail(_n)
        )


def test_a_failing_chip_gets_qc_pass_flag_0(shared_data, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / f"{CHIP}.tif", generate_chip(data_dir=shared_data, seed=42, lines=False, **GEOM).image)
    report, out = _qc([src / f"{CHIP}.tif"], tmp_path / "out")
    assert report.verdict == "fail"
    _, ipr = _ipr_from(out.archive, tmp_path)
    assert read_ipr(ipr).images["DAPI"].qc_info["QCPassFlag"] == 0


def test_a_tile_set_goes_in_with_its_tiles_and_is_read_back(shared_data, tmp_path):
    texture = generate_chip(data_dir=shared_data, seed=43, **GEOM).image
    tiles = make_tile_set(texture, rows=2, cols=3, tile_size=700, overlap=0.1, jitter_px=2, seed=5)
    folder = write_tile_folder(tiles, tmp_path / "in" / CHIP)
    report, out = _qc([folder], tmp_path / "out", MemoryPairCache())
    with tarfile.open(out.archive) as tar:
        stored = sorted(n for n in tar.getnames() if n.startswith("DAPI/"))
    assert stored == sorted(f"DAPI/{CHIP}/{p.name}" for p in folder.iterdir())
    # re-QC of the archive: the same tiles, the same roles
    with open_scan_set([out.archive]) as again:
        assert again.chip == CHIP
        (img,) = again.images
        assert img.role == "nuclear" and img.fov_grid == (2, 3)
    assert report.as_dict()["images"][0]["fov_grid"] == [2, 3]


def test_the_archive_is_read_back_for_re_qc_with_roles_from_the_ipr(mif_set, tmp_path):
    first, out = _qc(sorted(mif_set.iterdir()), tmp_path / "out")
    with open_scan_set([out.archive]) as scan:
        assert scan.chip == CHIP
        roles = {img.name: img.role for img in scan.images}
        assert roles == {CHIP: "nuclear", f"{CHIP}_CD31_IF": "IF"}
        again = run_qc(scan, QCSettings())
        rewritten = write_run_outputs(again, tmp_path / "re", scan_set=scan)
    assert again.verdict == first.verdict == "pass"
    with tarfile.open(rewritten.archive) as tar:
        assert f"IF/CD31_IF/{CHIP}_CD31_IF.tif" in tar.getnames()


def _archive_with(tmp: Path, name: str, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    path = tmp / name
    with tarfile.open(path, "w:gz") as tar:
        for n, data in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for n, target in (links or {}).items():
            info = tarfile.TarInfo(n)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_a_damaged_ipr_is_named_and_nothing_is_modified(mif_set, tmp_path):
    _, out = _qc(sorted(mif_set.iterdir()), tmp_path / "out")
    with tarfile.open(out.archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    ipr_name = next(iter(members))
    # the IPR without DAPI/QCInfo's QCPassFlag
    good = tmp_path / "good.ipr"
    good.write_bytes(members[ipr_name])
    with h5py.File(good, "r+") as f:
        del f["DAPI/QCInfo"].attrs["QCPassFlag"]
    bad = _archive_with(tmp_path, f"{CHIP}_20240101_000000_0.1.0.tar.gz", {**members, ipr_name: good.read_bytes()})
    before = _digest(bad)
    with pytest.raises(IPRError) as err:
        open_scan_set([bad])
    assert "DAPI/QCInfo" in str(err.value) and "QCPassFlag" in str(err.value) and bad.name in str(err.value)
    # a truncated IPR: not HDF5 any more
    cut = _archive_with(
        tmp_path, f"{CHIP}_20240101_000001_0.1.0.tar.gz", {**members, ipr_name: members[ipr_name][:2000]}
    )
    with pytest.raises(IPRError, match="HDF5"):
        open_scan_set([cut])
    assert _digest(bad) == before


def test_hostile_members_beside_an_ipr_are_still_refused(mif_set, tmp_path):
    _, out = _qc(sorted(mif_set.iterdir()), tmp_path / "out")
    with tarfile.open(out.archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    escape = _archive_with(tmp_path, "a.tar.gz", {**members, "DAPI/../../evil.tif": b"x"})
    with pytest.raises(UnsafeArchiveError):
        open_scan_set([escape])
    linked = _archive_with(tmp_path, "b.tar.gz", members, links={"DAPI/link.tif": "/etc/passwd"})
    with pytest.raises(UnsafeArchiveError):
        open_scan_set([linked])
    assert not (tmp_path.parent / "evil.tif").exists()


def test_include_images_false_keeps_the_ipr_and_report_only(mif_set, tmp_path):
    with open_scan_set(sorted(mif_set.iterdir())) as scan:
        report = run_qc(scan, QCSettings())
        out = write_run_outputs(report, tmp_path, scan_set=scan, include_images=False)
    with tarfile.open(out.archive) as tar:
        names = tar.getnames()
    assert names[0] == f"{out.folder.name}.ipr" and not any(n.endswith(".tif") for n in names)


@pytest.mark.parametrize("level", [0, 1, 3])
def test_every_archive_level_is_a_gzip_tar_with_the_images_unchanged(mif_set, tmp_path, level):
    """Level 0 (the default) stores the images in deflate's stored blocks: any gzip reader opens it."""
    import gzip

    src = mif_set / f"{CHIP}.tif"
    with open_scan_set(sorted(mif_set.iterdir())) as scan:
        report = run_qc(scan, QCSettings())
        out = write_run_outputs(report, tmp_path, scan_set=scan, level=level)
    with gzip.open(out.archive) as gz:  # the stream itself, CRC and length checked by the reader
        raw = gz.read()
    assert len(raw) % 512 == 0
    with tarfile.open(out.archive, "r:gz") as tar:
        assert tar.extractfile(f"DAPI/{CHIP}_DAPI.tif").read() == src.read_bytes()
    if level == 0:
        assert out.archive.stat().st_size > src.stat().st_size  # stored, not compressed


def test_the_verdict_is_handed_over_before_what_saw_needs_is_written(mif_set, tmp_path):
    """``on_verdict`` sees report.json and the pictures in place, and neither the IPR nor the archive yet."""
    seen = {}

    def verdict(written):
        folder = written.folder
        seen["report"] = json.loads((folder / "report.json").read_text(encoding="utf-8"))["verdict"]
        seen["summary"] = (folder / "pictures" / f"{CHIP}_summary.png").is_file()
        seen["in_folder"] = sorted(p.name for p in folder.iterdir())
        seen["beside"] = sorted(p.name for p in folder.parent.iterdir())
        seen["archive"] = written.archive

    with open_scan_set(sorted(mif_set.iterdir())) as scan:
        report = run_qc(scan, QCSettings())
        out = write_run_outputs(report, tmp_path / "out", scan_set=scan, on_verdict=verdict)
    stem = out.folder.name
    assert seen["report"] == report.verdict and seen["summary"] and seen["archive"] is None
    assert f"{stem}.ipr" not in seen["in_folder"] and seen["beside"] == [stem]
    assert (out.folder / f"{stem}.ipr").is_file() and out.archive.is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [stem, f"{stem}.tar.gz"]
