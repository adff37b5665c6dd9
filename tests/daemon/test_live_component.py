"""The live QC component on its own (daemon/live.py), driven round by round on a real folder and store.

No thread and no discovery: the test hands the component its growing folder and calls one round at a
time, so what a round may do (check written tiles only, once; redo a rewritten tile and only its
pairs; skip ahead when behind; keep a bounded memory) is checked exactly. The whole service with
microscopes writing is in test_live.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.config import load_config_text
from daemon.live import Growing, LiveQC
from daemon.store import Store
from qc.testing.scan import scan_tiles, tiff_bytes

ROWS, COLS, TILE = 3, 4, 512
PAIRS = ROWS * (COLS - 1) + COLS * (ROWS - 1)


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def tiles():
    return scan_tiles("good", rows=ROWS, cols=COLS, tile=TILE, seed=21)


@pytest.fixture
def live(tmp_path):
    text = (
        'state_dir = "state"\n[[watch]]\npath = "inbox"\n[logging]\nconsole = "off"\n'
        '[live]\npriority = "normal"\ntile_settle_s = 1\nmemory_mb = 16\n'
    )
    (tmp_path / "inbox").mkdir()
    cfg = load_config_text(text, file=str(tmp_path / "imageqc.toml"), base=tmp_path)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.database_path)
    folder = tmp_path / "inbox" / "C02533C"
    folder.mkdir()
    (folder / "info.json").write_text(json.dumps({"rows": ROWS, "cols": COLS, "overlap": 0.1}))
    growing = [Growing(chip="C02533C", folder=str(folder), watch=cfg.watch[0], since=1.0)]
    comp = LiveQC(cfg, growing=lambda: growing)
    clock = _Clock()
    comp._store, comp._clock = store, clock
    comp.tick(clock())

    def round_after(seconds: float = 0.0) -> dict:
        clock.t += seconds
        comp._round()
        return comp.health()["sets"][0] if comp.health()["sets"] else {}

    comp.round_after = round_after  # type: ignore[attr-defined]
    comp.folder = folder  # type: ignore[attr-defined]
    yield comp
    store.close()


def _name(r: int, c: int) -> str:
    return f"FOV_{r:04d}_{c:04d}_20261203120000.tif"


def _write(folder: Path, r: int, c: int, px: np.ndarray, *, part: float = 1.0) -> None:
    data = tiff_bytes(px)
    (folder / _name(r, c)).write_bytes(data[: int(len(data) * part)])


def test_a_tile_is_checked_once_its_file_is_written_and_whole_and_never_twice(live, tiles):
    r, c, px = tiles[0]
    _write(live.folder, r, c, px, part=0.5)  # half written
    s = live.round_after(0)
    assert s["fovs_checked"] == 0
    s = live.round_after(5)  # unchanged but not whole: a TIFF cut short is never checked
    assert s["fovs_checked"] == 0 and s["error"] is None, s
    _write(live.folder, r, c, px)
    s = live.round_after(0)  # just changed: wait for tile_settle_s
    assert s["fovs_checked"] == 0
    s = live.round_after(2)
    assert s["fovs_checked"] == 1 and s["fovs_computed"] == 1, s
    s = live.round_after(2)
    assert s["fovs_computed"] == 1, "a checked tile is never checked again"


def test_neighbours_are_registered_as_tiles_arrive_and_a_rewritten_tile_redoes_only_its_pairs(live, tiles):
    for batch in (tiles[: 2 * COLS], tiles[2 * COLS :]):  # two rows at a time: never behind
        for r, c, px in batch:
            _write(live.folder, r, c, px)
        live.round_after(0)
        s = live.round_after(2)
    assert s["fovs_checked"] == ROWS * COLS and s["pairs"] == PAIRS, s
    assert s["pairs_computed"] == PAIRS and s["skipped"] == 0
    r, c, px = tiles[COLS + 1]  # (1, 1): four neighbours
    time.sleep(0.01)
    _write(live.folder, r, c, np.clip(px.astype(np.int16) + 5, 0, 255).astype(px.dtype))
    live.round_after(0)
    s = live.round_after(2)
    assert s["rewritten"] == 1 and s["fovs_computed"] == ROWS * COLS + 1, s
    assert s["pairs_computed"] == PAIRS + 4 and s["pairs"] == PAIRS, s


def test_the_same_content_elsewhere_comes_from_the_cache(live, tiles):
    for r, c, px in tiles[:COLS]:
        _write(live.folder, r, c, px)
    live.round_after(0)
    first = live.round_after(2)
    assert first["fovs_computed"] == COLS and first["pairs_computed"] == COLS - 1
    other = live.folder.parent / "C02533C_again"
    other.mkdir()
    (other / "info.json").write_text((live.folder / "info.json").read_text())
    for r, c, px in tiles[:COLS]:
        _write(other, r, c, px)
    live._growing = lambda: [Growing(chip="C02533C", folder=str(other), watch=live.config.watch[0], since=2.0)]
    live.tick(live._clock())
    live.round_after(0)
    s = next(x for x in (live.round_after(2), *live.health()["sets"]) if x["folder"] == str(other))
    assert s["fovs_checked"] == COLS and s["fovs_computed"] == 0 and s["fovs_cached"] == COLS, s
    assert s["pairs_computed"] == 0 and s["pairs_cached"] == COLS - 1, s


def test_when_behind_it_skips_to_the_newest_tiles_and_keeps_its_memory_bound(live, tiles):
    big = scan_tiles("good", rows=4, cols=2, tile=TILE, seed=22)  # 8 tiles: more than two rows of 2 waiting
    (live.folder / "info.json").write_text(json.dumps({"rows": 4, "cols": 2, "overlap": 0.1}))
    for r, c, px in big:
        _write(live.folder, r, c, px)
        time.sleep(0.002)  # distinct modification times: the acquisition order
    live.round_after(0)
    s = live.round_after(2)
    assert s["skipped"] == 4 and s["fovs_checked"] == 4, s
    checked = sorted(live._sets[str(live.folder)].checks)
    assert checked == sorted(_name(r, c) for r, c, _ in big[4:]), checked
    ls = live._sets[str(live.folder)]
    assert ls.decoded_bytes <= live.config.live.memory_mb * 2**20


def test_a_folder_that_is_no_longer_growing_ends_its_live_set_and_frees_its_tiles(live, tiles):
    for r, c, px in tiles[:2]:
        _write(live.folder, r, c, px)
    live.round_after(0)
    live.round_after(2)
    live._growing = list
    live.tick(live._clock())
    s = live.round_after(0)
    assert s["finished_at"] is not None and s["fovs_checked"] == 2
    assert not live._sets[str(live.folder)].decoded


def test_an_if_folder_gets_its_pairs_registered_live_and_no_fov_checks(live, tiles):
    """The final QC of a DAPI + IF tile set finds the IF image's pairs in the cache too, and its tile files'
    digests (the inputs' record); an IF image has no track lines, so it gets no FOV checks or warnings."""
    from daemon.paircache import StorePairCache
    from qc.io import open_image
    from qc.stitching import evaluate_stitching, memoised_file_digests

    folder = live.folder.parent / "C02533C_CD31_IF"
    folder.mkdir()
    (folder / "info.json").write_text((live.folder / "info.json").read_text())
    g = Growing(chip="C02533C", folder=str(folder), watch=live.config.watch[0], since=3.0, fov_checks=False)
    live._growing = lambda: [g]
    live.tick(live._clock())
    for batch in (tiles[: 2 * COLS], tiles[2 * COLS :]):  # two rows at a time: never behind
        for r, c, px in batch:
            _write(folder, r, c, 255 - px)  # another picture of the same FOVs
        live.round_after(0)
        live.round_after(2)
    s = next(x for x in live.health()["sets"] if x["folder"] == str(folder))
    assert s["fov_checks"] is False and s["fovs_checked"] == ROWS * COLS, s
    assert s["fovs_computed"] == 0 and s["fovs_with_lines"] == 0 and s["warnings"] == [], s
    assert s["pairs"] == PAIRS and s["pairs_computed"] == PAIRS, s
    cache = StorePairCache(live._store)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".tif")
    assert set(memoised_file_digests(cache, files)) == set(files)
    with open_image(folder) as img:
        res = evaluate_stitching(list(img.tiles), cache=cache)
    assert res.pairs_computed == 0 and res.pairs_cached == PAIRS
