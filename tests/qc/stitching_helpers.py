"""Tile builders for the real stitching fixtures: the stitch2d JPEG tiles and ``mosaic_test.czi``.

The stitch2d folder carries no stage positions, so its nominal grid comes from
an overlap guess given here; the CZI tiles come from :mod:`qc.io`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import cv2
import numpy as np
import tifffile

from qc.io.model import Tile
from qc.testing.tiles import mosaic_texture
from tests.helpers import require_shared_data


def shared_data() -> Path:
    """The shared reference data (:func:`tests.helpers.require_shared_data`), for helpers called outside fixtures."""
    return require_shared_data()


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def stitch2d_tiles(overlap: float = 0.2) -> tuple[list[Tile], dict[str, tuple[float, float]]]:
    """The six stitch2d SEM tiles and their expected positions ``{name: (x, y)}``.

    The files carry no stage positions, so the nominal grid assumes a uniform
    ``overlap`` guess; ``Grid@A B`` is column A, row B.
    """
    folder = shared_data() / "tiles" / "stitch2d"
    spec = json.loads((folder / "expected_params_from_test_stitch2d.json").read_text())
    th, tw = spec["metadata"]["tile_shape"]
    step_x, step_y = round(tw * (1 - overlap)), round(th * (1 - overlap))
    tiles, expected = [], {}
    for idx, fname in spec["filenames"].items():
        col, row = (int(v) for v in re.search(r"Grid@(\d+) (\d+)", fname).groups())
        path = folder / fname
        tiles.append(
            Tile(
                name=fname,
                row=row,
                col=col,
                x=float(col * step_x),
                y=float(row * step_y),
                width=tw,
                height=th,
                loader=lambda p=path: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE),
                identity=_identity(path),
            )
        )
        y, x = spec["coords"][idx]
        expected[fname] = (float(x), float(y))
    return tiles, expected


def czi_mosaic_tiles(path: Path) -> list[Tile]:
    """Each mosaic sub-block of a CZI as a tile at its stage position, channel 0 (the real reader)."""
    from qc.io import open_image

    image = open_image(path)
    tiles = image.tiles
    assert tiles, f"{path} is not a mosaic"
    return list(tiles)


@functools.lru_cache(maxsize=8)
def stain_texture(stain: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A large read-only texture blended from the real ``stereo_crops/<stain>`` crop."""
    crop = tifffile.imread(next((shared_data() / "stereo_crops" / stain / "input").glob("*.tif")))
    tex = mosaic_texture([crop], shape, seed=seed)
    tex.setflags(write=False)
    return tex
