"""The incremental pair cache: what is recomputed, and when."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import tifffile

from qc.io.model import Tile
from qc.stitching import PAIR_ALGORITHM_VERSION, StitchingParams, evaluate_stitching
from qc.stitching.pair_cache import MemoryPairCache, PairCache, digest_key, pair_key
from qc.testing.tiles import make_tile_set, tiles_from_folder, write_tile_folder
from tests.qc.stitching_helpers import stain_texture

GRID = dict(rows=3, cols=4, tile_size=256, overlap=0.2)


def _tile_set(seed: int = 0, **kw):
    return make_tile_set(stain_texture("DAPI", (1000, 1200), 31), jitter_px=4, seed=seed, **GRID, **kw)


class CountingTiles:
    """Wraps tiles so every decode is counted (a warm run must decode nothing)."""

    def __init__(self, tiles):
        self.reads: dict[str, int] = {}
        self.lock = threading.Lock()
        self.tiles = [dataclasses.replace(t, loader=self._wrap(t)) for t in tiles]

    def _wrap(self, t: Tile):
        def load():
            with self.lock:
                self.reads[t.name] = self.reads.get(t.name, 0) + 1
            return t.read()

        return load


class GetPutOnly:
    """The minimal PairCache: no batch methods (the fallback path)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value


def test_second_run_computes_no_pair():
    ts = _tile_set()
    cache = MemoryPairCache()
    first = evaluate_stitching(ts.tiles, cache=cache)
    second = evaluate_stitching(ts.tiles, cache=cache)
    assert (first.pairs_total, first.pairs_computed, first.pairs_cached) == (17, 17, 0)
    assert (second.pairs_total, second.pairs_computed, second.pairs_cached) == (17, 0, 17)
    names = list(first.registered_positions)
    assert np.allclose(
        [second.registered_positions[n] for n in names], [first.registered_positions[n] for n in names], atol=1e-3
    )
    assert (second.score, second.passed, second.max_deviation_px) == (first.score, first.passed, first.max_deviation_px)
    assert all(p.cached for p in second.pairs)


def test_warm_run_on_a_tile_folder_decodes_and_hashes_nothing(tmp_path):
    folder = write_tile_folder(_tile_set(seed=1), tmp_path / "SS200000135TL_D1")
    cache = MemoryPairCache()
    cold = CountingTiles(tiles_from_folder(folder))
    r1 = evaluate_stitching(cold.tiles, cache=cache)
    assert r1.pairs_computed == 17
    assert set(cold.reads.values()) == {1}  # each tile decoded exactly once, digest included
    assert sum(k.startswith("digest:") for k in cache.keys()) == 12  # a MemoryPairCache is not iterable
    warm = CountingTiles(tiles_from_folder(folder))
    r2 = evaluate_stitching(warm.tiles, cache=cache)
    assert (r2.pairs_computed, r2.pairs_cached) == (0, 17)
    assert warm.reads == {}


def test_added_tile_computes_only_its_own_pairs(tmp_path):
    ts = _tile_set(seed=2)
    last = ts.tile(2, 3).name
    cache = MemoryPairCache()
    partial = evaluate_stitching([t for t in ts.tiles if t.name != last], cache=cache)
    assert partial.pairs_total == 15
    counted = CountingTiles(ts.tiles)
    full = evaluate_stitching(counted.tiles, cache=cache)
    assert (full.pairs_total, full.pairs_computed, full.pairs_cached) == (17, 2, 15)
    fresh = {(p.a, p.b) for p in full.pairs if not p.cached}
    assert fresh == {(ts.tile(2, 2).name, last), (ts.tile(1, 3).name, last)}
    # only the new tile and its two neighbours were decoded (in-memory tiles have digest functions)
    assert set(counted.reads) == {last, ts.tile(2, 2).name, ts.tile(1, 3).name}


def test_changed_tile_content_recomputes_exactly_its_pairs(tmp_path):
    folder = write_tile_folder(_tile_set(seed=3), tmp_path / "set")
    cache = MemoryPairCache()
    evaluate_stitching(tiles_from_folder(folder), cache=cache)
    path = sorted(folder.glob("*_0001_0001_*.tif"))[0]
    arr = tifffile.imread(path)
    arr[100:110, 100:110] = 0  # a re-export changed one tile
    tifffile.imwrite(path, arr)
    res = evaluate_stitching(tiles_from_folder(folder), cache=cache)
    assert res.pairs_computed == 4  # its left, right, upper and lower pairs
    assert all(path.name in (p.a, p.b) for p in res.pairs if not p.cached)


def test_changed_pair_parameters_invalidate_everything_scoring_parameters_nothing():
    ts = _tile_set(seed=4)
    cache = MemoryPairCache()
    evaluate_stitching(ts.tiles, cache=cache)
    rescored = evaluate_stitching(ts.tiles, cache=cache, params=StitchingParams(max_deviation_px=5.0))
    assert rescored.pairs_computed == 0
    changed = evaluate_stitching(ts.tiles, cache=cache, params=StitchingParams(lowpass_sigma_px=1.5))
    assert changed.pairs_computed == 17
    again = evaluate_stitching(ts.tiles, cache=cache, params=StitchingParams(lowpass_sigma_px=1.5))
    assert again.pairs_computed == 0
    back = evaluate_stitching(ts.tiles, cache=cache)
    assert back.pairs_computed == 0  # the old entries are still valid for the old parameters


def test_minimal_get_put_cache_works():
    ts = _tile_set(seed=5)
    cache = GetPutOnly()
    assert isinstance(cache, PairCache)
    evaluate_stitching(ts.tiles, cache=cache)
    assert evaluate_stitching(ts.tiles, cache=cache).pairs_computed == 0


def test_pair_key_changes_exactly_with_its_inputs():
    params = StitchingParams().pair_params()
    base = dict(
        digest_a="a" * 64,
        digest_b="b" * 64,
        direction="right",
        nominal_offset=(200, 0),
        params=params,
        version=PAIR_ALGORITHM_VERSION,
    )
    k0 = pair_key(**base)
    assert k0 == pair_key(**base) and k0.startswith("pair:")
    assert k0 == pair_key(**{**base, "params": dict(reversed(list(params.items())))})  # order-free
    variants = [
        {"digest_a": "c" * 64},
        {"digest_b": "c" * 64},
        {"direction": "down"},
        {"nominal_offset": (201, 0)},
        {"version": PAIR_ALGORITHM_VERSION + "x"},
        {"params": {**params, "min_peak_ratio": 2.5}},
        {"params": StitchingParams(max_shift_fraction=0.4).pair_params()},
    ]
    keys = {pair_key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) and k0 not in keys
    # scoring-only parameters are not part of a pair's key
    assert StitchingParams(max_deviation_px=3, min_clear_share=0.5).pair_params() == params
    assert digest_key("x|1|2") != digest_key("x|1|3")


def test_memory_cache_rejects_non_bytes():
    cache = MemoryPairCache()
    with pytest.raises(TypeError, match="bytes"):
        cache.put("k", "text")  # type: ignore[arg-type]
    cache.put_many({"a": b"1", "b": b"2"})
    assert cache.get_many(["a", "b", "c"]) == {"a": b"1", "b": b"2"}
    assert len(cache) == 2 and cache.hits == 2


def test_cached_results_are_identical_to_fresh_ones():
    ts = _tile_set(seed=6)
    cache = MemoryPairCache()
    fresh = evaluate_stitching(ts.tiles, cache=cache)
    cached = evaluate_stitching(ts.tiles, cache=cache)
    for a, b in zip(fresh.pairs, cached.pairs, strict=False):
        assert a.status == b.status
        assert np.allclose(a.measured_offset, b.measured_offset, atol=1e-3)
        assert a.quality == pytest.approx(b.quality, abs=1e-4)


def test_tile_file_digests_the_stitching_memoised_are_found_by_path_until_the_file_changes(tmp_path):
    """What lets the service record a tile set's inputs without hashing every file again (issue #18)."""
    import hashlib
    import os

    from qc.io import open_image
    from qc.stitching import memoised_file_digests

    folder = write_tile_folder(_tile_set(), tmp_path / "SS200000135TL_D1")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".tif")
    cache = MemoryPairCache()
    assert memoised_file_digests(cache, files) == {}
    with open_image(folder) as img:
        evaluate_stitching(list(img.tiles), cache=cache)
    others = [folder / "info.json", folder / "gone.tif"]
    found = memoised_file_digests(cache, files + others)
    assert found == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten: another identity
    assert set(memoised_file_digests(cache, files)) == set(files[1:])
