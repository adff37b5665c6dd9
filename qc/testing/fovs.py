"""Tile sets cut from a synthetic chip, with per-FOV defects, for live QC's tests and benchmarks.

:func:`chip_tile_set` renders a chip (:func:`qc.testing.chips.generate_chip`) just large enough for
a grid of overlapping tiles, cuts the tiles (:func:`qc.testing.tiles.make_tile_set`) and can spoil
chosen ones as a bad acquisition would: rows out of focus (Gaussian blur), over-exposed rows (gain
with clipping), or a chip without track lines. The tiles load lazily and deterministically, so
:func:`qc.testing.tiles.write_tile_folder` can write them to disk one by one, as a microscope would.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, replace

import cv2
import numpy as np

from qc.io.model import Tile
from qc.testing.chips import ChipTruth, generate_chip
from qc.testing.tiles import GeneratedTileSet, make_tile_set

__all__ = ["ChipTileSet", "chip_tile_set"]


@dataclass(frozen=True)
class ChipTileSet:
    """Tiles of a synthetic chip and what is known about them.

    Attributes
    ----------
    tiles : tuple of Tile
        Row-major; each loads its pixels on demand (a spoiled tile is spoiled in its loader).
    tile_set : GeneratedTileSet
        Geometry and truth of the cut (positions, offsets); its tiles are the unspoiled ones.
    truth : ChipTruth
        The chip's truth; the grid angle is ``truth.angle_deg`` in every tile.
    blurred, saturated : tuple of str
        Names of the spoiled tiles.
    um_per_px : float
        The pixel size that gives the chip's scale for its template (for ``FovParams``).
    """

    tiles: tuple[Tile, ...]
    tile_set: GeneratedTileSet
    truth: ChipTruth
    blurred: tuple[str, ...]
    saturated: tuple[str, ...]
    um_per_px: float

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return (self.tile_set.rows, self.tile_set.cols)

    def tile(self, row: int, col: int) -> Tile:
        """The tile at grid index ``(row, col)``."""
        return self.tiles[row * self.tile_set.cols + col]


class _Spoiled:
    """A tile loader that blurs or over-exposes what the inner loader gives (deterministic)."""

    def __init__(self, inner: Tile, blur_sigma: float, gain: float) -> None:
        self.inner, self.blur_sigma, self.gain = inner, blur_sigma, gain

    def __call__(self) -> np.ndarray:
        arr = self.inner.read()
        dtype = arr.dtype
        top = float(np.iinfo(dtype).max)
        work: np.ndarray = arr.astype(np.float32)
        if self.blur_sigma > 0:
            work = cv2.GaussianBlur(work, (0, 0), self.blur_sigma)
        if self.gain != 1.0:
            work = work * np.float32(self.gain)
        result: np.ndarray = np.clip(np.rint(work), 0, top).astype(dtype)
        return result


def chip_tile_set(
    *,
    rows: int = 3,
    cols: int = 3,
    tile_size: int = 1024,
    overlap: float = 0.1,
    scale: float = 1.0,
    angle_deg: float = 0.3,
    no_lines: bool = False,
    blurred_rows: Collection[int] = (),
    blur_sigma: float = 4.0,
    saturated_rows: Collection[int] = (),
    saturation_gain: float = 6.0,
    jitter_px: int = 2,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    **chip: object,
) -> ChipTileSet:
    """Cut a ``rows x cols`` grid of tiles from a synthetic chip, spoiling some.

    Parameters
    ----------
    rows, cols, tile_size, overlap :
        The grid (square tiles of ``tile_size`` px, ``overlap`` of a tile shared with a neighbour).
    scale, angle_deg :
        The chip's scale (px per DNB; 1.0 is 0.5 um/px on SS2) and track-grid angle.
    no_lines : bool
        A chip without track lines.
    blurred_rows : collection of int
        Grid rows whose tiles are out of focus (Gaussian blur of ``blur_sigma`` px).
    saturated_rows : collection of int
        Grid rows whose tiles are over-exposed (gain ``saturation_gain``, clipped at the dtype's maximum).
    jitter_px, seed :
        Stage jitter of the cut and the seed of chip and cut.
    data_dir : path, optional
        The shared data folder with the stain crops.
    **chip :
        Any other :func:`generate_chip` parameter (``tissue_fraction``, ``dtype``, ``stain``...).
        By default tissue covers most of the chip (so clarity has windows to score).

    Returns
    -------
    ChipTileSet
    """
    step = round(tile_size * (1 - overlap))
    margin = jitter_px + 2
    width = (cols - 1) * step + tile_size + 2 * margin + 2
    height = (rows - 1) * step + tile_size + 2 * margin + 2
    params: dict[str, object] = {"tissue_fraction": 0.8, **chip}
    params.update(width=width, height=height, scale=scale, angle_deg=angle_deg, lines=not no_lines, seed=seed)
    gen = generate_chip(data_dir=data_dir, **params)  # type: ignore[arg-type]
    cut = make_tile_set(gen.image, rows=rows, cols=cols, tile_size=tile_size, overlap=overlap, jitter_px=jitter_px,
                        seed=seed)  # fmt: skip
    blurred, saturated = set(blurred_rows), set(saturated_rows)
    tiles: list[Tile] = []
    for t in cut.tiles:
        sigma = blur_sigma if t.row in blurred else 0.0
        gain = saturation_gain if t.row in saturated else 1.0
        if sigma or gain != 1.0:
            spoiled = _Spoiled(t, sigma, gain)
            t = replace(t, loader=spoiled, digest_fn=None)
        tiles.append(t)
    template_pitch_um = gen.truth.grid.template.pitch_nm / 1000.0
    return ChipTileSet(
        tiles=tuple(tiles),
        tile_set=cut,
        truth=gen.truth,
        blurred=tuple(t.name for t in tiles if t.row in blurred),
        saturated=tuple(t.name for t in tiles if t.row in saturated),
        um_per_px=template_pitch_um / scale,
    )
