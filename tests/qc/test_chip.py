"""Chip serials, sizes and templates (qc.chip)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qc.chip import (
    TEMPLATES,
    ChipSerial,
    chip_size_px,
    chip_size_um,
    is_chip_serial,
    parse_chip,
    template_for,
)
from qc.errors import ChipSerialError, QCError

# serial, kind, prefix, template, pitch, size (w, h) cm, position
KNOWN = [
    ("SS200000135TL_D1", "long", "SS2", "SS2", 500.0, (1.0, 1.0), "D1"),
    ("FP200009107_E414", "long", "FP2", "SS2", 500.0, (0.5, 0.5), "E414"),
    ("SS200000108BR_A3A4", "long", "SS2", "SS2", 500.0, (2.0, 1.0), "A3A4"),
    ("FP200000561BL_A3B4", "long", "FP2", "SS2", 500.0, (2.0, 2.0), "A3B4"),
    ("SS200000060_K5L5", "long", "SS2", "SS2", 500.0, (1.0, 2.0), "K5L5"),
    ("SS200000672_CC", "long", "SS2", "SS2", 500.0, (1.0, 1.0), "CC"),
    ("DP8400000006BL_E4", "long", "DP84", "DP84", 715.0, (1.0, 1.0), "E4"),
    ("DP800000123TR_A1", "long", "DP8", "DP84", 715.0, (1.0, 1.0), "A1"),
    ("SS8400000001_B2", "long", "SS84", "DP84", 715.0, (1.0, 1.0), "B2"),
    ("SS100000001TL_A1", "long", "SS1", "SS1", 600.0, (1.0, 1.0), "A1"),
    ("FP100000001_B2C3", "long", "FP1", "SS1", 600.0, (2.0, 2.0), "B2C3"),
    ("C02533C", "short", "C", "SS2", 500.0, (1.0, 1.0), "C"),
    ("A02677B5", "short", "A", "SS2", 500.0, (1.0, 1.0), "B5"),
    ("B03210C211", "short", "B", "SS2", 500.0, (0.5, 0.5), "C211"),
    ("D02070C3D3", "short", "D", "SS2", 500.0, (1.0, 2.0), "C3D3"),
    ("Y00035MD", "short", "Y", "SS2", 500.0, (1.0, 1.0), "MD"),
    ("D03466F1G2", "short", "D", "SS2", 500.0, (2.0, 2.0), "F1G2"),
]


@pytest.mark.parametrize(("serial", "kind", "prefix", "template", "pitch", "size", "position"), KNOWN)
def test_known_serials(serial, kind, prefix, template, pitch, size, position):
    chip = parse_chip(serial)
    assert chip is not None
    assert (chip.serial, chip.kind, chip.prefix, chip.template) == (serial, kind, prefix, template)
    assert chip.pitch_nm == pitch
    assert chip.size_cm == size
    assert chip.position == position
    assert is_chip_serial(serial)
    assert template_for(chip) is TEMPLATES[template]
    assert template_for(serial) is TEMPLATES[template]


def test_long_serial_fields():
    chip = parse_chip("SS200000135TL_D1")
    assert chip.number == "00000135"
    assert chip.corner == "TL"
    assert parse_chip("FP200009107_E414").corner is None
    # DP84 is preferred over DP8 + a number starting with 4 when the length allows it
    assert parse_chip("DP8400000006BL_E4").number == "00000006"
    assert parse_chip("DP840000000TL_A1").prefix == "DP8"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "SS200000135TL",  # no position
        "SS200000135TL_",  # empty position
        "SS200000135TX_D1",  # unknown corner
        "SS300000135TL_D1",  # unknown generation
        "ss200000135TL_D1",  # lower case
        " SS200000135TL_D1",  # padding
        "SS200000135TL_D1.tif",  # extension left on
        "SS20000013TL_D1",  # 7-digit number
        "SS200000135TL_D10",  # 3-character position
        "SS200000108BR_A4A3",  # block corners reversed
        "SS200000108BR_B3A3",  # rows reversed
        "SS200000135TL_D0",  # column 0
        "SS200000135TL_11",  # row must be a letter
        "A0267B5",  # 4-digit short number
        "I02677B5",  # I is not a short-serial letter
        "A02677",  # no position
        "A02677B55",  # 3-character position
        "A026771",  # single-character position must be a letter
        "C02533C_DAPI_IF",  # IF image name, not a serial
    ],
)
def test_rejects(name):
    assert parse_chip(name) is None
    assert not is_chip_serial(name)


@pytest.mark.parametrize("value", [None, 42, 3.5, b"SS200000135TL_D1", ["SS200000135TL_D1"], object()])
def test_non_strings_are_not_serials(value):
    assert parse_chip(value) is None
    assert is_chip_serial(value) is False


def test_templates():
    ss2 = TEMPLATES["SS2"]
    assert ss2.offsets == (240, 300, 330, 390, 390, 330, 300, 240, 420)
    assert ss2.period == 2940
    assert ss2.positions == (0, 240, 540, 870, 1260, 1650, 1980, 2280, 2520)
    assert ss2.pitch_nm == 500.0
    assert (ss2.line_position(0), ss2.line_position(9), ss2.line_position(-1), ss2.line_position(10)) == (
        0,
        2940,
        -420,
        3180,
    )
    assert TEMPLATES["SS1"].offsets == (192, 240, 288, 312, 312, 288, 240, 192, 384)
    assert TEMPLATES["SS1"].pitch_nm == 600.0
    assert TEMPLATES["DP84"].offsets == (112, 144, 208, 224, 224, 208, 144, 112, 160)
    assert TEMPLATES["DP84"].pitch_nm == 715.0
    # 10x: about 0.5 um/px, so one DNB of 500 nm is one pixel
    assert ss2.px_per_dnb(0.5) == pytest.approx(1.0)
    assert template_for("SS1") is TEMPLATES["SS1"]


def test_template_for_unknown_names_the_problem():
    with pytest.raises(ChipSerialError) as err:
        template_for("not-a-chip")
    assert isinstance(err.value, QCError)
    assert "'not-a-chip'" in str(err.value)
    assert "SS2" in str(err.value)


def test_chip_size():
    chip = parse_chip("SS200000108BR_A3A4")
    assert chip_size_um(chip) == (20000.0, 10000.0)
    assert chip_size_px(chip, um_per_px=0.5) == (40000.0, 20000.0)
    half = parse_chip("FP200009107_E414")
    assert chip_size_px(half, um_per_px=0.5) == (10000.0, 10000.0)
    with pytest.raises(ValueError, match="um_per_px"):
        chip_size_px(chip, um_per_px=0)


def test_serial_is_frozen():
    chip = parse_chip("A02677B5")
    with pytest.raises(AttributeError):
        chip.serial = "x"  # type: ignore[misc]


# -- property tests ---------------------------------------------------------
ROWS = "ABCDEFGHJKLMN"
COLS = "123456789ABCD"


@st.composite
def positions(draw) -> tuple[str, tuple[float, float]]:
    form = draw(st.sampled_from(["cell", "quarter", "block"]))
    r, c = draw(st.integers(0, len(ROWS) - 1)), draw(st.integers(0, len(COLS) - 1))
    if form == "cell":
        return ROWS[r] + COLS[c], (1.0, 1.0)
    if form == "quarter":
        return ROWS[r] + COLS[c] + draw(st.sampled_from(["11", "12", "13", "14"])), (0.5, 0.5)
    r2 = draw(st.integers(r, len(ROWS) - 1))
    c2 = draw(st.integers(c, len(COLS) - 1))
    pos = ROWS[r] + COLS[c] + ROWS[r2] + COLS[c2]
    return pos, (float(c2 - c + 1), float(ord(ROWS[r2]) - ord(ROWS[r]) + 1))


@st.composite
def long_serials(draw) -> tuple[str, dict]:
    # DP8 followed by a number starting with 4 still parses as DP8: DP84 would leave 7 digits
    prefix = draw(st.sampled_from(["SS2", "FP2", "SS1", "FP1", "DP84", "SS84", "DP8"]))
    number = draw(st.text("0123456789", min_size=8, max_size=8))
    corner = draw(st.sampled_from(["", "TL", "TR", "BL", "BR"]))
    pos, size = draw(positions())
    expect = {"SS2": "SS2", "FP2": "SS2", "SS1": "SS1", "FP1": "SS1", "DP84": "DP84", "SS84": "DP84", "DP8": "DP84"}
    return f"{prefix}{number}{corner}_{pos}", dict(
        kind="long", number=number, corner=corner or None, position=pos, size_cm=size, template=expect[prefix]
    )


@st.composite
def short_serials(draw) -> tuple[str, dict]:
    letter = draw(st.sampled_from("ABCDY"))
    number = draw(st.text("0123456789", min_size=5, max_size=5))
    pos, size = draw(positions())
    return f"{letter}{number}{pos}", dict(
        kind="short", prefix=letter, number=number, position=pos, size_cm=size, template="SS2"
    )


@settings(max_examples=400, deadline=None)
@given(st.one_of(long_serials(), short_serials()))
def test_round_trips_generated_serials(case):
    serial, expect = case
    chip = parse_chip(serial)
    assert isinstance(chip, ChipSerial)
    assert chip.serial == serial
    for key, value in expect.items():
        assert getattr(chip, key) == value, key
    # the parts put back together give the serial again
    if chip.kind == "long":
        rebuilt = f"{chip.prefix}{chip.number}{chip.corner or ''}_{chip.position}"
    else:
        rebuilt = f"{chip.prefix}{chip.number}{chip.position}"
    assert rebuilt == serial


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="SFDPAY0123456789_TLBRCE", max_size=20), st.binary().map(repr)))
def test_never_raises_on_arbitrary_text(text):
    chip = parse_chip(text)
    assert chip is None or isinstance(chip, ChipSerial)
    assert is_chip_serial(text) is (chip is not None)


@settings(max_examples=300, deadline=None)
@given(st.one_of(long_serials(), short_serials()), st.integers(0, 30), st.characters())
def test_mutations_never_raise(case, at, ch):
    serial, _ = case
    at = min(at, len(serial))
    for variant in (serial[:at] + ch + serial[at:], serial[:at] + serial[at + 1 :], serial[:at]):
        chip = parse_chip(variant)
        assert chip is None or chip.serial == variant


def test_line_positions_unroll_the_template_the_same_way_everywhere():
    """One formula for a line's chip coordinate (issue #14: it was written three times)."""
    from qc.chip import TEMPLATES

    t = TEMPLATES["SS2"]
    k = np.arange(-20, 30)
    u = t.line_positions(k)
    assert [t.line_position(int(i)) for i in k] == u.astype(int).tolist()
    assert np.all(np.diff(u) > 0) and u[k.tolist().index(0)] == 0 and t.line_position(9) == t.period
    inside = t.line_indices(-1000.0, 5000.0)
    assert np.all((t.line_positions(inside) >= -1000) & (t.line_positions(inside) <= 5000))
    outside = np.setdiff1d(np.arange(-100, 100), inside)
    assert not np.any((t.line_positions(outside) >= -1000) & (t.line_positions(outside) <= 5000))
