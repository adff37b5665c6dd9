"""Tile-name parsing and grid completeness (names and metadata only, no pixels)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qc.io.tilenames import inspect_tile_folder, parse_tile_name, read_tile_configuration, snake_to_grid
from tests.helpers import scaled

CONVENTIONS = ["motic", "go_optical", "rowcol", "grid_at", "leica_stage", "leica_snake", "custom"]


@pytest.mark.parametrize(
    ("name", "convention", "expected"),
    [
        ("SS2_0003_0012_DAPI.tif", "rowcol", (3, 12, None)),
        ("img_0000_0001.jpg", "motic", (0, 1, None)),
        ("stitch2d_ex[Grid@1 2].jpg", "grid_at", (2, 1, None)),
        ("TileScan 1--Stage07--Z00--C00.tif", "leica_stage", (-1, -1, 7)),
        ("TileScan_001_s13_z0_ch00.tif", "leica_snake", (-1, -1, 13)),
        ("notes.txt", "rowcol", None),
        ("img_03_12.tif", "rowcol", None),  # 4 digits required
    ],
)
def test_parse_known_names(name, convention, expected):
    parsed = parse_tile_name(name, convention)
    if expected is None:
        assert parsed is None
    else:
        assert (parsed.row, parsed.col, parsed.index) == expected


def test_custom_pattern():
    parsed = parse_tile_name("scan-r5-c7.png", "custom", pattern=r"r(?P<row>\d+)-c(?P<col>\d+)")
    assert (parsed.row, parsed.col) == (5, 7)
    assert parse_tile_name("x", "custom", pattern=r"(?P<row>[") is None  # a broken pattern is no match


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=80), convention=st.sampled_from(CONVENTIONS))
def test_parser_never_raises(name, convention):
    parsed = parse_tile_name(name, convention, pattern=r"(?P<row>\d+)x(?P<col>\d+)")
    if parsed is not None:
        assert parsed.index is not None or (parsed.row >= 0 and parsed.col >= 0)


@settings(max_examples=100, deadline=None)
@given(row=st.integers(0, 9999), col=st.integers(0, 9999), prefix=st.from_regex(r"[A-Za-z0-9]{0,8}", fullmatch=True))
def test_rowcol_roundtrip(row, col, prefix):
    parsed = parse_tile_name(f"{prefix}_{row:04d}_{col:04d}_x.tif", "rowcol")
    assert (parsed.row, parsed.col) == (row, col)


def test_snake_order():
    assert [snake_to_grid(i, 3) for i in range(7)] == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0), (2, 0)]


def touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")
    return folder


def test_go_optical_complete_and_missing(tmp_path):
    names = [f"SS2_{r:04d}_{c:04d}_DAPI.tif" for r in range(3) for c in range(4)]
    folder = touch(tmp_path / "SS200000135TL_D1", names)
    (folder / "info.json").write_text(json.dumps({"scan": {"rows": 3, "cols": 4, "overlap": 0.12}}))
    info = inspect_tile_folder(folder)
    assert info.convention == "go_optical" and info.complete
    assert (info.rows, info.cols, info.overlap) == (3, 4, 0.12)
    assert info.metadata_file.name == "info.json"
    (folder / names[5]).unlink()
    (folder / names[11]).unlink()  # the last cell: only the metadata knows it is missing
    info = inspect_tile_folder(folder)
    assert not info.complete and info.missing == ((1, 1), (2, 3))
    assert (info.rows, info.cols) == (3, 4)


def test_motic_ini_without_sections_and_percent_overlap(tmp_path):
    folder = touch(tmp_path / "m", [f"Motic_{r:04d}_{c:04d}_.jpg" for r in range(2) for c in range(2)])
    (folder / "1.ini").write_text("Rows=2\nCols=3\nOverlap=15%\n")
    info = inspect_tile_folder(folder)
    assert info.convention == "motic"
    assert (info.rows, info.cols, info.overlap) == (2, 3, 0.15)
    assert info.missing == ((0, 2), (1, 2))


def test_one_based_names_are_shifted(tmp_path):
    folder = touch(tmp_path / "f", [f"t_{r:04d}_{c:04d}_.tif" for r in range(1, 3) for c in range(1, 4)])
    info = inspect_tile_folder(folder)
    assert (info.rows, info.cols) == (2, 3) and info.complete


def test_duplicates_and_ignored(tmp_path):
    folder = touch(tmp_path / "d", ["a_0000_0000_.tif", "b_0000_0000_.tif", "a_0000_0001_.tif", "overview.tif"])
    info = inspect_tile_folder(folder)
    assert info.duplicates == ((0, 0),) and not info.complete
    assert info.ignored == ("overview.tif",)


def test_leica_snake_with_xml_and_guess(tmp_path):
    folder = touch(tmp_path / "leica", [f"TileScan_001_s{i:02d}_ch00.tif" for i in range(6)])
    info = inspect_tile_folder(folder)
    assert info.convention == "leica_snake" and info.cols_guessed and (info.rows, info.cols) == (2, 3)
    meta = folder / "MetaData"
    meta.mkdir()
    tiles = "".join(f'<Tile FieldX="{c}" FieldY="{r}" />' for r in range(3) for c in range(2))
    (meta / "TileScan_001.xml").write_text(f"<Data><Attachment>{tiles}</Attachment></Data>")
    info = inspect_tile_folder(folder)
    assert not info.cols_guessed and (info.rows, info.cols) == (3, 2)
    cells = {t.file: (t.row, t.col) for t in info.tiles}
    assert cells["TileScan_001_s02_ch00.tif"] == (1, 1) and cells["TileScan_001_s03_ch00.tif"] == (1, 0)


def test_leica_stage_row_major(tmp_path):
    folder = touch(tmp_path / "stage", [f"TileScan 1--Stage{i:02d}--Z00--C00.tif" for i in range(6)])
    info = inspect_tile_folder(folder, cols=2)
    assert info.convention == "leica_stage" and (info.rows, info.cols) == (3, 2)
    cells = {t.index: (t.row, t.col) for t in info.tiles}
    assert cells[3] == (1, 1) and cells[4] == (2, 0)


def test_custom_pattern_folder_and_tile_configuration(tmp_path):
    folder = touch(tmp_path / "c", [f"fov-r{r}-c{c}.png" for r in range(2) for c in range(2)])
    (folder / "TileConfiguration.txt").write_text(
        "# Define the number of dimensions we are working on\ndim = 2\n\n# Define the image coordinates\n"
        + "".join(f"fov-r{r}-c{c}.png; ; ({c * 90.5}, {r * 80.0})\n" for r in range(2) for c in range(2))
    )
    info = inspect_tile_folder(folder, pattern=r"-r(?P<row>\d+)-c(?P<col>\d+)")
    assert info.convention == "custom" and info.complete
    assert info.tile_configuration.name == "TileConfiguration.txt"
    assert read_tile_configuration(info.tile_configuration)["fov-r1-c1.png"] == (90.5, 80.0)


def test_no_convention(tmp_path):
    info = inspect_tile_folder(touch(tmp_path / "n", ["a.tif", "b.tif"]))
    assert info.convention is None and not info.complete and info.ignored == ("a.tif", "b.tif")


def test_stitch2d_real_names(shared_data):
    info = inspect_tile_folder(shared_data / "tiles" / "stitch2d")
    assert info.convention == "grid_at" and (info.rows, info.cols) == (3, 2) and info.complete
    cells = {t.file: (t.row, t.col) for t in info.tiles}
    assert cells["stitch2d_ex[Grid@1 2].jpg"] == (2, 1)


def test_tile_configuration_positions_any_names(tmp_path):
    names = ["scan A.tif", "7.tif", "b-3.tif"]
    folder = touch(tmp_path / "tc", [*names, "overview.png"])
    (folder / "TileConfiguration.txt").write_text(
        "# Define the number of dimensions we are working on\ndim = 2\n\n# Define the image coordinates\n"
        "# scan B.tif; ; (9.0, 9.0)\n"  # a commented-out tile is not listed
        + "".join(f"sub\\{n}; ; ({i * 90.5}, {i * 3.0})\n" for i, n in enumerate(names))
    )
    info = inspect_tile_folder(folder)
    assert info.convention == "tile_configuration" and info.complete and info.missing_files == ()
    assert [t.file for t in info.tiles] == names and info.ignored == ("overview.png",)
    (folder / "7.tif").unlink()
    info = inspect_tile_folder(folder)
    assert not info.complete and info.missing_files == ("7.tif",)


def test_registered_tile_configuration_alone_positions_the_folder(tmp_path):
    folder = touch(tmp_path / "reg", ["1.tif", "2.tif"])
    (folder / "TileConfiguration.registered.txt").write_text("dim = 2\n1.tif; ; (0.0, 0.0)\n2.tif; ; (410.2, -3.5)\n")
    info = inspect_tile_folder(folder)
    assert info.convention == "tile_configuration" and info.complete
    assert read_tile_configuration(info.tile_configuration) == {"1.tif": (0.0, 0.0), "2.tif": (410.2, -3.5)}


def test_custom_index_pattern(tmp_path):
    folder = touch(tmp_path / "idx", [f"field{i}.tif" for i in range(1, 7)])
    info = inspect_tile_folder(folder, pattern=r"field(?P<index>\d+)", cols=3)
    assert info.convention == "custom" and (info.rows, info.cols) == (2, 3) and info.complete
    assert {t.file: (t.row, t.col) for t in info.tiles}["field4.tif"] == (1, 0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_named_tile_configuration_is_never_opened(tmp_path):
    import threading

    folder = touch(tmp_path / "fifo", ["1.tif", "2.tif"])
    os.mkfifo(folder / "TileConfiguration.txt")
    got = []
    t = threading.Thread(target=lambda: got.append(inspect_tile_folder(folder)), daemon=True)
    t.start()
    t.join(scaled(30))  # a blocking open would wait for a writer for ever
    assert got, "inspect_tile_folder blocked on a FIFO named TileConfiguration.txt"
    assert got[0].convention is None and got[0].tile_configuration is None
