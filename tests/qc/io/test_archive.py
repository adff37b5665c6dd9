"""QC output archives: reading the images inside, and refusing unsafe members."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from qc.errors import CorruptImageError, ScanSetError, UnsafeArchiveError
from qc.io import archive, open_image, open_scan_set
from tests.qc.io.helpers import write_czi

RNG = np.random.default_rng(11)
CHIP = "SS200000135TL_D1"


def tif_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="zlib")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def qc_archive(tmp_path):
    nuclear = RNG.integers(0, 65535, (90, 120), dtype=np.uint16)
    tiles = {(r, c): RNG.integers(0, 255, (30, 40), dtype=np.uint8) for r in range(2) for c in range(2)}
    czi = write_czi(tmp_path / "src.czi", [(RNG.integers(0, 255, (20, 30), dtype=np.uint8), 0, 0, 0, 0)])
    path = tmp_path / f"{CHIP}.tar.gz"
    report = {
        "schema": "imageqc.report/1",
        "chip": CHIP,
        "images": [{"name": f"{CHIP}_GFP_IF", "role": "IF"}, {"name": CHIP, "role": "nuclear"}],
    }
    with tarfile.open(path, "w:gz") as tar:
        add(tar, f"{CHIP}/report.json", json.dumps(report).encode())
        add(tar, f"{CHIP}/pictures/track.png", b"\x89PNG\r\n\x1a\n")
        add(tar, f"{CHIP}/images/{CHIP}.tif", tif_bytes(nuclear))
        for (r, c), arr in tiles.items():
            add(tar, f"{CHIP}/images/{CHIP}_GFP_IF/t_{r:04d}_{c:04d}_.tif", tif_bytes(arr))
        add(tar, f"{CHIP}/images/{CHIP}_CD31_IF.czi", czi.read_bytes())
    return path, nuclear, tiles


def temp_dirs(where: Path | None = None) -> set[Path]:
    return set(Path(where or tempfile.gettempdir()).glob(f"{archive.SPILL_PREFIX}-*"))


def test_scan_set_from_archive(qc_archive, tmp_path):
    path, nuclear, tiles = qc_archive
    scratch = tmp_path / "scratch"
    before = temp_dirs()
    with open_scan_set(path, scratch_dir=scratch) as scan:
        assert scan.chip == CHIP
        by_name = {im.name: im for im in scan.images}
        assert set(by_name) == {CHIP, f"{CHIP}_GFP_IF", f"{CHIP}_CD31_IF"}
        nuc = scan.nuclear
        assert nuc.name == CHIP and nuc.format == "tar.gz" and nuc.member_format == "tiff"
        assert nuc.path == path / f"{CHIP}/images/{CHIP}.tif"
        np.testing.assert_array_equal(nuc.plane(), nuclear)
        gfp = by_name[f"{CHIP}_GFP_IF"]
        assert gfp.role == "IF" and gfp.member_format == "tiles" and gfp.fov_grid == (2, 2)
        np.testing.assert_array_equal({(t.row, t.col): t for t in gfp.tiles}[(1, 0)].read(), tiles[(1, 0)])
        assert by_name[f"{CHIP}_CD31_IF"].member_format == "czi"
        assert len(temp_dirs(scratch)) == 2  # the tile folder and the CZI are spilled there; the TIFF is in memory
    assert temp_dirs(scratch) == set() and temp_dirs() == before  # removed; nothing in the system's temp folder


def test_large_members_are_spilled_and_removed(qc_archive, monkeypatch):
    path, nuclear, _ = qc_archive
    monkeypatch.setattr(archive, "IN_MEMORY_BYTES", 10)
    before = temp_dirs()
    img = open_image(path, name=CHIP)  # no scratch_dir: the system's temporary folder
    assert len(temp_dirs() - before) == 1
    np.testing.assert_array_equal(img.plane(), nuclear)
    img.close()
    assert temp_dirs() - before == set()


def test_open_image_needs_a_name_for_several_images(qc_archive):
    path, _, _ = qc_archive
    with pytest.raises(ScanSetError, match="pass name="):
        open_image(path)


def unsafe_archive(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, f"{CHIP}/report.json", b"{}")
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = size
    return info


@pytest.mark.parametrize(
    ("info", "data", "match"),
    [
        (member("/etc/passwd", size=3), b"abc", "absolute"),
        (member(f"{CHIP}/../../evil.tif", size=3), b"abc", r"'\.\.'"),
        (member("C:/Windows/evil.tif", size=3), b"abc", "absolute"),
        (member(f"{CHIP}/images/x.tif", tarfile.SYMTYPE, "/etc/passwd"), b"", "outside"),
        (member(f"{CHIP}/images/y.tif", tarfile.SYMTYPE, "../../../etc/passwd"), b"", "outside"),
        (member(f"{CHIP}/images/z.tif", tarfile.LNKTYPE, "../outside.tif"), b"", "outside"),
        (member(f"{CHIP}/images/dev", tarfile.CHRTYPE), b"", "device"),
        (member(f"{CHIP}/images/fifo", tarfile.FIFOTYPE), b"", "device or FIFO"),
    ],
)
def test_unsafe_members_are_refused(tmp_path, info, data, match):
    path = unsafe_archive(tmp_path, info, data)
    with pytest.raises(UnsafeArchiveError, match=match):
        open_scan_set(path)


def test_link_inside_the_archive_is_allowed(tmp_path):
    path = tmp_path / f"{CHIP}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, f"{CHIP}/report.json", json.dumps({"chip": CHIP}).encode())
        add(tar, f"{CHIP}/pictures/a.png", b"png")
        tar.addfile(member(f"{CHIP}/pictures/b.png", tarfile.SYMTYPE, "a.png"))
        add(tar, f"{CHIP}/images/{CHIP}.tif", tif_bytes(np.zeros((8, 8), np.uint8)))
    with open_scan_set(path) as scan:
        assert scan.chip == CHIP and len(scan.images) == 1


def test_truncated_archive_is_corrupt(qc_archive):
    path, _, _ = qc_archive
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match=path.name):
        open_scan_set(path)


def test_a_member_name_too_long_for_the_file_system_is_spilled_under_a_shortened_name(tmp_path):
    """Issue #20 case 9: an archive member is spilled under a name the file system takes (here 300 bytes)."""
    czi = write_czi(tmp_path / "src.czi", [(RNG.integers(0, 255, (20, 30), dtype=np.uint8), 0, 0, 0, 0)])
    long_name = f"{CHIP}_{'CD31-' * 56}_IF"
    assert len(long_name) > 290
    path = tmp_path / f"{CHIP}.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        add(tar, f"{CHIP}/images/{long_name}.czi", czi.read_bytes())  # a CZI is always spilled (libCZI needs a path)
    with open_image(path, scratch_dir=tmp_path / "scratch") as img:
        assert img.name == long_name and img.member_format == "czi"
        spilled = [p.name for p in (tmp_path / "scratch").rglob("*.czi")]
        assert len(spilled) == 1 and len(spilled[0].encode()) == 255 and spilled[0].startswith(f"{CHIP}_CD31-")
