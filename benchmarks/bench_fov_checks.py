"""Benchmark: live QC's per-FOV check (qc.live.check_fov) on one decoded tile.

Tiles of 1024^2 and 2048^2 uint8 cut from a synthetic chip at 10x (1 px per DNB, SS2), with
track lines, the shipped clarity model and one thread (live QC's budget on an acquisition PC).
Reports the median and worst wall time per tile over the tiles of a small grid, and the split
between the track part and the rest, and writes its section of benchmarks/RESULTS.md.

    python benchmarks/bench_fov_checks.py [--no-record]

Targets (issue #18): well under 100 ms per 1024^2 tile, under 0.5 s per 2048^2 tile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, publish

SECTION = "bench_fov_checks"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    import cv2

    cv2.setNumThreads(1)
    from qc.chip import template_for
    from qc.clarity import load_clarity_model
    from qc.live import FovParams, check_fov
    from qc.testing.fovs import chip_tile_set

    model = load_clarity_model(threads=1)
    tmpl = template_for("SS2")
    lines = [
        "## Per-FOV checks for live QC (`benchmarks/bench_fov_checks.py`)",
        "",
        "| tile | tiles | lines found | median per tile (wall) | worst (wall) | CPU per tile (median) | track part (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, grid in ((1024, 3), (2048, 2)):
        cs = chip_tile_set(rows=grid, cols=grid, tile_size=size, scale=1.0, angle_deg=0.4, seed=7)
        params = FovParams(um_per_px=cs.um_per_px)
        arrays = [(t, t.read()) for t in cs.tiles]
        check_fov(arrays[0][1], arrays[0][0], digest="w", template=tmpl, params=params, clarity_model=model)  # warm-up
        total, cpu, track, found = [], [], [], 0
        for t, a in arrays:
            for _ in range(3):
                t0, c0 = time.perf_counter(), time.process_time()
                c = check_fov(a, t, digest="d", template=tmpl, params=params, clarity_model=model)
                t1, c1 = time.perf_counter(), time.process_time()
                check_fov(a, t, digest="d", template=tmpl, params=params, clarity_model=None)
                t2 = time.perf_counter()
                total.append(t1 - t0)
                cpu.append(c1 - c0)
                track.append(t2 - t1)
            found += c.track_found
        lines.append(
            f"| {size}^2 uint8 | {len(arrays)} | {found} of {len(arrays)} | **{statistics.median(total) * 1000:.0f} ms** "
            f"| {max(total) * 1000:.0f} ms | {statistics.median(cpu) * 1000:.0f} ms | {statistics.median(track) * 1000:.0f} ms |"
        )
    lines += [
        "",
        "- one thread (OpenCV and onnxruntime), shipped clarity model over 8 windows; the tile is already decoded;",
        "  each tile checked 3 times; CPU: the process's CPU time per call (what a tile costs when other work",
        "  shares the cores, as on this machine while it ran)",
        "- track part: the same call without the clarity model (top-hat evidence of the usual polarity, the other",
        "  only when it finds no lines; 2x reduction, angle from the spectrum, template matching per axis, angle",
        "  refined from the two halves; focus measure, surface share, exposure)",
        "- real-looking tiles (dark surface, tissue, seams): `bench_fov_rules.py` (its `ms` column)",
        f"- machine: {machine_info('cv2', 'onnxruntime')}",
        f"- date: {date.today().isoformat()}",
    ]
    publish(SECTION, lines, save=not args.no_record)


if __name__ == "__main__":
    main()
