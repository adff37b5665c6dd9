"""Reader benchmark: time and peak memory of plane(), downsampled(8) and a plain file read.

Generates (under benchmarks/_work/, removed afterwards) 20,000^2 uint8 and
uint16 TIFFs, striped uncompressed and tiled deflate, plus a 10 x 10 folder of
2,000^2 uint8 tiles, then measures each read in a fresh subprocess so peak
RSS belongs to that read alone:

- ``plane``: ``img.plane()`` and a sum over it (touches every pixel; an
  uncompressed file is memory-mapped, so its pages count as they are read);
- ``down8``: ``img.downsampled(8)``;
- ``floor``: reading the same file bytes into one buffer (tile folder: every
  tile file), the I/O floor for a full read.

Files are read warm (just written, so in the page cache). Peak RSS is
``ru_maxrss`` (POSIX) or ``peak_wset`` (Windows); ``base`` is the child's RSS after
``import qc.io``, before the read.

Usage: ``python benchmarks/bench_readers.py [--quick] [--keep]`` (``--quick``
uses 5,000^2 images and 500^2 tiles). Writes its section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, record  # noqa: E402

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import numpy as np

def peak_mb():
    if sys.platform == "win32":
        import psutil
        return psutil.Process().memory_info().peak_wset / 2**20
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20

def rss_now_mb():
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")

from qc.io import open_image  # readers are imported lazily, during the read, as in real use
mode, path = sys.argv[1], Path(sys.argv[2])
base = rss_now_mb()
t0 = time.perf_counter()
if mode == "floor":
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    total = sum(p.stat().st_size for p in files)
    buf = bytearray(total)
    view = memoryview(buf)
    pos = 0
    for p in files:
        with p.open("rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view[pos : pos + (16 << 20)])
                if not n:
                    break
                pos += n
    check = int(buf[-1]) if total else 0
else:
    with open_image(path) as img:
        if mode == "plane":
            arr = img.plane()
            check = int(arr.sum(dtype=np.uint64))
        else:
            arr = img.downsampled(8)
            check = int(arr.sum(dtype=np.uint64))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mb": peak_mb(), "base_mb": base, "check": check}))
"""


def generate_tiff(path: Path, size: int, dtype: np.dtype, tiled: bool) -> None:
    """Write a size x size image strip- or tile-wise (never the whole array in memory)."""
    import tifffile

    dtype = np.dtype(dtype)
    seg = 256 if tiled else 64
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 16, (seg, size), dtype=dtype)
    scale = 255 if dtype == np.uint8 else 4095

    def band(y: int) -> np.ndarray:
        yy = np.arange(y, min(y + seg, size))[:, None]
        xx = np.arange(size)[None, :]
        base = ((np.sin(xx / 97.0) + np.cos(yy / 131.0) + 2) * (scale / 4.5)).astype(dtype)
        return base + noise[: yy.shape[0]]

    if tiled:

        def tiles():
            for y in range(0, size, seg):
                b = band(y)
                b = np.pad(b, [(0, seg - b.shape[0]), (0, (-size) % seg)])
                for x in range(0, size, seg):
                    yield b[:, x : x + seg]

        tifffile.imwrite(
            path,
            tiles(),
            shape=(size, size),
            dtype=dtype,
            tile=(seg, seg),
            compression="zlib",
            compressionargs={"level": 1},
            bigtiff=True,
        )
    else:

        def strips():
            for y in range(0, size, seg):
                yield band(y)

        tifffile.imwrite(path, strips(), shape=(size, size), dtype=dtype, rowsperstrip=seg, bigtiff=True)


def generate_folder(folder: Path, grid: int, tile: int) -> None:
    import tifffile

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for r in range(grid):
        for c in range(grid):
            arr = rng.integers(0, 255, (tile, tile), dtype=np.uint8)
            tifffile.imwrite(folder / f"SS2_{r:04d}_{c:04d}_DAPI.tif", arr)
    (folder / "info.json").write_text(json.dumps({"rows": grid, "cols": grid, "overlap": 0.1}))


def measure(mode: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000^2 images and 500^2 tiles (smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    size, tile = (5000, 500) if args.quick else (20000, 2000)
    work = HERE / "_work" / "readers"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cases = []
    try:
        for dtype in (np.uint8, np.uint16):
            for tiled in (False, True):
                label = f"{size}^2 {np.dtype(dtype).name} {'tiled 256 deflate' if tiled else 'striped raw'}"
                path = work / f"{np.dtype(dtype).name}_{'tiled' if tiled else 'striped'}.tif"
                t0 = time.perf_counter()
                generate_tiff(path, size, dtype, tiled)
                print(f"generated {label} in {time.perf_counter() - t0:.1f} s", flush=True)
                cases.append((label, path, size * size * np.dtype(dtype).itemsize))
        folder = work / "tiles_10x10"
        generate_folder(folder, 10, tile)
        cases.append((f"10x10 tiles of {tile}^2 uint8", folder, 100 * tile * tile))
        rows = []
        for label, path, raw in cases:
            r = {m: measure(m, path) for m in ("floor", "plane", "down8")}
            rows.append((label, raw, r))
            print(
                f"{label}: " + ", ".join(f"{m} {v['seconds']:.2f} s / {v['peak_mb']:.0f} MB" for m, v in r.items()),
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"## Readers (`benchmarks/bench_readers.py{' --quick' if args.quick else ''}`)",
        "",
        f"Machine: {machine_info('tifffile')}. Run {time.strftime('%Y-%m-%d %H:%M')}; files warm in the page cache;",
        "each read in a fresh process; peak = peak RSS of that process (interpreter, imports and the read), base = its RSS\nafter `import qc.io`, before the read (the reader modules, e.g. OpenCV for tile folders, load during the read).",
        "",
        "| input | raw MB | floor s | plane() s | downsampled(8) s | floor peak MB | plane peak MB | down8 peak MB | base MB | down8 peak / raw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, raw, r in rows:
        mb = raw / 2**20
        lines.append(
            f"| {label} | {mb:.0f} | {r['floor']['seconds']:.2f} | {r['plane']['seconds']:.2f} | {r['down8']['seconds']:.2f} | "
            f"{r['floor']['peak_mb']:.0f} | {r['plane']['peak_mb']:.0f} | {r['down8']['peak_mb']:.0f} | "
            f"{r['down8']['base_mb']:.0f} | {r['down8']['peak_mb'] / mb:.2f} |"
        )
    section = "\n".join(lines)
    print()
    print(section)
    record("bench_readers", section)


if __name__ == "__main__":
    main()
