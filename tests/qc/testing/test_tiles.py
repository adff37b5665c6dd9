"""The tile-set generator: geometry, ground truth, folders, textures."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile

from qc.io.model import array_digest
from qc.testing.tiles import (
    TILE_NAME_RE,
    blob_texture,
    make_tile_set,
    mosaic_texture,
    tiles_from_folder,
    write_tile_folder,
)
from tests.qc.stitching_helpers import stain_texture


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    return stain_texture("DAPI", (900, 1100), 51)


def test_geometry_and_ground_truth(texture):
    ts = make_tile_set(texture, rows=3, cols=4, tile_size=(200, 240), overlap=0.15, jitter_px=6, seed=1)
    assert (ts.step_x, ts.step_y) == (204, 170)
    assert len(ts.tiles) == 12 and ts.tile(2, 1).name == "tile_0002_0001"
    for t in ts.tiles:
        assert (t.x, t.y) == (t.col * 204, t.row * 170)
        assert (t.width, t.height) == (240, 200)
        dx, dy = ts.offsets[t.name]
        assert abs(dx) <= 6 and abs(dy) <= 6
        assert ts.true_positions[t.name] == (t.x + dx, t.y + dy)
        assert t.read().shape == (200, 240) and t.read().dtype == texture.dtype
    assert len({ts.offsets[t.name] for t in ts.tiles}) > 6  # jitter differs per tile


def test_overlaps_show_the_same_content_at_the_true_offset(texture):
    ts = make_tile_set(texture, rows=2, cols=2, tile_size=256, overlap=0.2, jitter_px=5, seed=2)
    a, b = ts.tile(0, 0), ts.tile(0, 1)
    (ax, ay), (bx, by) = ts.true_positions[a.name], ts.true_positions[b.name]
    ox, oy = int(bx - ax), int(by - ay)
    pa, pb = a.read(), b.read()
    y0, y1 = max(0, oy), min(256, 256 + oy)
    assert np.array_equal(pa[y0:y1, ox:], pb[y0 - oy : y1 - oy, : 256 - ox])


def test_seeded_and_reproducible(texture):
    one = make_tile_set(texture, rows=2, cols=3, tile_size=200, jitter_px=4, seed=3, noise_sigma=50)
    two = make_tile_set(texture, rows=2, cols=3, tile_size=200, jitter_px=4, seed=3, noise_sigma=50)
    other = make_tile_set(texture, rows=2, cols=3, tile_size=200, jitter_px=4, seed=4, noise_sigma=50)
    assert one.offsets == two.offsets and one.offsets != other.offsets
    assert [t.digest() for t in one.tiles] == [t.digest() for t in two.tiles]
    assert one.tiles[0].digest() == array_digest(one.tiles[0].read())


def test_misplaced_and_featureless_options(texture):
    ts = make_tile_set(
        texture,
        rows=3,
        cols=3,
        tile_size=200,
        jitter_px=2,
        seed=5,
        misplaced=(1, 1),
        misplace_px=(30, -20),
        featureless=[(0, 2)],
        noise_sigma=3,
    )
    assert ts.misplaced == "tile_0001_0001"
    dx, dy = ts.offsets[ts.misplaced]
    assert 28 <= dx <= 32 and -22 <= dy <= -18
    assert ts.featureless == ("tile_0000_0002",)
    flat = ts.tile(0, 2).read().astype(float)
    assert flat.std() < 5  # background plus noise only
    left = ts.tile(0, 1).read().astype(float)
    assert left[:, -30:].std() < 5 and left[:, :100].std() > 5 * flat.std()


def test_texture_too_small_is_refused(texture):
    with pytest.raises(ValueError, match="too small"):
        make_tile_set(texture, rows=5, cols=5, tile_size=300)


def test_tile_folder_round_trip(texture, tmp_path):
    ts = make_tile_set(texture, rows=2, cols=3, tile_size=200, overlap=0.1, jitter_px=3, seed=6)
    folder = write_tile_folder(ts, tmp_path / "C02533C", prefix="C02533C")
    names = sorted(p.name for p in folder.glob("*.tif"))
    assert names[0] == "C02533C_0000_0000_20240101120000.tif" and len(names) == 6
    assert all(TILE_NAME_RE.match(n) for n in names)
    info = json.loads((folder / "info.json").read_text())
    assert (info["rows"], info["cols"], info["overlap"]) == (2, 3, 0.1)
    back = tiles_from_folder(folder)
    assert [(t.row, t.col, t.x, t.y) for t in back] == [(t.row, t.col, t.x, t.y) for t in ts.tiles]
    for mine, theirs in zip(ts.tiles, back, strict=False):
        assert np.array_equal(mine.read(), theirs.read())
    ident = back[0].identity
    path = folder / names[0]
    tifffile.imwrite(path, np.zeros((200, 200), texture.dtype))
    os.utime(path, ns=(1, 1))
    assert tiles_from_folder(folder)[0].identity != ident


def test_textures_are_deterministic_any_dtype_and_colour(tmp_path):
    crop = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    rgb = mosaic_texture([crop], (300, 400), seed=1, piece_px=96)
    assert rgb.shape == (300, 400, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, mosaic_texture([crop], (300, 400), seed=1, piece_px=96))
    with pytest.raises(ValueError, match="smaller than piece_px"):
        mosaic_texture([crop[:50, :50]], (100, 100))
    mm = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.uint16, shape=(700, 300))
    blob_texture((700, 300), seed=2, dtype=np.uint16, out=mm, band_rows=256)
    assert np.array_equal(np.asarray(mm), blob_texture((700, 300), seed=2, dtype=np.uint16, band_rows=256))
    assert mm.std() > 100
