"""``imageqc fuse PATH --out FILE``: the stitched image of a tile set, as a tiled, pyramidal OME-TIFF.

The tiles are registered first (the stitching evaluation of ``imageqc qc``)
and placed at their registered positions; ``--nominal`` places them where
the microscope says instead. Exit codes: 0 written, 1 error, 2 usage.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from daemon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

__all__ = ["add_fuse_command", "cmd_fuse"]


def add_fuse_command(sub: Any) -> None:
    from daemon.qccmd import _overlap_arg

    sp = sub.add_parser(
        "fuse",
        help="Write the stitched image of a tile folder or CZI mosaic (tiled, pyramidal OME-TIFF).",
        description="Register the tiles of a tile folder or CZI mosaic and write the stitched image as a tiled, "
        "pyramidal OME-TIFF, streamed band by band (memory bounded by a few rows of tiles). "
        "Exit codes: 0 written, 1 error, 2 usage.",
    )
    sp.add_argument("path", metavar="PATH", help="a tile folder or a CZI mosaic")
    sp.add_argument("--out", metavar="FILE", required=True, help="the OME-TIFF to write, e.g. <SN>_DAPI.ome.tif")
    sp.add_argument(
        "--blend",
        choices=["linear", "nearest"],
        default="linear",
        help="overlaps: linear (weighted by distance to the tile edge; default) or nearest (a hard seam)",
    )
    sp.add_argument(
        "--nominal",
        action="store_true",
        help="place the tiles at their nominal (microscope) positions instead of the registered ones",
    )
    sp.add_argument(
        "--tile-overlap",
        metavar="X[,Y]",
        type=_overlap_arg,
        default=None,
        help="fractional tile overlap for tile folders whose files give no positions or overlap (default 0.1)",
    )
    sp.add_argument(
        "--tile-pattern",
        metavar="REGEX",
        default=None,
        help="regex with groups (?P<row>...) and (?P<col>...), or (?P<index>...), for tile names no "
        "built-in convention or TileConfiguration.txt knows",
    )
    sp.add_argument(
        "--compression",
        choices=["none", "zlib", "zstd"],
        default="none",
        help="TIFF compression (default none: fastest, as large as the tiles)",
    )
    sp.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads registering tile pairs, then fusing and writing the image (default 2)",
    )
    sp.set_defaults(func=cmd_fuse)


def cmd_fuse(args: Any) -> int:
    from daemon.config import tile_pattern_problem
    from qc.errors import QCError
    from qc.io import open_image
    from qc.stitching import fuse_tiles

    path = Path(args.path)
    if args.tile_pattern:
        problem = tile_pattern_problem(args.tile_pattern)
        if problem:
            print(f"imageqc fuse: --tile-pattern {args.tile_pattern!r}: {problem}", file=sys.stderr)
            return EXIT_USAGE
    out = Path(args.out)
    if out.resolve().is_relative_to(path.resolve()) and path.is_dir():
        print(
            f"imageqc fuse: --out {out} lies inside the tile folder {path}; write it elsewhere "
            "(imageqc never writes into the microscope's folders)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        with open_image(path, tile_pattern=args.tile_pattern, tile_overlap=args.tile_overlap) as image:
            tiles = list(image.tiles or ())
            if len(tiles) < 2:
                print(f"imageqc fuse: {path} is not a tile set (a stitched image needs no fusion)", file=sys.stderr)
                return EXIT_USAGE
            positions = None
            how = "nominal positions"
            if not args.nominal:
                from qc.stitching import evaluate_stitching

                res = evaluate_stitching(tiles, max_threads=max(1, args.threads))
                positions = res.registered_positions
                how = f"registered positions (stitching score {res.score:.0f}, largest stage deviation {res.max_stage_deviation_px:.1f} px)"
            result = fuse_tiles(
                tiles,
                out,
                positions=positions,
                blend=args.blend,
                compression=None if args.compression == "none" else args.compression,
                threads=max(1, args.threads),
                pixel_size_um=image.pixel_size_um,
            )
    except QCError as e:
        print(f"imageqc fuse: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(
            f"imageqc fuse: cannot write {out}: {e.strerror or e}; check the folder and the free space", file=sys.stderr
        )
        return EXIT_FAILURE
    print(
        f"wrote {result.path}: {result.width} x {result.height} px, {result.dtype}"
        f"{' RGB' if result.samples == 3 else ''}, {len(result.levels)} pyramid levels, {result.blend} blending, "
        f"{result.tiles} tiles at their {how}, in {result.seconds:.1f} s"
    )
    return EXIT_OK
