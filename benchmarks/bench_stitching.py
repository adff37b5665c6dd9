"""Benchmark: stitching evaluation of a tile folder, cold (empty pair cache) and warm.

Default: 20 x 20 tiles of 2048^2 uint8 at 10 % overlap with 5 px stage jitter,
written as a tile folder of TIFFs to a temporary directory; ``--quick``: 6 x 6
tiles of 1024^2. Reports wall time, pairs computed/cached and the peak RSS of
each phase (sampled), checks the recovered deviations against the truth, and
writes its section of benchmarks/RESULTS.md.

    python benchmarks/bench_stitching.py [--quick] [--threads 2] [--no-record]

StereoMap's manual gives about 2 minutes per image for its stitching
evaluation; imageqc's targets are < 20 s cold and < 1 s warm for 20 x 20.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, publish

from qc.stitching import MemoryPairCache, evaluate_stitching
from qc.testing.tiles import blob_texture, make_tile_set, tiles_from_folder, write_tile_folder

SECTION = "bench_stitching"


def _anon_bytes() -> int:
    """Anonymous (heap) resident memory, Linux only: RSS minus file-backed pages."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Samples this process's RSS (and its anonymous part) every 20 ms while active.

    RSS includes the file-backed pages of memory-mapped inputs, which the OS
    can drop at will; the anonymous part is what the process itself allocated.
    """

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self.peak_anon = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_anon = max(self.peak_anon, _anon_bytes())

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()

    def text(self) -> str:
        anon = f" ({self.peak_anon / 2**20:.0f} MiB anonymous)" if self.peak_anon else ""
        return f"{self.peak / 2**20:.0f} MiB{anon}"


def write_bench_tiles(tmp: Path, *, rows: int, cols: int, size: int, overlap: float, jitter: int):
    """A seeded blob texture (memory-mapped in ``tmp``), its tile set and the tile folder written from it."""
    step = round(size * (1 - overlap))
    side = (rows - 1) * step + size + 2 * (jitter + 1)
    tex = np.lib.format.open_memmap(tmp / "texture.npy", mode="w+", dtype=np.uint8, shape=(side, side))
    blob_texture((side, side), seed=7, out=tex)
    ts = make_tile_set(tex, rows=rows, cols=cols, tile_size=size, overlap=overlap, jitter_px=jitter, seed=7)
    return tex, ts, write_tile_folder(ts, tmp / "SS200000135TL_D1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 x 6 tiles of 1024^2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = ap.parse_args()
    rows = cols = 6 if args.quick else 20
    size = 1024 if args.quick else 2048
    overlap, jitter = 0.10, 5

    with tempfile.TemporaryDirectory(prefix="imageqc-bench-stitch-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tex, ts, folder = write_bench_tiles(tmp, rows=rows, cols=cols, size=size, overlap=overlap, jitter=jitter)
        offsets = {(t.row, t.col): ts.offsets[t.name] for t in ts.tiles}
        del tex, ts  # the texture's pages must not count in the RSS below
        (tmp / "texture.npy").unlink()
        setup_s = time.perf_counter() - t0
        print(f"setup: {rows}x{cols} tiles of {size}^2 written in {setup_s:.1f} s")

        cache = MemoryPairCache()
        with PeakRSS() as cold_rss:
            t0 = time.perf_counter()
            tiles = tiles_from_folder(folder)
            cold = evaluate_stitching(tiles, cache=cache, max_threads=args.threads)
            cold_s = time.perf_counter() - t0
        with PeakRSS() as warm_rss:
            t0 = time.perf_counter()
            tiles = tiles_from_folder(folder)
            warm = evaluate_stitching(tiles, cache=cache, max_threads=args.threads)
            warm_s = time.perf_counter() - t0

    truth = np.array([offsets[(f.row, f.col)] for f in cold.fovs], float)
    rec = np.array([f.deviation_from_nominal for f in cold.fovs], float)
    err = np.abs((rec - rec[0]) - (truth - truth[0])).max()
    lines = [
        f"## Stitching evaluation ({'quick: ' if args.quick else ''}{rows} x {cols} tiles of {size}^2 uint8, "
        f"{overlap:.0%} overlap, {args.threads} threads)",
        "",
        f"Machine: {machine_info()}",
        "",
        "| run | wall time | pairs computed | pairs cached | peak RSS | score | max deviation |",
        "|---|---|---|---|---|---|---|",
        f"| cold (empty cache) | {cold_s:.2f} s | {cold.pairs_computed} | {cold.pairs_cached} | "
        f"{cold_rss.text()} | {cold.score} | {cold.max_deviation_px:.1f} px |",
        f"| warm (filled cache) | {warm_s:.3f} s | {warm.pairs_computed} | {warm.pairs_cached} | "
        f"{warm_rss.text()} | {warm.score} | {warm.max_deviation_px:.1f} px |",
        "",
        f"Largest error of the recovered stage jitter ({jitter} px) against the truth: {err:.2f} px. "
        "Targets: < 20 s cold, < 1 s warm (StereoMap: about 2 minutes per image). "
        f"Setup (texture + writing the TIFFs, not timed above): {setup_s:.0f} s.",
    ]
    publish(SECTION + ("_quick" if args.quick else ""), lines, save=not args.no_record)


if __name__ == "__main__":
    main()
