"""open_image / open_scan_set: detection by content, names, roles, scan-set checks."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from qc.errors import CorruptImageError, ReadError, ScanSetError, UnsupportedFormatError
from qc.io import default_name, detect_format, open_image, open_scan_set

CHIP = "SS200000135TL_D1"


def tif(path, shape=(20, 30), rgb=False):
    arr = np.zeros(shape + ((3,) if rgb else ()), np.uint8)
    tifffile.imwrite(path, arr, photometric="rgb" if rgb else "minisblack")
    return path


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("A.tif", "A"),
        ("A.TIFF", "A"),
        ("A.ome.tif", "A"),
        ("A.Czi", "A"),
        ("A_GFP_IF", "A_GFP_IF"),
        ("A.tar.gz", "A"),
        ("A.v2.tif", "A.v2"),
    ],
)
def test_default_name(name, stem):
    assert default_name(name) == stem


def test_detection_by_content_not_extension(tmp_path, shared_data):
    renamed = tif(tmp_path / f"{CHIP}.dat")
    assert detect_format(renamed) == "tiff"
    with open_image(renamed) as img:
        assert img.format == "tiff"
    czi_as_tif = tmp_path / "x.tif"
    czi_as_tif.write_bytes((shared_data / "czi" / "DAPI_GFP.czi").read_bytes())
    with open_image(czi_as_tif) as img:
        assert img.format == "czi" and img.name == "x"
    assert detect_format(tmp_path) == "tiles"


def test_detection_errors(tmp_path):
    empty = tmp_path / "e.tif"
    empty.write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty"):
        open_image(empty)
    garbage_tif = tmp_path / "g.tif"
    garbage_tif.write_bytes(b"hello world, not an image")
    with pytest.raises(CorruptImageError, match="does not start with a TIFF header"):
        open_image(garbage_tif)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UnsupportedFormatError, match=r"notes.txt"):
        open_image(text)
    with pytest.raises(ReadError, match="no such file"):
        open_image(tmp_path / "missing.tif")


@pytest.mark.parametrize(
    ("head", "what"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "a PNG image"),
        (b"\x89HDF\r\n\x1a\n\x00", "an HDF5 file"),
    ],
)
def test_a_file_of_another_format_is_named_by_what_it_is(tmp_path, head, what):
    """#15: a JPEG named .tif was described by its raw first bytes."""
    for name, said in (
        ("A02677B5.tif", f"the name says TIFF but the file is {what}"),
        ("A02677B5.jpg", f"the file is {what}"),
    ):
        path = tmp_path / name
        path.write_bytes(head + bytes(64))
        with pytest.raises(UnsupportedFormatError) as err:
            open_image(path)
        assert said in str(err.value) and "\\x" not in str(err.value) and "Export the scan" in str(err.value)


def test_roles_and_overrides(tmp_path):
    with open_image(tif(tmp_path / f"{CHIP}.tif")) as a:
        assert a.role == "nuclear"
    with open_image(tif(tmp_path / f"{CHIP}_CD31_IF.tif")) as b:
        assert b.role == "IF"
    with open_image(tif(tmp_path / "he.tif", rgb=True)) as c:
        assert c.role == "HE"
    with open_image(tif(tmp_path / "y.tif"), name="chip", role="IF") as d:
        assert (d.name, d.role) == ("chip", "IF")


def test_scan_set_chip_and_members(tmp_path, shared_data):
    paths = [tif(tmp_path / f"{CHIP}.tif"), tif(tmp_path / f"{CHIP}_CD31_IF.tif"), shared_data / "tiles" / "stitch2d"]
    with pytest.raises(ScanSetError, match="stitch2d do not belong to chip"):
        open_scan_set(paths)
    with open_scan_set(paths[:2]) as scan:
        assert scan.chip == CHIP
        assert scan.nuclear.name == CHIP and [im.name for im in scan.if_images] == [f"{CHIP}_CD31_IF"]
    with open_scan_set([paths[1]]) as scan:
        assert scan.chip == CHIP and scan.nuclear is None
    with open_scan_set(paths, chip="X") as scan:
        assert scan.chip == "X" and len(scan.images) == 3
    with pytest.raises(ScanSetError, match="more than once"):
        open_scan_set([paths[0], paths[0]])
    with pytest.raises(ScanSetError, match="no images"):
        open_scan_set([])
