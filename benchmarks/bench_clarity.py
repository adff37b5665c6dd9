"""Benchmark: clarity of a 20000 x 20000 uint8 image (memory-mapped TIFF) on 2 threads.

Builds the image by tiling the real Stereo-seq crops (DAPI, ssDNA, mIF as
8-bit, each tile flipped or turned differently) with a band of empty chip
surface, writes it as an uncompressed TIFF in a temporary folder, memory-maps
it, then times model loading and :func:`qc.clarity.evaluate_clarity` with the
shipped model and reports the peak resident memory of this process.

    python benchmarks/bench_clarity.py [--quick] [--size N] [--threads 2]

Target (the QC performance budget's share for clarity): at most ~5 s and well
under 1.5 GB peak on 2 cores. Results go to this script's section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, record  # noqa: E402

from qc.clarity import DEFAULT_MAX_WINDOWS, evaluate_clarity, load_clarity_model, to_uint8  # noqa: E402

SECTION = "## Clarity (bench_clarity.py)"


def shared_data() -> Path:
    env = os.environ.get("IMAGEQC_SHARED_DATA")
    return Path(env) if env else REPO / ".." / "shared" / "data"


def texture_tiles() -> list[np.ndarray]:
    tiles = []
    for stain in ("DAPI", "ssDNA", "mIF"):
        (path,) = sorted((shared_data() / "stereo_crops" / stain / "input").glob("*.tif"))
        img = tifffile.imread(path)
        if img.dtype == np.uint16:
            img = to_uint8(img, 0, 65535)
        for k in range(4):
            tiles.append(np.rot90(img, k))
            tiles.append(np.rot90(img, k)[:, ::-1])
    return [np.ascontiguousarray(t) for t in tiles]


def write_chip(path: Path, size: int) -> None:
    """A size x size uint8 TIFF: tiled real texture, the top eighth left as empty chip surface."""
    tiles = texture_tiles()
    t = tiles[0].shape[0]
    mm = tifffile.memmap(path, shape=(size, size), dtype=np.uint8)
    rng = np.random.default_rng(0)
    empty_rows = size // 8
    for y in range(0, size, t):
        h = min(t, size - y)
        if y + h <= empty_rows:
            mm[y : y + h] = rng.integers(8, 14, (h, size), dtype=np.uint8)
            continue
        row = np.concatenate([tiles[int(rng.integers(len(tiles)))] for _ in range(-(-size // t))], axis=1)
        mm[y : y + h] = row[:h, :size]
    mm.flush()
    del mm


def rss_split() -> str:
    """Anonymous vs file-backed resident memory (Linux only): memmap pages are file-backed."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return ""
    vals = {
        line.split(":")[0]: int(line.split()[1]) // 1024 for line in status if line.startswith(("RssAnon", "RssFile"))
    }
    return (
        f" (right after evaluating: {vals.get('RssAnon', 0)} MiB anonymous, {vals.get('RssFile', 0)} MiB file-backed)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5000 x 5000 instead of 20000 x 20000")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=DEFAULT_MAX_WINDOWS)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # child process: write the image
    args = ap.parse_args(argv)
    if args.build_only:
        write_chip(args.build_only, args.size)
        return 0
    size = args.size or (5000 if args.quick else 20000)
    proc = psutil.Process()

    with tempfile.TemporaryDirectory(prefix="bench_clarity_") as tmp:
        path = Path(tmp) / "chip.tif"
        t = time.perf_counter()
        # in a child process, so that writing 400 MB through a memmap does not count in our peak RSS
        cmd = [sys.executable, __file__, "--build-only", str(path), "--size", str(size)]
        subprocess.run(cmd, check=True)
        t_write = time.perf_counter() - t
        rss_before = proc.memory_info().rss

        t = time.perf_counter()
        model = load_clarity_model(threads=args.threads)
        t_load = time.perf_counter() - t
        image = tifffile.memmap(path, mode="r")
        t = time.perf_counter()
        res = evaluate_clarity(image, model, max_windows=args.max_windows)
        t_eval = time.perf_counter() - t
        split = rss_split()
        del image
    peak = getattr(proc.memory_info(), "peak_wset", None)  # Windows
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    lines = [
        f"- image: {size} x {size} uint8 memory-mapped TIFF (tiled real crops + empty chip band), "
        f"model {res.model}, {args.threads} threads, max_windows {args.max_windows}",
        f"- windows evaluated: {res.windows_evaluated} (grid {res.grid.shape[0]} x {res.grid.shape[1]}), "
        f"background share {res.background_share:.2f}, score {res.score:.1f}",
        f"- model load: {t_load:.2f} s; evaluate_clarity: **{t_eval:.2f} s**",
        f"- peak RSS of the process (imports, model, evaluation; the image is written by a child): "
        f"**{peak / 2**20:.0f} MiB**{split}; before loading the model: {rss_before / 2**20:.0f} MiB. "
        "File-backed pages are the memmap's page cache (every sampled row band is touched), reclaimable",
        f"- (building the test image took {t_write:.1f} s, not counted)",
        f"- machine: {machine_info('onnxruntime')}",
        f"- date: {time.strftime('%Y-%m-%d')}",
    ]
    print("\n".join(lines))
    if not args.no_write and not args.quick:
        record("bench_clarity", SECTION + "\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
