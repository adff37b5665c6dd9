"""Benchmark: full QC of a 20,000 x 20,000 chip, the technician's wait.

Two runs, each in a fresh process (peak RSS is the run's own) exactly as the
service's worker does it (``open_scan_set`` -> ``run_qc`` -> outputs):

- DAPI: a generated 20000^2 uint8 DAPI TIFF -> track + clarity.
  StereoMap's manual gives about 2.5 minutes; target under 15 s, peak < 1.5 GB.
- DAPI + 2 IF: the same DAPI plus two IF images (one shifted by (17, -9) px)
  -> track + clarity + 2 calibrations. StereoMap: about 3 minutes; target < 30 s.

Images are written once under benchmarks/_work/ (uncompressed TIFF, as the
microscope exports) and reused. Prints the figures and writes the "full QC"
section of benchmarks/RESULTS.md.

    python benchmarks/bench_qc.py [--quick] [--threads N]

``--quick`` uses 8000^2 images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, peak_rss_mb, record  # noqa: E402

WORK = ROOT / "benchmarks" / "_work" / "qc"
SECTION = "## full QC (benchmarks/bench_qc.py)"
CHIP = "SS200000135TL_D1"


def child(paths: list[str], threads: int, out: str) -> None:
    import psutil

    from qc.io import open_scan_set
    from qc.pipeline import QCSettings, run_qc, write_run_outputs

    base = psutil.Process().memory_info().rss / 2**20
    proc = psutil.Process()
    c0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    with open_scan_set([Path(p) for p in paths]) as scan:
        report = run_qc(scan, QCSettings(threads=threads))
        t_qc = time.perf_counter() - t0
        write_run_outputs(report, out)
    total = time.perf_counter() - t0
    cpu = sum(proc.cpu_times()[:2]) - c0
    d = report.as_dict()
    print(
        json.dumps(
            {
                "qc_s": t_qc,
                "total_s": total,
                "cpu_s": cpu,
                "peak_rss_mb": peak_rss_mb(),
                "base_rss_mb": base,
                "verdict": d["verdict"],
                "reasons": d["reasons"],
                "scores": {
                    i["name"]: {
                        m: (i[m] or {}).get("score", (i[m] or {}).get("similarity"))
                        for m in ("track", "clarity", "calibration")
                        if i[m]
                    }
                    for i in d["images"]
                },
            }
        )
    )


def _make(size: int) -> dict[str, Path]:
    import numpy as np
    import tifffile

    from qc.testing.chips import generate_if, write_chip_tiff

    folder = WORK / str(size)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "dapi": folder / f"{CHIP}.tif",
        "if1": folder / f"{CHIP}_CD31_IF.tif",
        "if2": folder / f"{CHIP}_CD68_IF.tif",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    print(f"generating {size}^2 images in {folder} ...", flush=True)
    truth = write_chip_tiff(
        paths["dapi"], width=size, height=size, tile=None, angle_deg=-0.8, tissue_fraction=0.5, seed=7
    )
    for key, off, seed in (("if1", (17, -9), 1), ("if2", (-4, 6), 2)):
        img = generate_if(truth, offset_px=off, seed=seed).image
        tifffile.imwrite(paths[key], np.ascontiguousarray(img))
        del img
    return paths


def _run(paths: list[Path], threads: int) -> dict:
    out = WORK / "out"
    cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--out", str(out), *map(str, paths)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8000^2 images instead of 20000^2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.paths, args.threads, args.out)
        return
    size = 8000 if args.quick else 20000
    paths = _make(size)
    machine = machine_info("onnxruntime", "cv2")
    rows = []
    for label, files, target in (
        ("DAPI (track + clarity)", [paths["dapi"]], "< 15 s, < 1.5 GB (StereoMap ~2.5 min)"),
        ("DAPI + 2 IF (+ 2 calibrations)", [paths["dapi"], paths["if1"], paths["if2"]], "< 30 s (StereoMap ~3 min)"),
    ):
        r = _run(files, args.threads)
        print(
            f"{label}: QC {r['qc_s']:.1f} s, with outputs {r['total_s']:.1f} s, CPU {r['cpu_s']:.1f} s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB (base {r['base_rss_mb']:.0f}), verdict {r['verdict']}",
            flush=True,
        )
        rows.append((label, r, target))
    lines = [
        SECTION,
        "",
        f"{size} x {size} uint8, uncompressed TIFF, {args.threads} QC threads, each run in a fresh process; "
        f"recorded {time.strftime('%Y-%m-%d')} on: {machine}.",
        "",
        "| run | QC | with report, pictures, archive | CPU | peak RSS | verdict | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r, target in rows:
        lines.append(
            f"| {label} | {r['qc_s']:.1f} s | {r['total_s']:.1f} s | {r['cpu_s']:.1f} s | "
            f"{r['peak_rss_mb']:.0f} MB | {r['verdict']} | {target} |"
        )
    lines.append("")
    lines.append("Peak RSS includes the memory-mapped image pages QC touched and ~150 MB of imported libraries.")
    record("bench_qc" + ("_quick" if args.quick else ""), "\n".join(lines))


if __name__ == "__main__":
    main()
