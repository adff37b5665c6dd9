"""Benchmark: `imageqc qc` on one real-looking chip in every common file layout, beside one decode of each file.

One real-looking 20,000 x 20,000 DAPI chip (``qc.testing.chips.real_looking``: a
surface about 10 grey levels, lines 3 levels darker, FOV seams, saturated
tissue, debris; SS2 at -1.3 deg) is rendered once into a memory-mapped striped
TIFF and written from there in each layout (the H&E layout renders
``real_looking("HE")`` the same way):

====================  =================================================================
``striped-raw``       uint8, uncompressed, 64 rows per strip
``tiled-raw``         uint8, uncompressed, 512 px tiles
``deflate-tiled``     uint8, zlib (deflate), 512 px tiles
``lzw-striped``       uint8, LZW, 64 rows per strip
``zstd-tiled``        uint8, zstd, 512 px tiles
``jpeg-he-tiled``     H&E RGB uint8, JPEG (quality 90), 512 px tiles
``u16-striped``       uint16 (the chip times 257), uncompressed, 64 rows per strip
``bigtiff-striped``   uint8 BigTIFF, uncompressed, 64 rows per strip
``ome-pyramid``       OME-TIFF, zlib 512 px tiles, 4 reduced levels (x2 .. x16) as SubIFDs
``czi-zstd``          CZI, 2048 px subblocks compressed with zstd (pylibCZIrw)
====================  =================================================================

Then, for each file, in one run with the file in the page cache, each step a
fresh process:

- the floor: one decode of the file (``tifffile.imread``; pylibCZIrw's ``read()``
  for CZI), imports included;
- imports + floor: the same decode after importing every module ``imageqc qc``
  imports for that file (one run of it under ``python -X importtime`` lists
  them), no QC work: what any QC run of this code costs at least;
- ``imageqc qc FILE --out DIR --json --no-cache``: imports, read, track,
  clarity, report and pictures written (the config turns off the SAW archive,
  which copies the image and is not QC; its cost is in bench_archive);
- the ratio of the two, the peak RSS of each child (GNU time), the verdict,
  the track score and the angle error.

Results go into the "layouts" section of benchmarks/RESULTS.md.

    python benchmarks/bench_layouts.py [--quick] [--runs N] [--threads N] [--only a,b]

``--quick`` uses a 6,000 px chip (a smoke run, recorded as "layouts_quick").
Files are kept under benchmarks/_work/layouts_<size>/ and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, publish  # noqa: E402

WORK = ROOT / "benchmarks" / "_work"
CHIP = "SS200000135TL_D1"
ANGLE = -1.3
SEED = 2024
ROWS_PER_STRIP = 64
TILE = (512, 512)
#: Rows handled at once while converting (bounds the converter's memory).
BAND = 2048
LAYOUTS = (
    "striped-raw",
    "tiled-raw",
    "deflate-tiled",
    "lzw-striped",
    "zstd-tiled",
    "jpeg-he-tiled",
    "u16-striped",
    "bigtiff-striped",
    "ome-pyramid",
    "czi-zstd",
)
GNU_TIME = "/usr/bin/time"
CONFIG = """\
[output]
archive = false
pictures = true
"""


# ---- writing the layouts --------------------------------------------------------------------------------


def _source(folder: Path, stain: str, n: int, threads: int) -> np.ndarray:
    """The rendered chip, memory-mapped (rendered once per stain and size)."""
    import tifffile

    from qc.testing.chips import real_looking, write_chip_tiff

    path = folder / f"source_{stain}.tif"
    if not path.exists():
        partial = path.with_suffix(".partial")
        write_chip_tiff(
            partial, tile=None, width=n, height=n, threads=threads, seed=SEED,
            **real_looking(stain, angle_deg=ANGLE),
        )  # fmt: skip
        partial.rename(path)
    return tifffile.memmap(path, mode="r")


def _bands(src: np.ndarray) -> Any:
    for y in range(0, src.shape[0], BAND):
        yield np.asarray(src[y : y + BAND])


def _write_u16(path: Path, src: np.ndarray) -> None:
    """The chip times 257 as uint16, uncompressed and contiguous (filled band by band)."""
    import tifffile

    mm = tifffile.memmap(path, shape=src.shape, dtype=np.uint16, photometric="minisblack", rowsperstrip=ROWS_PER_STRIP)
    for y in range(0, src.shape[0], BAND):
        mm[y : y + BAND] = np.asarray(src[y : y + BAND]).astype(np.uint16) * 257
    mm.flush()
    del mm


def _tiles(src: np.ndarray) -> Any:
    th, tw = TILE
    for band in _bands(src):
        for r in range(0, band.shape[0], th):
            for c in range(0, band.shape[1], tw):
                yield band[r : r + th, c : c + tw]


def _write_tiff(path: Path, src: np.ndarray, threads: int, *, tiled: bool, compression: str | None = None,
                bigtiff: bool = False, **kw: Any) -> None:  # fmt: skip
    import tifffile

    rgb = src.ndim == 3
    data = _tiles(src) if tiled else src  # tifffile cuts strips from an array (a memory map here) itself
    tifffile.imwrite(
        path, data, shape=src.shape, dtype=src.dtype, photometric="rgb" if rgb else "minisblack",
        tile=TILE if tiled else None, rowsperstrip=None if tiled else ROWS_PER_STRIP, compression=compression,
        bigtiff=bigtiff, maxworkers=threads, **kw,
    )  # fmt: skip


def _levels(src: np.ndarray, count: int) -> list[np.ndarray]:
    """Area-mean levels x2, x4, ... of ``src``, each from the one before (the first from bands of ``src``)."""
    from qc.io._reduce import BandReducer, block_mean

    red = BandReducer(src.shape[0], src.shape[1], 2, src.dtype)
    for band in _bands(src):
        red.feed(band)
    levels = [red.finish()]
    while len(levels) < count:
        levels.append(block_mean(levels[-1], 2))
    return levels


def _write_ome_pyramid(path: Path, src: np.ndarray, threads: int) -> None:
    import tifffile

    levels = _levels(src, 4)
    opts: dict[str, Any] = dict(tile=TILE, compression="zlib", photometric="minisblack", maxworkers=threads)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(_tiles(src), shape=src.shape, dtype=src.dtype, subifds=len(levels), metadata={"axes": "YX"}, **opts)
        for level in levels:
            tw.write(level, subfiletype=1, **opts)


def _write_czi(path: Path, src: np.ndarray) -> None:
    from pylibCZIrw import czi as pyczi

    step = 2048
    with pyczi.create_czi(str(path), exist_ok=True, compression_options="zstd1:ExplicitLevel=1") as w:
        for y in range(0, src.shape[0], step):
            band = np.asarray(src[y : y + step])
            for x in range(0, src.shape[1], step):
                w.write(np.ascontiguousarray(band[:, x : x + step]), location=(x, y), plane={"C": 0})
        w.write_metadata(document_name=CHIP, channel_names={0: "DAPI"})


def write_layout(name: str, folder: Path, n: int, threads: int) -> Path:
    """The chip in layout ``name`` (written once; a partial file never passes for a whole one)."""
    target = folder / name / (f"{CHIP}.czi" if name == "czi-zstd" else f"{CHIP}.tif")
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    src = _source(folder, "HE" if name == "jpeg-he-tiled" else "DAPI", n, threads)
    t0 = time.perf_counter()
    if name == "striped-raw":
        _write_tiff(tmp, src, threads, tiled=False)
    elif name == "tiled-raw":
        _write_tiff(tmp, src, threads, tiled=True)
    elif name == "deflate-tiled":
        _write_tiff(tmp, src, threads, tiled=True, compression="zlib")
    elif name == "lzw-striped":
        _write_tiff(tmp, src, threads, tiled=False, compression="lzw")
    elif name == "zstd-tiled":
        _write_tiff(tmp, src, threads, tiled=True, compression="zstd")
    elif name == "jpeg-he-tiled":
        _write_tiff(tmp, src, threads, tiled=True, compression="jpeg", compressionargs={"level": 90})
    elif name == "u16-striped":
        _write_u16(tmp, src)
    elif name == "bigtiff-striped":
        _write_tiff(tmp, src, threads, tiled=False, bigtiff=True)
    elif name == "ome-pyramid":
        _write_ome_pyramid(tmp, src, threads)
    elif name == "czi-zstd":
        _write_czi(tmp, src)
    else:
        msg = f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}"
        raise ValueError(msg)
    tmp.rename(target)
    print(f"  wrote {name} in {time.perf_counter() - t0:.1f} s ({target.stat().st_size / 2**20:.0f} MiB)", flush=True)
    return target


# ---- measuring ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds, peak RSS (MB) and stdout of ``cmd`` in a fresh process.

    The peak comes from GNU time, a small process that starts the command: a
    child forked straight from this (large) process would inherit its high-water mark.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tdir:
        usage_file = Path(tdir) / "usage"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [GNU_TIME, "-f", "%M %U %S", "-o", str(usage_file), *cmd], cwd=cwd, stdout=out, stderr=err
        )
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text, problem = out.read().decode(), err.read().decode()
        fields = usage_file.read_text().split()[-3:]
    if proc.returncode not in (0, 3):  # 3: QC ran and failed, still a measurement
        msg = f"{cmd[:3]} exited {proc.returncode}: {problem.strip()[-2000:]}"
        raise RuntimeError(msg)
    rss_kib, user, system = (float(v) for v in fields)
    return wall, user + system, rss_kib / 1024.0, text


def floor_command(path: Path) -> list[str]:
    if path.suffix == ".czi":
        code = f"from pylibCZIrw import czi\nwith czi.open_czi({str(path)!r}) as r:\n    r.read()"
    else:
        code = f"import tifffile; tifffile.imread({str(path)!r})"
    return [sys.executable, "-c", code]


def qc_modules(path: Path, work: Path) -> list[str]:
    """Every module `imageqc qc FILE` imports, in import order: one run under ``python -X importtime``."""
    imageqc = str(Path(sys.executable).with_name("imageqc"))
    with tempfile.TemporaryDirectory(dir=work) as out:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", imageqc, "qc", str(path), "--out", out, "--json", "--no-cache"],
            cwd=work, capture_output=True, text=True, check=False,
        )  # fmt: skip
    names = []
    for line in done.stderr.splitlines():  # "import time:  self [us] | cumulative | imported package"
        if line.startswith("import time:") and "|" in line and not line.rstrip().endswith("imported package"):
            names.append(line.rsplit("|", 1)[1].strip())
    return names


def imports_floor_command(path: Path, modules: list[str], work: Path) -> list[str]:
    """The floor's decode after importing every module QC imports: the least any QC run of this code pays."""
    listed = work / f"modules-{path.stem}-{path.parent.name}.txt"
    listed.write_text("\n".join(modules), encoding="utf-8")
    code = (
        "import importlib\n"
        f"for m in open({str(listed)!r}, encoding='utf-8').read().split():\n"
        "    try:\n        importlib.import_module(m)\n    except Exception:\n        pass\n"
    )
    return [sys.executable, "-c", code + floor_command(path)[-1]]


def measure(name: str, path: Path, runs: int, work: Path) -> dict[str, Any]:
    imageqc = str(Path(sys.executable).with_name("imageqc"))
    floor_cmd = floor_command(path)
    _run(floor_cmd, work)  # into the page cache
    imports_cmd = imports_floor_command(path, qc_modules(path, work), work)
    floors, qcs, least = [], [], []
    report: dict[str, Any] = {}
    for _ in range(runs):
        floors.append(_run(floor_cmd, work))
        least.append(_run(imports_cmd, work))
        with tempfile.TemporaryDirectory(dir=work) as out:
            try:
                wall, cpu, rss, text = _run([imageqc, "qc", str(path), "--out", out, "--json", "--no-cache"], work)
            except RuntimeError as e:  # QC could not run at all: a row that says why
                return {"layout": name, "size_mb": path.stat().st_size / 1e6, "floor": min(floors)[0],
                        "floor_cpu": min(floors)[1], "floor_rss": min(floors)[2], "error": str(e).rsplit(": ", 1)[-1][:160]}  # fmt: skip
            qcs.append((wall, cpu, rss, text))
    floor = min(floors)
    qc = min(qcs)
    least_s = min(least)[0]
    report = json.loads(qc[3])
    image = report["images"][0]
    track = image.get("track") or {}
    angle = track.get("angle_deg")
    return {
        "layout": name,
        "size_mb": path.stat().st_size / 1e6,
        "floor": floor[0],
        "floor_cpu": floor[1],
        "floor_rss": floor[2],
        "least": least_s,
        "qc": qc[0],
        "qc_cpu": qc[1],
        "qc_rss": qc[2],
        "verdict": report["verdict"],
        "score": track.get("score"),
        "angle_err": None if angle is None else abs(float(angle) - ANGLE),
        "stages": report.get("stage_s", {}),
        "reasons": report.get("reasons", []),
    }


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return (
            f"| {r['layout']} | {r['size_mb']:.0f} | {r['floor']:.2f} | - | - | - | no | {r['floor_cpu']:.1f} | - | "
            f"{r['floor_rss']:.0f} | - "
            f"| QC refused: {r['error']} | - | - | - |"
        )
    score = "-" if r["score"] is None else f"{r['score']:.0f}"
    err = "-" if r["angle_err"] is None else f"{r['angle_err']:.3f}"
    ratio = r["qc"] / r["floor"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items() if v >= 0.05)
    least = r["least"] / r["floor"]
    met = "yes" if ratio <= 1.5 else f"no: imports alone {least:.2f}x" if least > 1.5 else "no"
    return (
        f"| {r['layout']} | {r['size_mb']:.0f} | {r['floor']:.2f} | {r['least']:.2f} | {r['qc']:.2f} | {ratio:.2f} | "
        f"{met} | {r['floor_cpu']:.1f} | {r['qc_cpu']:.1f} | {r['floor_rss']:.0f} | "
        f"{r['qc_rss']:.0f} | "
        f"{r['verdict']} | {score} | {err} | {stages} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 6,000 px chip (smoke run)")
    ap.add_argument("--runs", type=int, default=2, help="runs of each step; the best is kept")
    ap.add_argument("--threads", type=int, default=2, help="threads used to write the files")
    ap.add_argument("--only", default="", help="comma-separated layouts (default: all)")
    ap.add_argument("--no-save", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--label", default="", help="a note put after the section title (e.g. 'before')")
    args = ap.parse_args()
    n = 6_000 if args.quick else 20_000
    names = [s for s in args.only.split(",") if s] or list(LAYOUTS)
    folder = WORK / f"layouts_{n}"
    folder.mkdir(parents=True, exist_ok=True)
    info = machine_info("tifffile", "imagecodecs", "cv2")
    paths = {}
    for name in names:
        try:
            paths[name] = write_layout(name, folder, n, args.threads)
        except ImportError as e:
            print(f"  {name}: cannot be written here ({e})", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_layouts.") as tmp:
        work = Path(tmp)
        (work / "imageqc.toml").write_text(CONFIG, encoding="utf-8")
        os.environ["IMAGEQC_CONFIG"] = str(work / "imageqc.toml")
        rows = []
        for name, path in paths.items():
            r = measure(name, path, args.runs, work)
            print(_row(r), flush=True)
            rows.append(r)
    load_end = os.getloadavg()[0]
    title = f"## QC per file layout (benchmarks/bench_layouts.py{' --quick' if args.quick else ''})"
    lines = [
        title + (f": {args.label}" if args.label else ""),
        "",
        f"One real-looking {n} x {n} chip (DAPI uint8; H&E RGB for JPEG; SS2 at {ANGLE} deg) in each layout, "
        "files in the page cache, each step a fresh process (imports included), best of "
        f"{args.runs}. Floor: one decode (`tifffile.imread`; pylibCZIrw `read()` for CZI). QC: `imageqc qc FILE "
        "--out DIR --json --no-cache` (read, track, clarity, report, pictures; the SAW archive off). Peak RSS of "
        "each child from GNU time. Target: QC <= 1.5 x the floor, 20k^2 raw <= 5 s, <= 1.5 GB for 20k^2 8-bit.",
        "'imports + floor': the floor's decode in a process that first imports every module `imageqc qc` imported "
        "for that file (listed by one run under `python -X importtime`), no QC work: the least any QC run of this "
        "code costs. Where it alone is over 1.5 x the floor, the column '<= 1.5x' says so.",
        "",
        "| layout | file MB | floor s | imports + floor s | QC s | QC / floor | <= 1.5x | floor CPU s | QC CPU s "
        "| floor peak MB | QC peak MB | verdict | track score | angle error deg | QC stages s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in rows),
        "",
        f"Machine: {info}; load average {load_end:.1f} at the end.",
        "",
    ]
    missing = [s for s in names if s not in paths]
    if missing:
        lines.insert(-2, f"Not measured: {', '.join(missing)} (could not be written here).")
    publish("bench_layouts" + ("_quick" if args.quick else ""), lines, save=not args.no_save)


if __name__ == "__main__":
    main()
