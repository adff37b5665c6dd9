"""Per-FOV checks for live QC (issue #18): tiles cut from synthetic chips with known answers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qc.chip import template_for
from qc.clarity import load_clarity_model
from qc.live import (
    FOV_CHECK_VERSION,
    FovCheck,
    FovParams,
    LivePair,
    WarningRules,
    assess,
    check_fov,
    check_fovs,
    clarity_model_id,
    fov_key,
    fov_summary,
    warning_due,
)
from qc.stitching import MemoryPairCache
from qc.testing.fovs import chip_tile_set

SS2 = template_for("SS2")
ANGLE = 0.7
#: 512 px tiles at 0.5 px per DNB hold as many track lines as a 1024 px tile at 10x (1 px per DNB)
GRID = {"rows": 3, "cols": 3, "tile_size": 512, "scale": 0.5, "angle_deg": ANGLE, "seed": 3}


@pytest.fixture(scope="module")
def model():
    return load_clarity_model()


@pytest.fixture(scope="module")
def good(shared_data):
    return chip_tile_set(data_dir=shared_data, **GRID)


def _checks(cs, model, template=SS2, **params):
    p = FovParams(um_per_px=cs.um_per_px, **params)
    return [
        check_fov(t.read(), t, digest=f"d{t.row}{t.col}", template=template, params=p, clarity_model=model)
        for t in cs.tiles
    ]


def test_good_tiles_show_lines_at_the_true_angle_and_are_clear(good, model):
    checks = _checks(good, model)
    for c in checks:
        assert c.track_found, c
        assert c.track_angle is not None and abs(c.track_angle - ANGLE) < 0.1, c
        assert min(c.track_lines) >= 2 and c.polarity == "dark"
        assert c.clarity_score is not None and c.clarity_score >= 70, c
        assert sum(c.clarity.values()) == 8  # clarity_windows
        assert c.focus is not None and c.focus >= 0.5 and not c.blurred, c
        assert not c.over_exposed and not c.empty and c.saturated < 0.01 and c.clipped == 0.0


def test_blurred_rows_are_blurred_and_saturated_rows_are_over_exposed(shared_data, model):
    cs = chip_tile_set(data_dir=shared_data, blurred_rows=[1], saturated_rows=[2], **GRID)
    assert cs.blurred == tuple(t.name for t in cs.tiles if t.row == 1)
    by_row = {r: [c for c in _checks(cs, model) if c.row == r] for r in range(3)}
    assert all(c.clarity_score is not None and c.clarity_score >= 70 for c in by_row[0])
    assert all(c.clarity_score is not None and c.clarity_score < 60 for c in by_row[1])
    assert all(not c.blurred for c in by_row[0]) and all(c.blurred for c in by_row[1])
    for c in by_row[2]:
        assert c.over_exposed and c.saturated > 0.1 and c.level > 0.33, c  # the gain lifts the surface too
        assert c.track_found  # over-exposure leaves the lines on the chip surface


def test_a_chip_without_track_lines_has_none_in_any_fov(shared_data, model):
    cs = chip_tile_set(data_dir=shared_data, no_lines=True, **GRID)
    checks = _checks(cs, model)
    assert not any(c.track_found for c in checks)
    assert all(c.track_angle is None for c in checks)


def test_no_template_or_no_model_skips_those_checks(good):
    t = good.tiles[0]
    c = check_fov(t.read(), t, digest="d", template=None, params=FovParams(), clarity_model=None)
    assert (c.track_found, c.track_angle, c.track_lines, c.polarity) == (False, None, (0, 0), "")
    assert c.clarity == {} and c.clarity_score is None


def test_a_dark_empty_fov_and_float_pixels():
    from qc.io.model import Tile

    black = np.zeros((256, 256), np.uint16)
    tile = Tile("t", 0, 0, 0.0, 0.0, 256, 256, loader=lambda: black)
    c = check_fov(black, tile, digest="d", template=SS2, params=FovParams(), clarity_model=None)
    assert c.empty and c.dark == 1.0 and not c.track_found
    ramp = np.linspace(0, 1, 256 * 256, dtype=np.float32).reshape(256, 256)
    ramp[:100] = 1.0  # a float image saturates at its own maximum
    c = check_fov(ramp, tile, digest="d", template=None, params=FovParams(), clarity_model=None)
    assert c.over_exposed and 0.39 < c.saturated < 0.40
    with pytest.raises(ValueError, match="2-D grey array"):
        check_fov(
            np.zeros((4, 4, 2), np.uint8), tile, digest="d", template=None, params=FovParams(), clarity_model=None
        )


def test_to_bytes_round_trips_and_to_dict_is_plain(good, model):
    c = _checks(good, model)[4]
    assert FovCheck.from_bytes(c.to_bytes()) == dataclasses.replace(
        c,
        track_angle=round(c.track_angle, 4) if c.track_angle is not None else None,
        clarity_score=round(c.clarity_score, 2) if c.clarity_score is not None else None,
        saturated=round(c.saturated, 5),
        dark=round(c.dark, 5),
        focus=round(c.focus, 4) if c.focus is not None else None,
        surface=round(c.surface, 4),
        level=round(c.level, 5),
        clipped=round(c.clipped, 4),
    )
    none = FovCheck("n", 1, 2, "d", False, None, (0, 0), {}, None, 0.0, 1.0, empty=True)
    assert FovCheck.from_bytes(none.to_bytes()) == none
    assert none.to_dict()["track_angle"] is None


def test_cache_keys_change_with_version_parameters_model_and_template(model, monkeypatch):
    p = FovParams()
    mid = clarity_model_id(model)
    assert mid is not None and mid == clarity_model_id(model)
    k = fov_key("abc", p, mid, SS2)
    assert k.startswith("fov|")
    assert k == fov_key("abc", FovParams(), mid, SS2)
    others = {
        fov_key("abd", p, mid, SS2),
        fov_key("abc", FovParams(um_per_px=0.25), mid, SS2),
        fov_key("abc", p, None, SS2),
        fov_key("abc", p, mid, template_for("SS1")),
        fov_key("abc", p, mid),
    }
    assert k not in others and len(others) == 5
    monkeypatch.setattr("qc.live.FOV_CHECK_VERSION", FOV_CHECK_VERSION + "-next")
    assert fov_key("abc", p, mid, SS2) != k
    assert FovParams().key_part() == FovParams().key_part() != FovParams(min_lines=3).key_part()


def test_check_fovs_computes_nothing_on_a_second_run(good, model):
    cache = MemoryPairCache()
    decoded: list[str] = []

    def loader(t):
        decoded.append(t.name)
        return t.read()

    params = FovParams(um_per_px=good.um_per_px)
    seen: list[bool] = []
    first = check_fovs(
        good.tiles, cache=cache, template=SS2, params=params, clarity_model=model, loader=loader,
        on_result=lambda c, cached: seen.append(cached),
    )  # fmt: skip
    assert [c.name for c in first] == [t.name for t in good.tiles]
    assert len(decoded) == 9 and seen == [False] * 9
    assert sum(k.startswith("fov|") for k in cache.keys()) == 9
    decoded.clear()
    seen.clear()
    again = check_fovs(
        good.tiles, cache=cache, template=SS2, params=params, clarity_model=model, loader=loader,
        on_result=lambda c, cached: seen.append(cached),
    )  # fmt: skip
    assert decoded == [] and seen == [True] * 9
    assert [c.to_dict() for c in again] == [FovCheck.from_bytes(c.to_bytes()).to_dict() for c in first]
    # other parameters: computed anew
    check_fovs(good.tiles[:2], cache=cache, template=SS2, params=FovParams(um_per_px=good.um_per_px, min_lines=3),
               clarity_model=model, loader=loader)  # fmt: skip
    assert len(decoded) == 2


def test_check_fovs_on_threads_gives_the_serial_results_in_order_and_mixes_in_cached_ones(good, model):
    """The final QC checks the FOVs live QC did not on its QC threads (a CZI mosaic or a tile folder QC'd
    after the scan); results, their order and the on_result calls are the serial ones."""
    params = FovParams(um_per_px=good.um_per_px)
    serial = check_fovs(good.tiles, cache=None, template=SS2, params=params, clarity_model=model)
    cache = MemoryPairCache()
    check_fovs(good.tiles[3:5], cache=cache, template=SS2, params=params, clarity_model=model)  # two live already
    seen: list[tuple[str, bool]] = []
    threaded = check_fovs(
        good.tiles, cache=cache, template=SS2, params=params, clarity_model=model, threads=2,
        on_result=lambda c, cached: seen.append((c.name, cached)),
    )  # fmt: skip
    assert [c.to_dict() for c in threaded] == [c.to_dict() for c in serial]
    assert seen == [(t.name, i in (3, 4)) for i, t in enumerate(good.tiles)]


def test_check_fovs_memoises_digests_by_identity_and_hashes_a_decode_once(good):
    cache = MemoryPairCache()
    reads: list[str] = []
    tiles = [
        dataclasses.replace(t, digest_fn=None, identity=f"{t.name}|v1", loader=(lambda t=t: (reads.append(t.name), t.read())[1]))
        for t in good.tiles[:3]
    ]  # fmt: skip
    params = FovParams(um_per_px=good.um_per_px)
    check_fovs(tiles, cache=cache, template=None, params=params, clarity_model=None)
    assert len(reads) == 3  # digest and check from one decode each
    assert sum(k.startswith("digest:") for k in cache.keys()) == 3
    reads.clear()
    check_fovs(tiles, cache=cache, template=None, params=params, clarity_model=None)
    assert reads == []  # digests from the identity, results from the cache: nothing decoded


def test_fov_summary_counts(good, model):
    s = fov_summary(_checks(good, model), cached=4)
    assert s["fovs_total"] == 9 and s["fovs_cached"] == 4 and s["with_lines"] == 9
    assert s["over_exposed"] == 0 and s["blurred"] == 0 and len(s["fovs"]) == 9
    assert s["focus_min"] is not None and s["focus_min"] >= 0.5
    assert sum(s["clarity_counts"].values()) == 9 * 8


# -- warning rules -------------------------------------------------------------------------------


def _fov(r, c, *, lines=True, angle=0.3, focus=0.6, over=False, surface=0.9, level=0.03):
    return FovCheck(
        f"F{r}_{c}", r, c, "d", lines, angle if lines else None, (3, 3) if lines else (0, 0),
        {"good": 8}, 90.0, 0.5 if over else 0.1, 0.0, over_exposed=over, focus=focus,
        blurred=focus is not None and focus < 0.45, surface=surface, level=level, clipped=0.9 if over else 0.4,
    )  # fmt: skip


def _grid(rows, cols, **kw):
    return [_fov(r, c, **kw) for r in range(rows) for c in range(cols)]


def test_warning_due_after_a_share_of_the_grid_or_full_rows():
    rules = WarningRules()
    seen = _grid(10, 10)
    assert not warning_due([], (10, 10), rules)
    assert not warning_due(seen[:14], (10, 10), rules)
    assert warning_due(seen[:15], (10, 10), rules)  # 15 % of 100
    # a 4 x 40 grid: 15 % is 24 FOVs, two full rows are 80: the share comes first
    assert warning_due(_grid(4, 40)[:24], (4, 40), rules) and not warning_due(_grid(4, 40)[:23], (4, 40), rules)
    # a 40 x 3 grid: two full rows (6 FOVs) come before 15 % (18)
    assert not warning_due(_grid(40, 3)[:5], (40, 3), rules)
    assert warning_due(_grid(40, 3)[:6], (40, 3), rules)
    assert warning_due(_grid(40, 3)[:3], (40, 3), WarningRules(start_rows=1))


def test_assess_is_quiet_before_due_and_on_good_fovs():
    bad = _grid(10, 10, lines=False)
    assert assess(bad[:14], [], (10, 10), WarningRules()) == []
    assert assess(_grid(10, 10), [], (10, 10), WarningRules()) == []


@pytest.mark.parametrize(
    ("code", "spoil"),
    [
        ("no_track_lines", {"lines": False}),
        ("blur", {"focus": 0.3}),
        ("saturation", {"over": True}),
    ],
)
def test_each_problem_is_raised_and_clears_when_later_fovs_are_fine(code, spoil):
    rules, grid = WarningRules(), (10, 10)
    seen = _grid(3, 10, **spoil)  # the first three rows spoiled
    (p,) = assess(seen, [], grid, rules)
    assert p.code == code
    assert p.fovs == tuple(c.name for c in seen[-10:])
    assert any(ch.isdigit() for ch in p.reason) and p.reason[0].isalnum()
    later = seen + [_fov(3, c) for c in range(10)]
    assert assess(later[:-6], [], grid, rules)  # 4 of the 10 latest fine: still mostly spoiled
    assert assess(later, [], grid, rules) == []  # a whole fine row: cleared


def test_angle_spread_is_a_problem_but_one_stray_fov_is_not():
    rules, grid = WarningRules(), (10, 10)
    seen = _grid(2, 10)
    for k, c in enumerate(seen[-10:]):
        seen[10 + k] = dataclasses.replace(c, track_angle=0.3 + 0.1 * k)
    (p,) = assess(seen, [], grid, rules)
    assert p.code == "angle_spread" and "spread" in p.reason
    stray = _grid(2, 10)
    stray[-3] = dataclasses.replace(stray[-3], track_angle=2.0)
    assert assess(stray, [], grid, rules) == []


def test_stitching_problem_from_a_mismatched_or_far_pair():
    rules, grid = WarningRules(), (10, 10)
    seen = _grid(2, 10)
    fine = [LivePair(f"F1_{c}", f"F1_{c + 1}", "ok", (2.0, -1.0), 0.8) for c in range(9)]
    assert assess(seen, fine, grid, rules) == []
    far = [*fine, LivePair("F1_3", "F1_4", "ok", (60.0, 5.0), 0.5)]
    (p,) = assess(seen, far, grid, rules)
    assert p.code == "stitching" and p.fovs == ("F1_3", "F1_4") and "60 px" in p.reason
    mism = [*fine, LivePair("F0_2", "F1_2", "mismatch", (0.0, 0.0), 0.1)]
    (p,) = assess(seen, mism, grid, rules)
    assert p.code == "stitching" and set(p.fovs) == {"F0_2", "F1_2"}
    # pairs of FOVs outside the window do not count
    assert assess([*seen, *_grid(3, 10)[20:]], mism, grid, rules) == []


# -- real-looking scans, judged tile by tile as live QC does (issue #18) ---------------------------
#
# 5 x 5 scans of 1024^2 tiles cut from real-looking chips (qc.testing.scan: dark surface, lines 3 levels
# deep, FOV seams, 40 % tissue much of it saturated, debris). Live QC judges the FOVs after every tile;
# a warning must mean a badly acquired scan, never what real chips look like.

SCAN = 5


def _scan_checks(kind: str, seed: int) -> list[FovCheck]:
    from qc.io.model import Tile
    from qc.testing.scan import scan_tiles

    out = []
    for r, c, px in scan_tiles(kind, rows=SCAN, cols=SCAN, tile=1024, seed=seed):
        tile = Tile(f"F{r}_{c}", r, c, 0.0, 0.0, px.shape[1], px.shape[0], loader=lambda px=px: px)
        out.append(
            check_fov(px, tile, digest=f"{kind}{seed}{r}{c}", template=SS2, params=FovParams(), clarity_model=None)
        )
    return out


def _over_exposed_checks(seed: int, rows: tuple[int, ...]) -> list[FovCheck]:
    from qc.testing.scan import _CHIP

    cs = chip_tile_set(rows=SCAN, cols=SCAN, tile_size=1024, angle_deg=0.4, jitter_px=3, seed=seed,
                       saturated_rows=rows, saturation_gain=6.0, **_CHIP)  # fmt: skip
    params = FovParams(um_per_px=cs.um_per_px)
    return [check_fov(t.read(), t, digest=t.name, template=SS2, params=params, clarity_model=None) for t in cs.tiles]


def _history(checks: list[FovCheck], grid: tuple[int, int] = (SCAN, SCAN)) -> list[tuple[int, str, str]]:
    """(k, code, "raised" or "cleared") as the FOVs arrive one by one in acquisition order."""
    rules = WarningRules()
    active: set[str] = set()
    out = []
    for k in range(1, len(checks) + 1):
        now = {p.code for p in assess(checks[:k], [], grid, rules)}
        out += [(k, c, "raised") for c in sorted(now - active)] + [(k, c, "cleared") for c in sorted(active - now)]
        active = now
    return out


@pytest.mark.parametrize("seed", [1, 4])
def test_a_good_real_looking_scan_raises_nothing(seed):
    checks = _scan_checks("good", seed)
    assert _history(checks) == []
    # what real chips look like is no problem: lines hidden under tissue, tissue clipping, a low clarity
    assert any(not c.track_found for c in checks) and max(c.saturated for c in checks) > 0.1
    assert not any(c.over_exposed or c.blurred for c in checks)
    focused = [c.focus for c in checks if c.focus is not None]
    assert len(focused) >= 3 and min(focused) > 0.5


def test_blurred_first_rows_raise_blur_before_the_last_row_and_it_clears():
    from qc.testing.scan import BLURRED_ROWS

    checks = _scan_checks("blurred_rows", 3)
    history = _history(checks)
    raised = [k for k, code, what in history if code == "blur" and what == "raised"]
    cleared = [k for k, code, what in history if code == "blur" and what == "cleared"]
    assert raised and raised[0] <= BLURRED_ROWS * SCAN, history  # while the blurred rows come in
    assert cleared and cleared[-1] <= (SCAN - 1) * SCAN, history  # before the last row: sharp rows clear it
    assert {code for _, code, _ in history} == {"blur"}, history
    blurred = [c for c in checks if c.row < BLURRED_ROWS and c.focus is not None]
    assert blurred and all(c.blurred and c.focus is not None and c.focus < 0.42 for c in blurred)


@pytest.mark.parametrize("seed", [2, 6])
def test_a_chip_without_lines_raises_no_track_lines_as_soon_as_due(seed):
    checks = _scan_checks("no_lines", seed)
    rules, grid = WarningRules(), (SCAN, SCAN)
    due = next(k for k in range(1, len(checks) + 1) if warning_due(checks[:k], grid, rules))
    assert due <= 0.15 * SCAN * SCAN + 1
    history = _history(checks)
    assert history == [(due, "no_track_lines", "raised")], history


def test_over_exposed_rows_raise_saturation_and_it_clears():
    checks = _over_exposed_checks(3, (1, 2))
    history = _history(checks)
    raised = [k for k, code, what in history if code == "saturation" and what == "raised"]
    cleared = [k for k, code, what in history if code == "saturation" and what == "cleared"]
    assert raised and SCAN < raised[0] <= 3 * SCAN, history  # within the gain-6 rows
    assert cleared and cleared[0] > 3 * SCAN, history
    assert {code for _, code, _ in history} == {"saturation"}, history
    over = [c for c in checks if c.over_exposed]
    assert over and all(c.row in (1, 2) for c in over)


@pytest.mark.parametrize("kind", ["good", "no_lines"])
def test_a_real_looking_bright_field_scan(kind):
    """H&E: light lines on a grey surface, stained tissue; the surface is told from tissue by its colour."""
    from qc.testing.chips import real_looking

    chip = {
        k: v
        for k, v in real_looking("HE").items()
        if k not in ("width", "height", "seed", "lines", "angle_deg", "scale")
    }
    cs = chip_tile_set(rows=4, cols=4, tile_size=1024, angle_deg=0.4, jitter_px=3, seed=1,
                       no_lines=kind == "no_lines", **chip)  # fmt: skip
    params = FovParams(um_per_px=cs.um_per_px)
    checks = [check_fov(t.read(), t, digest=t.name, template=SS2, params=params, clarity_model=None) for t in cs.tiles]
    assert any(c.surface < 0.1 for c in checks) and any(c.surface > 0.9 for c in checks)  # tissue and bare surface
    if kind == "good":
        assert _history(checks, cs.grid) == []
        found = [c.polarity for c in checks if c.track_found]
        assert found.count("bright") > len(found) / 2  # light lines, tried first on RGB
    else:
        assert [code for _, code, _ in _history(checks, cs.grid)] == ["no_track_lines"]


# -- the final QC of a tile folder --------------------------------------------------------------


def test_run_qc_reports_every_fov_draws_the_map_and_computes_nothing_the_second_time(shared_data, tmp_path):
    from qc.io import open_scan_set
    from qc.pipeline import QCSettings, run_qc, write_run_outputs
    from qc.testing.tiles import write_tile_folder

    chip = "SS200000135TL_D1"
    cs = chip_tile_set(data_dir=shared_data, blurred_rows=[1], saturated_rows=[2], **GRID)
    folder = write_tile_folder(dataclasses.replace(cs.tile_set, tiles=cs.tiles), tmp_path / "in" / chip)
    cache = MemoryPairCache()
    settings = QCSettings(fov_params=FovParams(um_per_px=cs.um_per_px))
    with open_scan_set([folder]) as scan:
        rep = run_qc(scan, settings, cache)
        out = write_run_outputs(rep, tmp_path / "out", archive=False)
    img = rep.as_dict()["images"][0]
    fc = img["fov_checks"]
    assert fc["fovs_total"] == 9 and fc["fovs_cached"] == 0 and len(fc["fovs"]) == 9
    assert fc["with_lines"] == 6 and fc["over_exposed"] == 3  # the blurred row loses its lines at this scale
    assert sum(fc["clarity_counts"].values()) == 9 * 8 and fc["blurred"] == 3
    by_row = {r: [f for f in fc["fovs"] if f["row"] == r] for r in range(3)}
    assert all(f["track_found"] and abs(f["track_angle"] - ANGLE) < 0.1 for f in by_row[0])
    assert all(f["blurred"] for f in by_row[1]) and all(f["over_exposed"] for f in by_row[2])
    assert img["stitching"]["fovs_cached"] == 0
    assert list(img["stitching"]).index("fovs_cached") == list(img["stitching"]).index("pairs_cached") + 1
    assert (out.folder / "pictures" / f"{chip}_fovs.png").stat().st_size > 1000
    assert any(k.startswith("fov|") for k in cache.keys())
    with open_scan_set([folder]) as scan:  # by hand again: every FOV from the cache
        again = run_qc(scan, settings, cache).as_dict()["images"][0]
    assert again["fov_checks"]["fovs_cached"] == 9 and again["stitching"]["fovs_cached"] == 9
    assert [f["digest"] for f in again["fov_checks"]["fovs"]] == [f["digest"] for f in fc["fovs"]]
    assert again["stitching"]["pairs_computed"] == 0
