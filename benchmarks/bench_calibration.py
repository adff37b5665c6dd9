"""Benchmark: DAPI vs IF calibration of one 20k x 20k pair (memory-mapped).

Builds a 20,000^2 uint16 DAPI-like image and a uint8 IF-like rendering of the
same tissue (square-root response, blur, its own background and noise) whose
content sits at a known offset, both as .npy memory maps in a temporary
directory, then times :func:`qc.calibration.calibrate` and reports the peak
RSS. ``--quick``: 5,000^2. Writes its section of benchmarks/RESULTS.md.

    python benchmarks/bench_calibration.py [--quick] [--no-record]

Budget: a DAPI + 2 IF 20k^2 QC must stay under 30 s in total, so one
calibration should take at most about 3-4 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, publish
from bench_stitching import PeakRSS

from qc.calibration import calibrate
from qc.testing.tiles import blob_texture

SECTION = "bench_calibration"
OFFSET = (13, -7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5,000^2 instead of 20,000^2")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = ap.parse_args()
    n = 5000 if args.quick else 20000
    pad = 32
    dx, dy = OFFSET
    with tempfile.TemporaryDirectory(prefix="imageqc-bench-cal-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tex = np.lib.format.open_memmap(tmp / "tex.npy", mode="w+", dtype=np.uint16, shape=(n + 2 * pad, n + 2 * pad))
        blob_texture(tex.shape, seed=3, dtype=np.uint16, out=tex)
        dapi = np.lib.format.open_memmap(tmp / "dapi.npy", mode="w+", dtype=np.uint16, shape=(n, n))
        ifi = np.lib.format.open_memmap(tmp / "if.npy", mode="w+", dtype=np.uint8, shape=(n, n))
        rng = np.random.default_rng(1)
        for y0 in range(0, n, 2048):
            y1 = min(n, y0 + 2048)
            dapi[y0:y1] = tex[pad + y0 : pad + y1, pad : pad + n]
            band = tex[pad - dy + y0 : pad - dy + y1, pad - dx : pad - dx + n].astype(np.float32) / 65535.0
            band = cv2.GaussianBlur(25 + 190 * np.sqrt(band), (0, 0), 1.3)
            band += rng.normal(0, 4, band.shape).astype(np.float32)
            ifi[y0:y1] = np.clip(band, 0, 255).astype(np.uint8)
        dapi.flush()
        ifi.flush()
        del tex, dapi, ifi
        (tmp / "tex.npy").unlink()
        setup_s = time.perf_counter() - t0
        ref = np.load(tmp / "dapi.npy", mmap_mode="r")
        mov = np.load(tmp / "if.npy", mmap_mode="r")
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            res = calibrate(ref, mov, reference_name="DAPI", moving_name="IF")
            wall = time.perf_counter() - t0
        del ref, mov
    err = max(abs(res.offset_px[0] - dx), abs(res.offset_px[1] - dy))
    lines = [
        f"## Calibration ({'quick: ' if args.quick else ''}one {n:,} x {n:,} DAPI (uint16) / IF (uint8) pair, "
        "memory-mapped)",
        "",
        f"Machine: {machine_info()}",
        "",
        "| wall time | peak RSS | offset found | true offset | error | similarity | downsample | windows |",
        "|---|---|---|---|---|---|---|---|",
        f"| {wall:.2f} s | {rss.text()} | ({res.offset_px[0]:.2f}, {res.offset_px[1]:.2f}) | "
        f"{OFFSET} | {err:.2f} px | {res.similarity:.3f} | {res.downsample} | {res.windows_used} |",
        "",
        "Budget: about 3-4 s per IF image (DAPI + 2 IF 20k^2 QC under 30 s in total). The images were just "
        "written, so they are in the page cache; the RSS counts the memory-mapped pages read (both images "
        f"are read once, in bands, for the coarse views). Setup (not timed): {setup_s:.0f} s.",
    ]
    publish(SECTION + ("_quick" if args.quick else ""), lines, save=not args.no_record)


if __name__ == "__main__":
    main()
