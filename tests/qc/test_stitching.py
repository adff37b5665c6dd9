"""Stitching evaluation on generated tile sets with known geometry and on real tiles."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qc.errors import QCError
from qc.io.model import Tile
from qc.stitching import StitchingParams, evaluate_stitching, tile_configuration_text
from qc.stitching.evaluate import _piecewise, _placement, _stage
from qc.testing.tiles import make_tile_set
from tests.qc.stitching_helpers import czi_mosaic_tiles, shared_data, stain_texture, stitch2d_tiles

GRID = dict(rows=3, cols=4, tile_size=384, overlap=0.2)


def _texture(stain: str = "DAPI") -> np.ndarray:
    return stain_texture(stain, (1400, 1700), 21)


def _relative(positions: dict[str, tuple[float, float]], names: list[str]) -> np.ndarray:
    p = np.array([positions[n] for n in names], float)
    return p - p[0]


def test_jittered_set_passes_and_deviations_are_recovered():
    ts = make_tile_set(_texture(), jitter_px=5, seed=1, noise_sigma=150, **GRID)
    res = evaluate_stitching(ts.tiles)
    names = [t.name for t in ts.tiles]
    assert res.pairs_total == 3 * 3 + 2 * 4
    assert all(p.status == "ok" for p in res.pairs)
    err = np.abs(_relative(res.registered_positions, names) - _relative(ts.true_positions, names))
    assert err.max() < 1.0
    dev = np.array([f.deviation_from_nominal for f in res.fovs])
    truth = np.array([ts.offsets[n] for n in names], float)
    assert np.abs((dev - dev[0]) - (truth - truth[0])).max() < 1.0
    assert res.passed and res.score >= 60
    assert res.outliers == ()
    assert res.criterion.clear_share == 1.0 and res.criterion.mean_quality > 0.9
    assert 0 < res.max_deviation_px <= 2 * 5 * np.sqrt(2) + 1
    for f in res.fovs:  # per-FOV results carry what the deviation map needs
        assert f.clear_consistent and f.informative and f.quality > 0.9
        assert f.deviation_from_neighbours_px is not None


def test_misplaced_tile_fails_and_is_named():
    ts = make_tile_set(_texture(), jitter_px=3, seed=2, misplaced=(1, 2), misplace_px=(28, -24), **GRID)
    res = evaluate_stitching(ts.tiles)
    assert not res.passed and res.score < 60
    assert res.outliers == (ts.misplaced,)
    bad = next(f for f in res.fovs if f.name == ts.misplaced)
    assert bad.deviation_from_neighbours_px > 30 and "px from where its neighbours expect it" in bad.reason
    assert res.max_deviation_px == pytest.approx(bad.deviation_from_neighbours_px, abs=0.01)
    # the misplacement itself is measured: true offset recovered within 1 px (relative to tile 0)
    names = [t.name for t in ts.tiles]
    err = np.abs(_relative(res.registered_positions, names) - _relative(ts.true_positions, names))
    assert err.max() < 1.0
    # StereoMap's own conditions still hold: the placement condition is what fails
    assert res.criterion.clear_share > 0.3 and res.criterion.placement_score < 60


def test_tile_misplaced_beyond_search_range_fails_and_is_named():
    ts = make_tile_set(_texture(), jitter_px=3, seed=3, misplaced=(1, 1), misplace_px=(150, 110), **GRID)
    res = evaluate_stitching(ts.tiles)
    assert not res.passed and res.score < 60
    assert res.outliers == (ts.misplaced,)
    bad = next(f for f in res.fovs if f.name == ts.misplaced)
    assert bad.registered is None and "match none" in bad.reason
    assert {p.status for p in res.pairs if ts.misplaced in (p.a, p.b)} == {"mismatch"}
    assert res.criterion.unmatched == 1


def test_featureless_overlaps_are_no_information_not_failure():
    ts = make_tile_set(_texture(), jitter_px=4, seed=4, featureless=[(0, 0), (2, 3)], noise_sigma=100, **GRID)
    res = evaluate_stitching(ts.tiles)
    flat = {p.a + p.b: p.status for p in res.pairs if set(ts.featureless) & {p.a, p.b}}
    assert flat and set(flat.values()) == {"no_information"}
    assert res.outliers == ()
    assert res.passed
    for f in res.fovs:
        if f.name in ts.featureless:
            assert not f.informative and not f.clear_consistent and f.registered is None
    assert res.pairs_informative == res.pairs_total - len(flat)
    # the rest is still registered exactly
    names = [n for n in (t.name for t in ts.tiles) if n not in ts.featureless]
    err = np.abs(_relative(res.registered_positions, names) - _relative(ts.true_positions, names))
    assert err.max() < 1.0


def test_entirely_featureless_set_fails_without_blaming_a_tile():
    flat = np.full((1400, 1700), 900, np.uint16)
    ts = make_tile_set(flat, noise_sigma=20, seed=5, **GRID)
    res = evaluate_stitching(ts.tiles)
    assert res.pairs_informative == 0
    assert not res.passed and res.score == 0
    assert res.outliers == ()
    assert res.max_deviation_px == 0.0


def test_rgb_tiles_are_evaluated():
    tex = stain_texture("HE", (1400, 1700), 22)
    ts = make_tile_set(tex, jitter_px=4, seed=6, **GRID)
    res = evaluate_stitching(ts.tiles, max_threads=1)
    assert res.passed and all(p.status == "ok" for p in res.pairs)
    names = [t.name for t in ts.tiles]
    err = np.abs(_relative(res.registered_positions, names) - _relative(ts.true_positions, names))
    assert err.max() < 1.0


def test_threads_do_not_change_results_and_progress_is_reported():
    ts = make_tile_set(_texture(), jitter_px=4, seed=7, **GRID)
    calls: list[tuple[int, int]] = []
    one = evaluate_stitching(ts.tiles, max_threads=1, progress=lambda d, t: calls.append((d, t)))
    two = evaluate_stitching(ts.tiles, max_threads=2)
    assert one.registered_positions == two.registered_positions
    assert calls[-1] == (one.pairs_total, one.pairs_total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_tile_configuration_text_is_fiji_format():
    ts = make_tile_set(_texture(), jitter_px=4, seed=8, **GRID)
    res = evaluate_stitching(ts.tiles)
    text = tile_configuration_text(res)
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "dim = 2"
    pat = re.compile(r"^(?P<name>[^;]+); ; \((?P<x>-?\d+\.\d+), (?P<y>-?\d+\.\d+)\)$")
    parsed = {m["name"]: (float(m["x"]), float(m["y"])) for m in map(pat.match, lines[1:])}
    assert list(parsed) == [t.name for t in ts.tiles]
    for name, (x, y) in parsed.items():
        rx, ry = res.registered_positions[name]
        assert abs(x - rx) < 0.01 and abs(y - ry) < 0.01
    nominal = tile_configuration_text(res, registered=False)
    assert f"{ts.tiles[5].name}; ; ({ts.tiles[5].x:.2f}, {ts.tiles[5].y:.2f})" in nominal


def test_score_maps_each_threshold_to_exactly_60():
    assert _piecewise(0.3, 0.3) == 60 and _piecewise(0.7, 0.7) == 60
    assert _piecewise(0.0, 0.3) == 0 and _piecewise(1.0, 0.3) == 100
    assert _piecewise(0.29, 0.3) < 60 < _piecewise(0.31, 0.3)
    assert _placement(20.0, 20.0, 0) == 60 and _placement(0.0, 20.0, 0) == 100
    assert _placement(20.5, 20.0, 0) < 60 < _placement(19.5, 20.0, 0)
    assert _placement(1.0, 20.0, 1) == 0
    assert _stage(1.0) == 60 and _stage(0.0) == 100 and _stage(0.99) > 60 > _stage(1.01)


def test_stricter_thresholds_turn_a_pass_into_a_fail_without_recomputing():
    ts = make_tile_set(_texture(), jitter_px=5, seed=9, **GRID)
    loose = evaluate_stitching(ts.tiles)
    strict = evaluate_stitching(ts.tiles, params=StitchingParams(max_deviation_px=loose.max_deviation_px / 2))
    assert loose.passed and not strict.passed and strict.score < 60
    assert strict.outliers  # the FOVs beyond the tightened tolerance are named


def test_bad_tile_sets_raise_clear_errors():
    ts = make_tile_set(_texture(), seed=10, **GRID)
    with pytest.raises(QCError, match="at least two tiles"):
        evaluate_stitching(ts.tiles[:1])
    dup = [*list(ts.tiles), ts.tiles[0]]
    with pytest.raises(QCError, match="both claim grid position"):
        evaluate_stitching(dup)
    t = ts.tiles[1]
    liar = Tile(name=t.name, row=t.row, col=t.col, x=t.x, y=t.y, width=t.width + 8, height=t.height, loader=t.loader)
    with pytest.raises(QCError, match="decoded to"):
        evaluate_stitching([ts.tiles[0], liar])


def test_real_stitch2d_tiles_within_10px_of_expected():
    tiles, expected = stitch2d_tiles(overlap=0.2)  # no stage positions in the files: a 20 % guess
    res = evaluate_stitching(tiles)
    assert all(p.status == "ok" for p in res.pairs)
    names = [t.name for t in tiles]
    err = np.hypot(*(_relative(res.registered_positions, names) - _relative(expected, names)).T)
    assert err.max() < 10.0
    assert all(p.quality > 0.8 for p in res.pairs)


def test_real_czi_mosaic_tile1_offset():
    tiles = czi_mosaic_tiles(shared_data() / "czi" / "mosaic_test.czi")
    assert [(t.name, t.x) for t in tiles] == [("M=0", 0.0), ("M=1", 832.0)]
    res = evaluate_stitching(tiles)
    (pair,) = res.pairs
    assert pair.status == "ok"
    dx, dy = pair.measured_offset
    assert dx == pytest.approx(825, abs=2) and dy == pytest.approx(-2, abs=2)
    assert pair.quality > 0.9
    assert res.passed


def test_large_overlaps_are_correlated_at_reduced_resolution_without_losing_accuracy():
    from qc.stitching.pairs import pair_downsample

    tex = stain_texture("DAPI", (1800, 1800), 23)
    ts = make_tile_set(tex, rows=2, cols=2, tile_size=1000, overlap=0.25, jitter_px=6, seed=11, noise_sigma=200)
    assert pair_downsample((1000, 250), 0) == 2 and pair_downsample((77, 384), 0) == 1
    res = evaluate_stitching(ts.tiles)
    names = [t.name for t in ts.tiles]
    err = np.abs(_relative(res.registered_positions, names) - _relative(ts.true_positions, names))
    assert err.max() < 0.5
    full = evaluate_stitching(ts.tiles, params=StitchingParams(downsample=1))
    assert np.abs(_relative(full.registered_positions, names) - _relative(ts.true_positions, names)).max() < 0.5


_STEP = 205  # 256 px tiles at 20 % overlap
_LAYOUTS = {
    # a 2 x 3 serpentine, numbered in the order the stage drove
    "serpentine": ([(0, 0), (_STEP, 0), (2 * _STEP, 0), (2 * _STEP, _STEP), (_STEP, _STEP), (0, _STEP)], 7),
    # an L: the left column and the bottom row
    "L": ([(0, 0), (0, _STEP), (0, 2 * _STEP), (_STEP, 2 * _STEP), (2 * _STEP, 2 * _STEP)], 4),
    # sparse: a 3 x 3 grid without its centre (one loop of eight pairs round the hole)
    "sparse": ([(c * _STEP, r * _STEP) for r in range(3) for c in range(3) if (r, c) != (1, 1)], 8),
    # not a grid: the second row sits half a step across (each of its tiles touches two above)
    "brick": ([(0, 0), (_STEP, 0), (2 * _STEP, 0), (_STEP // 2, _STEP), (_STEP + _STEP // 2, _STEP)], 7),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_any_layout_given_only_by_a_tile_configuration_is_stitched(tmp_path, layout):
    from qc.io.tiles import TileFolderImage
    from qc.testing.tiles import make_layout_set, write_tile_configuration_folder

    nominal, n_pairs = _LAYOUTS[layout]
    nominal = [(x + 40, y + 30) for x, y in nominal]  # the configuration need not start at 0
    tiles, truth = make_layout_set(_texture(), nominal, tile_size=256, jitter_px=6, seed=12, noise_sigma=100)
    names = [f"{i + 1}.tif" for i in range(len(tiles))]  # names no convention knows
    folder = write_tile_configuration_folder(tiles, tmp_path / layout, names=names)
    img = TileFolderImage(folder)
    assert img.info.convention == "tile_configuration" and img.position_source == "TileConfiguration"
    assert len({(t.row, t.col) for t in img.tiles}) == len(tiles)  # a cell each, even off a grid
    res = evaluate_stitching(img.tiles)
    assert res.pairs_total == n_pairs and all(p.status == "ok" for p in res.pairs)
    assert res.passed and res.outliers == ()
    truth = {name: truth[t.name] for name, t in zip(names, tiles, strict=False)}
    err = np.abs(_relative(res.registered_positions, names) - _relative(truth, names))
    assert err.max() < 1.0


def test_periodic_strip_with_large_stage_errors_is_recovered_within_a_pixel():
    from qc.testing.tiles import grid_paper_texture, make_layout_set

    # a strip over grid paper: every period alias is a correlation peak, and the
    # strongest is not the true offset; each neighbour pair is 40-60 px off nominal
    steps = [(50, 7), (-45, -5), (58, 4), (-42, -8), (55, 6)]
    offsets = [(-60, -3)]
    for dx, dy in steps:
        offsets.append((offsets[-1][0] + dx, offsets[-1][1] + dy))
    nominal = [(i * 200, 0) for i in range(6)]
    tex = grid_paper_texture((480, 1800), blotch=30, seed=3)
    tiles, truth = make_layout_set(tex, nominal, tile_size=(256, 400), offsets=offsets, noise_sigma=10, seed=13)
    res = evaluate_stitching(tiles, max_threads=1)
    assert all(p.status == "ok" for p in res.pairs), [(p.status, p.peak_ratio, p.distinctness) for p in res.pairs]
    assert any(p.peak_ratio < 1 for p in res.pairs)  # the overlap NCC overruled the strongest peak somewhere
    names = [t.name for t in tiles]
    err = np.abs(_relative(res.registered_positions, names) - _relative(truth, names))
    assert err.max() < 1.0
    assert res.passed and res.outliers == () and res.max_stage_deviation_px > 30  # imprecise stage, clean stitch


@pytest.mark.parametrize("jitter", [8, 16, 24, 32])
def test_clean_sets_pass_whatever_their_stage_error_up_to_a_third_of_the_overlap(jitter):
    # 400 px tiles at 30 % overlap: 120 px bands, so the automatic stage limit is 40 px
    ts = make_tile_set(_texture(), rows=3, cols=3, tile_size=400, overlap=0.3, jitter_px=jitter, seed=30 + jitter)
    res = evaluate_stitching(ts.tiles)
    assert all(p.status == "ok" for p in res.pairs)
    assert res.passed and res.score >= 60 and res.outliers == () and res.off_nominal == ()
    names = [t.name for t in ts.tiles]
    dev = np.array([f.deviation_from_nominal for f in res.fovs])
    truth = np.array([ts.offsets[n] for n in names], float)
    assert np.abs((dev - dev[0]) - (truth - truth[0])).max() < 1.0  # each FOV's stage error is reported
    stage = np.array([f.stage_deviation_px for f in res.fovs])
    assert np.allclose(stage, np.abs(dev).max(axis=1)) and res.max_stage_deviation_px == pytest.approx(
        stage.max(), abs=0.01
    )
    assert {f.stage_limit_px for f in res.fovs} == {40.0}
    assert jitter / 2 < res.max_stage_deviation_px <= 40.0
    assert res.summary()["max_stage_deviation_px"] == res.max_stage_deviation_px


def test_a_stage_off_nominal_past_its_limit_fails_and_names_the_fov():
    ts = make_tile_set(_texture(), rows=3, cols=3, tile_size=400, overlap=0.3, jitter_px=8, seed=40)
    loose = evaluate_stitching(ts.tiles)
    assert loose.passed
    strict = evaluate_stitching(ts.tiles, params=StitchingParams(stage_limit_px=loose.max_stage_deviation_px / 2))
    assert not strict.passed and strict.score < 60 and strict.criterion.stage_score < 60
    assert strict.outliers == ()  # the content is where its neighbours say: only the stage is off
    off = [f for f in strict.fovs if f.off_nominal]
    assert off and strict.off_nominal == tuple(f.name for f in off)
    assert all("off its nominal position" in f.reason for f in off)


def test_content_displaced_inside_a_tile_fails_and_names_it():
    import copy

    ts = make_tile_set(_texture(), jitter_px=4, seed=14, **GRID)
    centre = ts.tile(1, 1)
    slipped = copy.copy(centre.loader)  # the right half of the centre tile was taken 12, 9 px further on
    slipped.tx, slipped.ty = slipped.tx + 12, slipped.ty + 9
    half = centre.width // 2

    def torn():
        arr = centre.loader()
        arr[:, half:] = slipped()[:, half:]
        return arr

    tiles = [
        Tile(
            name=t.name,
            row=t.row,
            col=t.col,
            x=t.x,
            y=t.y,
            width=t.width,
            height=t.height,
            loader=torn if t is centre else t.loader,
        )
        for t in ts.tiles
    ]
    res = evaluate_stitching(tiles)
    assert any(p.status == "rejected" for p in res.pairs)
    assert not res.passed and res.score < 60
    assert centre.name in res.outliers
    bad = next(f for f in res.fovs if f.name == centre.name)
    assert "its content is not where its neighbours say" in bad.reason
