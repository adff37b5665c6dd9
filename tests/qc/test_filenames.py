"""fit_name: derived file names stay within 255 UTF-8 bytes, readable and distinct (issue #20, case 9)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qc.filenames import HASH_CHARS, MAX_NAME_BYTES, fit_name


def _bytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def test_a_name_that_fits_is_unchanged():
    assert fit_name("SS200000135TL_D1_CD31_IF", "_calibration.png") == "SS200000135TL_D1_CD31_IF_calibration.png"
    name = "A" * (MAX_NAME_BYTES - 4)
    assert fit_name(name, ".png") == name + ".png"


def test_a_long_name_keeps_its_beginning_and_suffix_and_gets_a_hash():
    name = "SS200000135TL_D1_" + "CD31-" * 50 + "_IF"
    out = fit_name(name, "_calibration.png")
    assert _bytes(out) == MAX_NAME_BYTES
    assert out.startswith("SS200000135TL_D1_CD31-CD31-") and out.endswith("_calibration.png")
    tag = out[: -len("_calibration.png")].rsplit("~", 1)[1]
    assert len(tag) == HASH_CHARS and int(tag, 16) >= 0
    assert fit_name(name, "_calibration.png") == out  # the same name, the same result
    assert fit_name(name[:-1] + "X", "_calibration.png") != out  # a different end, a different name


def test_a_suffix_that_leaves_no_room_is_an_error():
    with pytest.raises(ValueError, match="leaves no room"):
        fit_name("abc" * 100, "x" * 250)


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from(["\udcff", "\udc80"]), max_size=400),
    suffix=st.sampled_from(["", ".png", "_track.png", ".imageqc-partial", ".tar.gz.partial-host-12345"]),
    limit=st.integers(min_value=60, max_value=MAX_NAME_BYTES),
)
def test_any_name_fits_whole_characters_only(name, suffix, limit):
    out = fit_name(name, suffix, limit=limit)
    assert _bytes(out) <= limit and out.endswith(suffix)
    if _bytes(name + suffix) <= limit:
        assert out == name + suffix
    else:
        head = out[: len(out) - len(suffix)].rsplit("~", 1)[0]
        assert name.startswith(head)  # never a split character: the head is a prefix of the name
