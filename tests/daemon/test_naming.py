"""Scan-set names: the grammar, strict and lenient naming, markers; property tests on arbitrary names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.naming import IF, NUCLEAR, MarkerTemplate, NameStatus, is_temporary, looks_like_tile, parse_name


@pytest.mark.parametrize(
    ("name", "chip", "role", "stain", "fmt"),
    [
        ("SS200000135TL_D1.tif", "SS200000135TL_D1", NUCLEAR, None, "tiff"),
        ("SS200000135TL_D1.TIFF", "SS200000135TL_D1", NUCLEAR, None, "tiff"),
        ("SS200000135TL_D1.ome.tif", "SS200000135TL_D1", NUCLEAR, None, "tiff"),
        ("SS200000135TL_D1_CD31_IF.tif", "SS200000135TL_D1", IF, "CD31", "tiff"),
        ("SS200000135TL_D1_Pan-CK_IF.Czi", "SS200000135TL_D1", IF, "Pan-CK", "czi"),
        ("FP200009107_E414.czi", "FP200009107_E414", NUCLEAR, None, "czi"),
        ("C02533C.tif", "C02533C", NUCLEAR, None, "tiff"),
        ("A02677B5_GFAP_IF.tiff", "A02677B5", IF, "GFAP", "tiff"),
        ("SS200000135TL_D1.tar.gz", "SS200000135TL_D1", NUCLEAR, None, "tar.gz"),
        ("SS200000135TL_D1_20240131_101500_0.1.0.TAR.GZ", "SS200000135TL_D1", NUCLEAR, None, "tar.gz"),
    ],
)
def test_member_files_parse_to_chip_role_and_format(name, chip, role, stain, fmt):
    info = parse_name(name)
    assert info.status is NameStatus.MEMBER, info.reason
    m = info.member
    assert (m.chip, m.role, m.stain, m.format) == (chip, role, stain, fmt)
    assert m.file_name == name
    assert info.accepted("strict") and info.accepted("lenient")


def test_tile_folders_are_members_of_format_tiles():
    nuclear = parse_name("SS200000135TL_D1", is_dir=True)
    stained = parse_name("SS200000135TL_D1_DAPI-2_IF", is_dir=True)
    assert nuclear.member.format == "tiles" and nuclear.member.role == NUCLEAR and nuclear.member.extension == ""
    assert stained.member.role == IF and stained.member.stain == "DAPI-2" and stained.member.chip == "SS200000135TL_D1"


@pytest.mark.parametrize(
    ("serial", "size"),
    [
        ("SS200000135TL_D1", (1.0, 1.0)),
        ("FP200009107_E414", (0.5, 0.5)),
        ("SS200000108BR_A3A4", (2.0, 1.0)),
        ("D02070C3D3", (1.0, 2.0)),
    ],
)
def test_chip_size_comes_from_the_serial(serial, size):
    assert parse_name(f"{serial}.tif").member.chip_size_cm == size


@pytest.mark.parametrize(
    "name",
    [
        "~SS200000135TL_D1.tif",
        ".SS200000135TL_D1.tif",
        "SS200000135TL_D1.tif.tmp",
        "SS200000135TL_D1.tif.part",
        "SS200000135TL_D1.tif.PART",
        "SS200000135TL_D1.tif.crdownload",
        "notes.txt",
        "SS200000135TL_D1.png",
        "SS200000135TL_D1",
        ".tif",
        "",
        "a/b.tif",
        "SS200000135TL_D1\x00.tif",
        "img_0001_0002.tif",
        "scan_s12_ch00.tif",
        "0001.tif",
    ],
)
def test_temporary_hidden_tile_and_foreign_names_are_never_candidates(name):
    info = parse_name(name)
    assert info.status is NameStatus.IGNORED and info.member is None and info.reason
    assert not info.accepted("lenient")


def test_names_that_are_not_serials_are_taken_only_under_lenient_naming():
    info = parse_name("mouse-brain_1.tif")
    assert info.status is NameStatus.NOT_SERIAL and "not a chip serial" in info.reason
    assert not info.accepted("strict") and info.accepted("lenient")
    assert info.member.chip == "mouse-brain_1" and info.member.serial is None
    # lower-case serials are not serials: qc.chip is strict
    assert parse_name("ss200000135tl_d1.tif").status is NameStatus.NOT_SERIAL
    # an IF image of a non-serial chip keeps its IF name
    stained = parse_name("mouse1_CD31_IF.tif")
    assert stained.status is NameStatus.NOT_SERIAL and stained.member.stain == "CD31"


def test_helpers_for_temporary_and_tile_names():
    assert is_temporary("~$lock.tif") and is_temporary(".DS_Store") and not is_temporary("C02533C.tif")
    assert (
        looks_like_tile("x_0003_0012_DAPI")
        and looks_like_tile("img[Grid@1 2]")
        and not looks_like_tile("SS200000135TL_D1")
    )


def test_marker_template():
    marker = MarkerTemplate("{chip}.done")
    assert marker.name_for("C02533C") == "C02533C.done"
    assert marker.chip_of("C02533C.done") == "C02533C" and marker.chip_of("C02533C.DONE") == "C02533C"
    assert marker.chip_of("C02533C.tif") is None
    assert not MarkerTemplate("") and MarkerTemplate("").chip_of("x.done") is None
    fixed = MarkerTemplate("EXPORT_DONE")
    assert fixed.chip_of("export_done") == "" and fixed.chip_of("other") is None


# -- properties -------------------------------------------------------------------

_anything = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8")),
    st.binary(),
    st.none(),
    st.integers(),
    st.floats(),
    st.lists(st.text(max_size=5)),
    st.text(alphabet="SC0123456789_ABDFILPTRX-.tifgzarTIFCZ~", max_size=40),
)


@settings(max_examples=600, deadline=None)
@given(_anything, st.booleans())
def test_the_parser_never_raises(name, is_dir):
    info = parse_name(name, is_dir=is_dir)
    assert isinstance(info.status, NameStatus)
    assert (info.member is None) == (info.status is NameStatus.IGNORED)
    if info.member is not None:
        assert info.member.file_name == name


_digits = st.text(alphabet="0123456789", min_size=1, max_size=1)
_row = st.sampled_from("ABCDEFGHJK")
_col = st.sampled_from("123456789")
_long = st.builds(
    lambda prefix, number, corner, row, col: f"{prefix}{number}{corner}_{row}{col}",
    st.sampled_from(["SS2", "FP2", "SS1", "FP1", "DP84", "SS84"]),
    st.text(alphabet="0123456789", min_size=8, max_size=8),
    st.sampled_from(["", "TL", "TR", "BL", "BR"]),
    _row,
    _col,
)
_short = st.builds(
    lambda letter, number, row, col: f"{letter}{number}{row}{col}",
    st.sampled_from("ABCDY"),
    st.text(alphabet="0123456789", min_size=5, max_size=5),
    _row,
    _col,
)
_if_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,11}", fullmatch=True)
_ext = st.sampled_from([".tif", ".tiff", ".czi", ".ome.tif", ".tar.gz"]).flatmap(
    lambda e: st.lists(st.booleans(), min_size=len(e), max_size=len(e)).map(
        lambda ups: "".join(c.upper() if u else c for c, u in zip(e, ups, strict=False))
    )
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_long, _short), st.one_of(st.none(), _if_name), st.one_of(st.none(), _ext))
def test_valid_names_round_trip(chip, stain, ext):
    if ext is not None and ext.lower() == ".tar.gz":
        stain = None  # archives are whole sets
    stem = chip if stain is None else f"{chip}_{stain}_IF"
    name = stem + (ext or "")
    info = parse_name(name, is_dir=ext is None)
    assert info.status is NameStatus.MEMBER, (name, info.reason)
    m = info.member
    assert m.file_name == name and m.name == stem and m.chip == chip and m.stain == stain
    assert m.role == (IF if stain else NUCLEAR)
    assert m.format == (
        "tiles"
        if ext is None
        else {".tif": "tiff", ".tiff": "tiff", ".czi": "czi", ".ome.tif": "tiff", ".tar.gz": "tar.gz"}[ext.lower()]
    )
    assert m.serial is not None and m.serial.serial == chip
