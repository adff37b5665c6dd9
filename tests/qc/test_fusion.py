"""Fusion: the stitched image written band by band as a tiled, pyramidal OME-TIFF, against the generator's mosaic."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import tifffile

from qc.io.model import Tile
from qc.stitching import evaluate_stitching, fuse_tiles
from qc.stitching.fusion import _halve
from qc.testing.tiles import make_tile_set, write_tile_configuration_folder
from tests.qc.stitching_helpers import stain_texture

GRID = {"rows": 3, "cols": 4, "tile_size": 256, "overlap": 0.2}


def _truth(tex: np.ndarray, ts, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The generator's mosaic in the fused frame, and which of its pixels some tile covers."""
    margin = int(np.abs(np.array(list(ts.offsets.values()))).max()) + 1
    x0 = int(min(p[0] for p in ts.true_positions.values()))
    y0 = int(min(p[1] for p in ts.true_positions.values()))
    covered = np.zeros((height, width), bool)
    for t in ts.tiles:
        x, y = (int(v) for v in ts.true_positions[t.name])
        covered[y - y0 : y - y0 + t.height, x - x0 : x - x0 + t.width] = True
    return tex[y0 + margin : y0 + margin + height, x0 + margin : x0 + margin + width], covered


@pytest.mark.parametrize("blend", ["linear", "nearest"])
def test_fused_image_is_the_generators_mosaic_pixel_for_pixel(tmp_path, blend):
    tex = stain_texture("DAPI", (1400, 1700), 21)  # uint16
    ts = make_tile_set(tex, jitter_px=6, seed=1, **GRID)
    res = fuse_tiles(ts.tiles, tmp_path / "m.ome.tif", positions=ts.true_positions, blend=blend, tile_px=128)
    with tifffile.TiffFile(res.path) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled and tif.pages[0].tilewidth == 128
        levels = [lvl.asarray() for lvl in tif.series[0].levels]
    img = levels[0]
    assert img.dtype == np.uint16 and img.shape == (res.height, res.width)
    truth, covered = _truth(tex, ts, res.width, res.height)
    np.testing.assert_array_equal(img[covered], truth[covered])
    assert not img[~covered].any()  # the corners jitter leaves uncovered are 0
    assert [lv.shape for lv in levels] == [tuple(s) for s in res.levels] and max(levels[-1].shape) <= 128
    half = cv2.resize(img, (levels[1].shape[1], levels[1].shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - levels[1].astype(int)).max() <= 1  # each level the area mean of the one above


def test_rgb_fused_at_registered_positions_matches_the_mosaic(tmp_path):
    tex = stain_texture("HE", (1400, 1700), 22)
    ts = make_tile_set(tex, jitter_px=5, seed=2, **GRID)
    reg = evaluate_stitching(ts.tiles).registered_positions
    res = fuse_tiles(ts.tiles, tmp_path / "he.ome.tif", positions=reg)
    img = tifffile.imread(res.path)
    assert img.dtype == np.uint8 and img.shape == (res.height, res.width, 3) and res.samples == 3
    truth, covered = _truth(tex, ts, res.width, res.height)
    same = np.all(img == truth, axis=2)[covered]
    assert same.mean() > 0.99  # registered within half a pixel: the same whole-pixel placement


@pytest.mark.parametrize("threads", [1, 2])
def test_fusion_decodes_each_tile_once_and_holds_only_the_rows_a_band_crosses_and_the_next(
    tmp_path, monkeypatch, threads
):
    from qc.stitching import fusion

    tex = stain_texture("DAPI", (1400, 1700), 21)
    ts = make_tile_set(tex, rows=5, cols=4, tile_size=200, overlap=0.2, seed=3)
    decoded: list[str] = []
    held = [0]  # most tiles decoded or being decoded at once

    def counted(t: Tile):
        def load():
            decoded.append(t.name)
            return t.read()

        return Tile(name=t.name, row=t.row, col=t.col, x=t.x, y=t.y, width=t.width, height=t.height, loader=load)

    load = fusion._Tiles.load

    def watched(self, indices, pool):
        load(self, indices, pool)
        held[0] = max(held[0], len(self.pixels) + len(self.pending))

    monkeypatch.setattr(fusion._Tiles, "load", watched)
    fuse_tiles([counted(t) for t in ts.tiles], tmp_path / "b.ome.tif", tile_px=64, threads=threads)
    assert sorted(decoded) == sorted(t.name for t in ts.tiles)  # each once
    # the two rows of tiles a band crosses, and with a file thread the row read ahead of the bands
    assert held[0] <= (2 if threads == 1 else 3) * 4


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_tile_folder_fuses_from_its_files_as_from_memory(tmp_path, threads):
    """Tiles read from their files into reused buffers, ahead of the bands: the same image as the in-memory tiles'."""
    from qc.io import open_image
    from qc.testing.tiles import write_tile_folder

    tex = stain_texture("DAPI", (1400, 1700), 24).astype(np.uint8)
    ts = make_tile_set(tex, jitter_px=6, seed=9, **GRID)
    folder = write_tile_folder(ts, tmp_path / "SS200000135TL_D1")
    want = fuse_tiles(ts.tiles, tmp_path / "memory.ome.tif", positions=ts.true_positions, tile_px=64, threads=1)
    with open_image(folder) as image:
        tiles = list(image.tiles)
        assert all(t.loader_into is not None for t in tiles)
        positions = {t.name: ts.true_positions[ts.tile(t.row, t.col).name] for t in tiles}
        got = fuse_tiles(tiles, tmp_path / "files.ome.tif", positions=positions, tile_px=64, threads=threads)
    assert (got.width, got.height, got.levels) == (want.width, want.height, want.levels)
    with tifffile.TiffFile(want.path) as a, tifffile.TiffFile(got.path) as b:
        for la, lb in zip(a.series[0].levels, b.series[0].levels, strict=True):
            np.testing.assert_array_equal(la.asarray(), lb.asarray())


def test_fuse_command_writes_a_tile_configuration_folder_and_refuses_what_it_cannot(tmp_path, capsys):
    from daemon.cli import main

    tex = stain_texture("DAPI", (1400, 1700), 21)
    ts = make_tile_set(tex, jitter_px=4, seed=4, **GRID)
    folder = write_tile_configuration_folder(ts.tiles, tmp_path / "tiles", names=[f"{i}.tif" for i in range(12)])
    out = tmp_path / "out" / "C02533C_DAPI.ome.tif"
    assert main(["fuse", str(folder), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "registered positions" in said and "12 tiles" in said
    truth, covered = _truth(tex, ts, *tifffile.imread(out).shape[::-1])
    assert (tifffile.imread(out)[covered] == truth[covered]).mean() > 0.99
    assert main(["fuse", str(folder), "--out", str(folder / "inside.ome.tif")]) == 2
    assert "inside the tile folder" in capsys.readouterr().err
    single = tmp_path / "one.tif"
    tifffile.imwrite(single, np.zeros((64, 64), np.uint8))
    assert main(["fuse", str(single), "--out", str(tmp_path / "x.ome.tif")]) == 2
    assert "is not a tile set" in capsys.readouterr().err


@pytest.mark.parametrize("compression", [None, "zlib", "zstd"])
def test_every_level_is_written_once_in_one_pass_and_reads_back_with_any_compression(tmp_path, compression):
    """The levels are interleaved in the file (no temporary copy); tifffile reads the same pyramid whatever the codec."""
    tex = stain_texture("DAPI", (1400, 1700), 21)
    ts = make_tile_set(tex, jitter_px=3, seed=6, **GRID)
    res = fuse_tiles(
        ts.tiles, tmp_path / "z.ome.tif", positions=ts.true_positions, tile_px=64, compression=compression,
        pixel_size_um=0.5,
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.ome.tif"]  # no partial or temporary file left
    with tifffile.TiffFile(res.path) as tif:
        page = tif.pages[0]
        assert tif.is_ome and tif.is_bigtiff and page.is_tiled and len(page.pages) == len(res.levels) - 1
        assert page.compression == {None: 1, "zlib": 8, "zstd": 50000}[compression]
        assert 'PhysicalSizeX="0.5"' in page.description
        levels = [lvl.asarray() for lvl in tif.series[0].levels]
    truth, covered = _truth(tex, ts, res.width, res.height)
    np.testing.assert_array_equal(levels[0][covered], truth[covered])
    assert [lv.shape for lv in levels] == [tuple(s) for s in res.levels] and max(levels[-1].shape) <= 64
    for upper, lower in itertools.pairwise(levels):  # halved band by band = halved whole
        np.testing.assert_array_equal(lower, _halve(upper))


@pytest.mark.parametrize("blend", ["linear", "nearest"])
def test_threads_change_nothing_in_the_image(tmp_path, blend):
    tex = stain_texture("HE", (1400, 1700), 23)
    ts = make_tile_set(tex, jitter_px=6, seed=7, **GRID)
    one = fuse_tiles(ts.tiles, tmp_path / "one.ome.tif", blend=blend, tile_px=64, threads=1)
    four = fuse_tiles(ts.tiles, tmp_path / "four.ome.tif", blend=blend, tile_px=64, threads=4)
    with tifffile.TiffFile(one.path) as a, tifffile.TiffFile(four.path) as b:
        for la, lb in zip(a.series[0].levels, b.series[0].levels, strict=True):
            np.testing.assert_array_equal(la.asarray(), lb.asarray())


def test_a_tile_that_cannot_be_read_leaves_no_file_behind(tmp_path):
    from qc.errors import QCError

    tex = stain_texture("DAPI", (1400, 1700), 21)
    ts = make_tile_set(tex, seed=8, **GRID)

    def broken():
        raise QCError("tile_0002_0001: the tile cannot be decoded")

    t = ts.tile(2, 1)
    bad = Tile(name=t.name, row=t.row, col=t.col, x=t.x, y=t.y, width=t.width, height=t.height, loader=broken)
    tiles = [bad if x.name == t.name else x for x in ts.tiles]
    (tmp_path / "m.ome.tif").write_bytes(b"an older file")
    with pytest.raises(QCError, match="cannot be decoded"):
        fuse_tiles(tiles, tmp_path / "m.ome.tif", tile_px=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ome.tif"]  # the partial file went, the old one stays
    assert (tmp_path / "m.ome.tif").read_bytes() == b"an older file"


def test_a_run_whose_stitching_did_not_run_is_fused_at_the_nominal_positions(tmp_path):
    """The QC output's fused image (issue #17 item 4) without a stitching result: where the microscope put each tile."""
    from qc.io import open_scan_set
    from qc.pipeline import fused_images
    from qc.report import ImageReport, QCReport
    from qc.testing.tiles import write_tile_folder

    tex = np.random.default_rng(5).integers(0, 255, (1000, 1300), dtype=np.uint8)
    ts = make_tile_set(tex, rows=2, cols=3, tile_size=400, overlap=0.1, jitter_px=5, seed=5)
    folder = write_tile_folder(ts, tmp_path / "SS200000135TL_D1")
    with open_scan_set([folder]) as scan:
        img = scan.images[0]
        facts = ImageReport(img.name, img.role, img.format, img.width, img.height, "uint8", img.fov_grid)
        report = QCReport(scan.chip, "ssDNA", "fail", (), (facts,), 1.0, "0", 0.0)
        listed, writers = fused_images(report, scan)
        assert listed == [
            {"image": img.name, "file": "ssDNA_fov_stitched.tif", "positions": "nominal", "blend": "linear"}
        ]
        writers["ssDNA_fov_stitched.tif"](tmp_path / "n.tif")
    fused = tifffile.imread(tmp_path / "n.tif")
    assert fused.shape == (360 + 400, 2 * 360 + 400)  # the nominal grid: a 360 px step
    for t in ts.tiles:  # each tile's own part (no neighbour overlaps it) is its pixels, where the grid says
        x, y = int(t.x), int(t.y)
        np.testing.assert_array_equal(fused[y + 40 : y + 360, x + 40 : x + 360], t.read()[40:360, 40:360])
