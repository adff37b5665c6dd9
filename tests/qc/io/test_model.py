"""The Image contract's defaults (read_region, channel_index, tiles_for) and the area-mean reducers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qc.io._mosaic import assemble, owned_rects, reduce_tiles
from qc.io._reduce import BandReducer, block_mean
from qc.io.model import Image, Tile


class ArrayImage(Image):
    """A minimal in-memory Image: only plane() and downsampled() implemented."""

    format = "tiff"

    def __init__(self, planes: list[np.ndarray], channels: tuple[str, ...]) -> None:
        self.planes, self.channels = planes, channels
        self.name, self.path, self.role = "x", Path("x.tif"), "nuclear"
        self.height, self.width = planes[0].shape[:2]
        self.dtype, self.pixel_size_um = planes[0].dtype, None

    def plane(self, channel=0):
        return self.planes[self.channel_index(channel)]

    def downsampled(self, factor, channel=0):
        return block_mean(self.plane(channel), factor)


def test_default_read_region_and_channels():
    a = np.arange(200, dtype=np.uint16).reshape(10, 20)
    img = ArrayImage([a, a + 1], ("DAPI", "GFP"))
    region = img.read_region(3, 2, 5, 4, channel="GFP")
    np.testing.assert_array_equal(region, (a + 1)[2:6, 3:8])
    assert region.base is None or not np.shares_memory(region, img.planes[1])
    assert img.channel_index("GFP") == 1 and img.channel_index(np.int64(0)) == 0
    assert img.tiles_for("DAPI") is None and img.tiles is None
    for bad in ("RFP", 2, -1, True):
        with pytest.raises(ValueError, match="no channel"):
            img.channel_index(bad)
    with pytest.raises(ValueError, match="not inside"):
        img.read_region(18, 0, 5, 5)


def test_rgb_has_one_colour_plane():
    img = ArrayImage([np.zeros((4, 4, 3), np.uint8)], ("R", "G", "B"))
    assert img.channel_index(0) == 0
    with pytest.raises(ValueError, match="colour plane"):
        img.channel_index("G")


@settings(max_examples=60, deadline=None)
@given(
    arr=arrays(np.uint16, st.tuples(st.integers(1, 40), st.integers(1, 40))),
    factor=st.integers(1, 9),
    cuts=st.lists(st.integers(1, 15), min_size=1, max_size=6),
)
def test_band_reducer_matches_block_mean(arr, factor, cuts):
    expected = arr.reshape(arr.shape).astype(np.float64)
    oh, ow = -(-arr.shape[0] // factor), -(-arr.shape[1] // factor)
    ref = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            ref[i, j] = expected[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].mean()
    np.testing.assert_array_equal(block_mean(arr, factor), np.rint(ref).astype(np.uint16))
    reducer = BandReducer(arr.shape[0], arr.shape[1], factor, arr.dtype)
    y, k = 0, 0
    while y < arr.shape[0]:
        step = cuts[k % len(cuts)]
        reducer.feed(arr[y : y + step])
        y, k = y + step, k + 1
    np.testing.assert_array_equal(reducer.finish(), block_mean(arr, factor))


@settings(max_examples=40, deadline=None)
@given(
    positions=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), min_size=1, max_size=5),
    factor=st.integers(1, 7),
    seed=st.integers(0, 1000),
)
def test_mosaic_reduction_equals_reducing_the_assembly(positions, factor, seed):
    rng = np.random.default_rng(seed)
    tiles = []
    for i, (x, y) in enumerate(positions):
        arr = rng.integers(0, 255, (13, 17), dtype=np.uint8)
        tiles.append(Tile(str(i), 0, i, float(x), float(y), 17, 13, loader=lambda a=arr: a))
    w = max(x for x, _ in positions) + 17
    h = max(y for _, y in positions) + 13
    full = assemble(tiles, 0, 0, w, h, np.uint8, None)
    np.testing.assert_array_equal(reduce_tiles(tiles, w, h, factor, np.uint8, None), block_mean(full, factor))


@settings(max_examples=60, deadline=None)
@given(
    boxes=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(1, 30), st.integers(1, 30)),
        min_size=1,
        max_size=9,
    ),
    window=st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(1, 60), st.integers(1, 60)),
    seed=st.integers(0, 1000),
)
def test_tiles_placed_at_once_on_threads_are_the_mosaic_placed_in_order(boxes, window, seed):
    """Each thread writes only what no later tile covers: any overlap, any window, the painter's result."""
    rng = np.random.default_rng(seed)
    tiles, painted = [], np.zeros((120, 120), np.uint8)
    for i, (x, y, w, h) in enumerate(boxes):
        arr = rng.integers(1, 255, (h, w), dtype=np.uint8)
        tiles.append(Tile(str(i), 0, i, float(x), float(y), w, h, loader=lambda a=arr: a))
        painted[y : y + h, x : x + w] = arr
    wx, wy, ww, wh = window
    seen = []
    got = assemble(tiles, wx, wy, ww, wh, np.uint8, None, threads=3, on_tile=lambda t, px: seen.append(t.name))
    np.testing.assert_array_equal(got, painted[wy : wy + wh, wx : wx + ww])
    touching = [t.name for t in tiles if t.x < wx + ww and t.y < wy + wh and t.x + t.width > wx and t.y + t.height > wy]
    assert sorted(seen) == sorted(touching)  # each handed over once (on the thread that decoded it)
    # what each tile writes, written last tile first: still the painter's result (no thread timing involved)
    owned = owned_rects([(x, y, x + w, y + h) for x, y, w, h in boxes], (wx, wy, wx + ww, wy + wh))
    backwards = np.zeros((wh, ww), np.uint8)
    for t, rects in reversed(list(zip(tiles, owned, strict=True))):
        px, tx, ty = t.read(), int(t.x), int(t.y)
        for x0, y0, x1, y1 in rects:
            backwards[y0 - wy : y1 - wy, x0 - wx : x1 - wx] = px[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
    np.testing.assert_array_equal(backwards, painted[wy : wy + wh, wx : wx + ww])
