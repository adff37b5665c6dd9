"""Stitching: how well the tiles of a tile set (tile folder, CZI mosaic) fit together, and the fused image.

>>> from qc.stitching import MemoryPairCache, evaluate_stitching, fuse_tiles
>>> result = evaluate_stitching(scan.nuclear.tiles, cache=MemoryPairCache())  # doctest: +SKIP
>>> fuse_tiles(scan.nuclear.tiles, "mosaic.ome.tif", positions=result.registered_positions)  # doctest: +SKIP

Modules (the public names are the ones below; the modules' other names are internal):

- :mod:`qc.stitching.evaluate`: :func:`evaluate_stitching`, its parameters, criterion and results;
- :mod:`qc.stitching.pairs`: which neighbouring FOVs to register, how, and how their results are cached;
- :mod:`qc.stitching.solve`: globally consistent tile positions from the pairwise offsets;
- :mod:`qc.stitching.pair_cache`: the pair cache as an interface (:class:`PairCache`); the service backs
  it with its SQLite store, notebooks and tests use :class:`MemoryPairCache`;
- :mod:`qc.stitching.fusion`: :func:`fuse_tiles`, the stitched image as a tiled pyramidal OME-TIFF;
- :mod:`qc.stitching.preview`: :func:`fused_preview`, the fused view at a picture's scale from tiles
  reduced while QC read them.

The registration primitives (phase correlation, overlap NCC) are shared with calibration and live in
:mod:`qc.registration`.
"""

from qc.stitching.evaluate import (
    FovResult,
    PairResult,
    StitchingCriterion,
    StitchingParams,
    StitchingResult,
    evaluate_stitching,
    tile_configuration_text,
)
from qc.stitching.fusion import BLENDS, FusionResult, fuse_tiles
from qc.stitching.pair_cache import MemoryPairCache, PairCache, memoised_file_digests
from qc.stitching.pairs import PAIR_ALGORITHM_VERSION
from qc.stitching.preview import fused_preview

__all__ = [
    "BLENDS",
    "PAIR_ALGORITHM_VERSION",
    "FovResult",
    "FusionResult",
    "MemoryPairCache",
    "PairCache",
    "PairResult",
    "StitchingCriterion",
    "StitchingParams",
    "StitchingResult",
    "evaluate_stitching",
    "fuse_tiles",
    "fused_preview",
    "memoised_file_digests",
    "tile_configuration_text",
]
