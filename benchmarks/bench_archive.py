"""Benchmark: writing the archive SAW takes, beside a plain copy of the image.

For the 20,580 x 20,580 uint8 real-looking chip of bench_track.py (an
uncompressed striped TIFF under benchmarks/_work/, made when missing), runs QC
once in this process, then side by side, best of ``--runs``:

- ``cp``: the ``cp`` command copying the TIFF into the output folder (the floor);
- ``read+write``: the same copy made by reading and writing 1 MiB blocks (what
  any writer that is not the kernel's copy pays);
- ``archive``: :func:`qc.report.write_outputs` with the image only (the tar.gz
  with the image in its SAW place, nothing else), at gzip levels 0 (stored,
  the default), 1 and 3;
- ``all outputs``: :func:`qc.pipeline.write_run_outputs` (report, SAW's IPR,
  pictures and the archive with the image), what the service writes per run.

The output folder is on the same disk as the image, the page cache warm. Writes
the "archive" section of benchmarks/RESULTS.md.

    python benchmarks/bench_archive.py [--quick] [--runs N] [--threads N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, machine_info, record  # noqa: E402

WORK = ROOT / "benchmarks" / "_work"
CHIP = "SS200000135TL_D1"
LEVELS = (0, 1, 3)


def _copy(src: Path, dst: Path) -> None:
    with src.open("rb") as a, dst.open("wb") as b:
        while chunk := a.read(1 << 20):
            b.write(chunk)


def _timed(fn) -> tuple[float, float]:
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 10,584 px chip instead of 20,580 px")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from qc.io import open_scan_set
    from qc.pipeline import QCSettings, run_qc, write_run_outputs
    from qc.report import write_outputs
    from qc.testing.chips import real_looking, write_chip_tiff

    n = 10_584 if args.quick else 20_580
    folder = WORK / f"real_looking_{n}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{CHIP}.tif"
    if not path.exists():
        write_chip_tiff(
            path, tile=None, width=n, height=n, threads=args.threads, seed=2024, **real_looking(angle_deg=-1.3)
        )
    size = path.stat().st_size
    path.read_bytes()  # page cache
    rows: dict[str, list[tuple[float, float]]] = {"cp": [], "read+write": [], "all": []}
    rows.update({f"archive{level}": [] for level in LEVELS})
    sizes: dict[int, int] = {}
    with open_scan_set([path]) as scan:
        report = run_qc(scan, QCSettings(threads=args.threads))
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(dir=WORK) as out:
                rows["cp"].append(_timed(lambda: subprocess.run(["cp", str(path), out], check=True)))
            with tempfile.TemporaryDirectory(dir=WORK) as out:
                rows["read+write"].append(_timed(lambda: _copy(path, Path(out) / path.name)))
            for level in LEVELS:
                with tempfile.TemporaryDirectory(dir=WORK) as out:
                    member = [(path, f"DAPI/{CHIP}_DAPI.tif")]
                    w = {}
                    rows[f"archive{level}"].append(
                        _timed(
                            lambda w=w, member=member, level=level, out=out: w.setdefault(
                                "o", write_outputs(report, out, images=member, threads=args.threads, level=level)
                            )
                        )
                    )
                    sizes[level] = w["o"].archive.stat().st_size
            with tempfile.TemporaryDirectory(dir=WORK) as out:
                rows["all"].append(_timed(lambda: write_run_outputs(report, out, scan_set=scan, threads=args.threads)))
    best = {k: min(v) for k, v in rows.items()}
    ratio = lambda k: best[k][0] / best["cp"][0]  # noqa: E731
    lines = [
        "## archive (benchmarks/bench_archive.py)",
        "",
        f"Writing the archive SAW takes for a real-looking {n} x {n} uint8 chip ({size / 2**20:.0f} MiB uncompressed "
        f"striped TIFF), beside `cp` of the same file, same disk, page cache warm, best of {args.runs}, "
        f"{args.threads} compression threads for the ISA-L levels.",
        "",
        "| what | wall (s) | CPU (s) | wall / cp | wall / read+write | archive size |",
        "|---|---|---|---|---|---|",
        f"| `cp` of the TIFF (the kernel copies; may share blocks) | {best['cp'][0]:.2f} | {best['cp'][1]:.2f} | 1.00 | "
        f"{best['cp'][0] / best['read+write'][0]:.2f} | |",
        f"| a plain copy, read and written in 1 MiB blocks | {best['read+write'][0]:.2f} | {best['read+write'][1]:.2f} | "
        f"{ratio('read+write'):.2f} | 1.00 | |",
        *[
            f"| the archive with the image, `output.archive_level = {lv}`{' (default)' if lv == 0 else ''} | "
            f"{best[f'archive{lv}'][0]:.2f} | {best[f'archive{lv}'][1]:.2f} | {ratio(f'archive{lv}'):.2f} | "
            f"{best[f'archive{lv}'][0] / best['read+write'][0]:.2f} | {sizes[lv] / size:.0%} |"
            for lv in LEVELS
        ],
        f"| all outputs at the default level: report, IPR, pictures, archive | {best['all'][0]:.2f} | {best['all'][1]:.2f} | "
        f"{ratio('all'):.2f} | {best['all'][0] / best['read+write'][0]:.2f} | |",
        "",
        f"Machine: {machine_info('isal', 'tifffile')}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    record("bench_archive" + ("_quick" if args.quick else ""), text)
    shutil.rmtree(WORK / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
