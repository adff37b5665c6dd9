"""Benchmark: fusing a tile folder into a tiled, pyramidal OME-TIFF, beside the time to read its tiles.

Default: 20 x 20 tiles of 2048^2 uint8 at 10 % overlap with 5 px stage jitter
(a 37k^2 mosaic), written as a tile folder of TIFFs to a temporary
directory; ``--quick``: 6 x 6 tiles of 1024^2. Reports the time to decode
every tile once, the fusion's wall time (linear blending, at the tiles' true
positions so only the fusion is timed), the peak RSS sampled during each, and
checks the fused image against the generator's mosaic on a sample of rows.

    python benchmarks/bench_fusion.py [--quick] [--no-record]

Target (issue #17): within twice the read time, peak memory under 1.5 GB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, publish
from bench_stitching import PeakRSS, write_bench_tiles

from qc.stitching import fuse_tiles
from qc.testing.tiles import tiles_from_folder

SECTION = "bench_fusion"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 x 6 tiles of 1024^2")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = ap.parse_args()
    rows = cols = 6 if args.quick else 20
    size = 1024 if args.quick else 2048
    overlap, jitter = 0.10, 5

    with tempfile.TemporaryDirectory(prefix="imageqc-bench-fuse-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tex, ts, folder = write_bench_tiles(tmp, rows=rows, cols=cols, size=size, overlap=overlap, jitter=jitter)
        truth = {(t.row, t.col): ts.true_positions[t.name] for t in ts.tiles}
        setup_s = time.perf_counter() - t0
        print(f"setup: {rows}x{cols} tiles of {size}^2 written in {setup_s:.1f} s")

        tiles = tiles_from_folder(folder)
        with PeakRSS() as read_rss:
            t0 = time.perf_counter()
            for t in tiles:
                t.read()
            read_s = time.perf_counter() - t0
        positions = {t.name: truth[(t.row, t.col)] for t in tiles}
        out = tmp / "fused.ome.tif"
        with PeakRSS() as fuse_rss:
            res = fuse_tiles(tiles, out, positions=positions)
        import tifffile

        img = tifffile.imread(out)  # after the timed runs: the whole mosaic in memory is fine here
        x0 = int(min(p[0] for p in truth.values()))
        y0 = int(min(p[1] for p in truth.values()))
        margin = jitter + 1
        ys = np.linspace(size, res.height - size, 4).astype(int)
        worst = max(
            int(
                np.abs(
                    img[y, size:-size].astype(int)
                    - tex[y0 + margin + y, x0 + margin + size : x0 + margin + res.width - size].astype(int)
                ).max()
            )
            for y in ys
        )
        del img
        out_mb = out.stat().st_size / 2**20
        del tex, ts

    lines = [
        f"## Fusion ({'quick: ' if args.quick else ''}{rows} x {cols} tiles of {size}^2 uint8, {overlap:.0%} overlap, "
        f"{res.width} x {res.height} mosaic)",
        "",
        f"Machine: {machine_info()}",
        "",
        "| run | wall time | peak RSS |",
        "|---|---|---|",
        f"| read every tile once (tifffile) | {read_s:.2f} s | {read_rss.text()} |",
        f"| fuse: linear blending, {len(res.levels)}-level pyramid, uncompressed tiled OME-TIFF ({out_mb:.0f} MiB) | "
        f"{res.seconds:.2f} s ({res.seconds / read_s:.1f} x the read) | {fuse_rss.text()} |",
        "",
        f"Fused pixels against the generator's mosaic on {len(ys)} sampled rows: largest difference {worst} grey "
        "levels. Target: within twice the read time, peak memory under 1.5 GB. "
        f"Setup (texture + writing the TIFFs, not timed above): {setup_s:.0f} s.",
    ]
    publish(SECTION + ("_quick" if args.quick else ""), lines, save=not args.no_record)


if __name__ == "__main__":
    main()
