"""Benchmark: track lines on a real-looking S1 chip, beside one decode of the file.

Writes a 20,580 x 20,580 uint8 chip that looks like a real stitched 10x DAPI
scan (``qc.testing.chips.REAL_LOOKING``: a surface about 10 grey levels, lines
about 3 levels darker, FOV seams and vignetting, saturated tissue, debris) as
an uncompressed striped TIFF, as microscopes export, under benchmarks/_work/
(reused when present). Then, side by side in one run, each in a fresh process
with the file in the page cache:

- ``decode``: ``tifffile.imread`` of the file, once (the floor: imports included);
- ``detect``: :func:`qc.track.find_track_lines` on a ``tifffile.memmap`` of it
  (imports excluded: the detection alone);
- ``imageqc qc``: the whole command a technician runs (imports, read, track,
  clarity, report, pictures and archive written).

Prints the figures and writes them into the "track" section of
benchmarks/RESULTS.md.

    python benchmarks/bench_track.py [--quick] [--runs N] [--threads N]

``--quick`` uses a 10,584 px (S0.5) chip.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, machine_info, peak_rss_mb, publish  # noqa: E402

WORK = ROOT / "benchmarks" / "_work"
SECTION = "## track (benchmarks/bench_track.py)"
ANGLE = -1.3
CHIP = "SS200000135TL_D1"


def child_detect(path: str, threads: int) -> None:
    """Run the detection once and print a JSON line with the figures."""
    import tifffile

    from qc.track import find_track_lines

    image = tifffile.memmap(path, mode="r")
    c0, t0 = cpu_seconds(), time.perf_counter()
    r = find_track_lines(image, CHIP, max_threads=threads)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    print(json.dumps({"seconds": dt, "cpu": cpu, "peak_rss_mb": peak_rss_mb(), "result": r.as_dict()}))


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall and CPU seconds of a whole command (a fresh process), and its stdout."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t0, cpu_seconds() - c0, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 10,584 px chip instead of 20,580 px")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_detect(args.child, args.threads)
        return

    from qc.testing.chips import real_looking, write_chip_tiff

    n = 10_584 if args.quick else 20_580
    WORK.mkdir(parents=True, exist_ok=True)
    folder = WORK / f"real_looking_{n}"
    folder.mkdir(exist_ok=True)
    path = folder / f"{CHIP}.tif"
    if not path.exists():
        write_chip_tiff(
            path, tile=None, width=n, height=n, threads=args.threads, seed=2024, **real_looking(angle_deg=ANGLE)
        )
    py = sys.executable
    imageqc = str(Path(py).with_name("imageqc"))
    decode = [py, "-c", f"import tifffile; tifffile.imread({str(path)!r})"]
    detect = [py, __file__, "--child", str(path), "--threads", str(args.threads)]
    subprocess.run(decode, check=True, cwd=ROOT)  # page cache
    rows: dict[str, list[tuple[float, float]]] = {"decode": [], "detect": [], "qc": []}
    det: dict = {}
    qc_line = ""
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.runs):
            w, c, _ = _timed(decode)
            rows["decode"].append((w, c))
            _, _, text = _timed(detect)
            det = json.loads(text.strip().splitlines()[-1])
            rows["detect"].append((det["seconds"], det["cpu"]))
            w, c, text = _timed([imageqc, "qc", str(path), "--out", out])
            rows["qc"].append((w, c))
            qc_line = text.strip().splitlines()[0]
    best = {k: min(v) for k, v in rows.items()}
    res = det["result"]
    info = machine_info("cv2", "tifffile")
    fmt = lambda k: f"{best[k][0]:.2f} | {best[k][1]:.2f} | {best[k][0] / best['decode'][0]:.2f}"  # noqa: E731
    lines = [
        SECTION,
        "",
        f"A real-looking {n} x {n} uint8 DAPI chip (qc.testing.chips.REAL_LOOKING: surface 10 of 255, lines 3 px "
        f"and 30 % darker, noise 1.5 levels, 2000 px FOVs with +-25 % gain and 20 % vignetting, 40 % saturated "
        f"tissue, 60 debris; SS2, angle {ANGLE} deg), uncompressed striped TIFF, page cache warm, each run a fresh "
        f"process, best of {args.runs}, --threads {args.threads}.",
        "",
        "| what | wall (s) | CPU (s) | wall / one decode |",
        "|---|---|---|---|",
        f"| one decode: `tifffile.imread` (imports included) | {fmt('decode')} |",
        f"| track-line detection alone (`find_track_lines` on a memmap) | {fmt('detect')} |",
        f"| `imageqc qc` whole command (read, track, clarity, report, pictures, archive) | {fmt('qc')} |",
        "",
        f"Detection: score {res['score']}, polarity {res['polarity']}, angle error "
        f"{abs(res['angle_deg'] - ANGLE):.4f} deg, {res['crossings_sampled']} crossings measured, "
        f"reduction factor {res['downsample']}, peak RSS {det['peak_rss_mb']:.0f} MB "
        f"(includes the mapped image pages). The command printed: `{qc_line}`.",
        "",
        f"Machine: {info}",
        "",
    ]
    publish("bench_track" + ("_quick" if args.quick else ""), lines)


if __name__ == "__main__":
    main()
