"""Benchmark: where track-line detection starts to fail, beside cellbin2 as a peer.

Sweeps one acquisition parameter at a time away from a real-looking base chip
(:func:`qc.testing.chips.real_looking`: surface 10 grey levels of 255, lines
3 px wide and 30 % darker, noise 1.5 levels, 2000 px FOVs with +-25 % gains and
20 % vignetting, 40 % saturated tissue, 60 debris spots) of 10584 x 10584 px
(an S0.5 chip at 10x) at 1.3 deg, over a few seeds per point. Axes:

* ``depth``: line depth in grey levels (``line_contrast = depth / 10``; the
  deepest point is 9.9, not 10, because ``line_contrast=1`` makes the
  generator divide 0 by 0 where lines cross and leaves NaN pixels);
* ``noise``: noise sigma in grey levels;
* ``seam``: FOV gain spread (``fov_gain``, brightness steps at the seams);
* ``tissue``: tissue cover;
* ``angle``: grid angle, deg (cellbin2 documents an 8 deg limit);
* ``size``: chip side, px.

Each image is written once as an uncompressed TIFF under benchmarks/_work/,
read by :func:`qc.track.find_track_lines` through ``tifffile.memmap`` and by
the peer, then deleted. A run succeeds when a grid is found with the angle
within 0.05 deg and both scales within 0.2 % of the truth (ours: also the
origin within 2 px of a true period crossing); our score and whether it passes
(>= 60) are reported beside. The table goes into the "track-sweep" section of
benchmarks/RESULTS.md.

    python benchmarks/bench_track_sweep.py [--quick] [--seeds N] [--axes depth,noise,...] [--no-peer]

The peer (benchmarks/peer_cellbin2.py: cellbin2 1.2.1's classical line detector
and template matcher) runs in its own Python 3.8 venv, built with::

    python3.8 -m venv /work/peer-cellbin2-venv
    /work/peer-cellbin2-venv/bin/pip install cellbin2==1.2.1

``IMAGEQC_PEER_PYTHON`` overrides the interpreter; without it the peer is
skipped with a note. The peer runs once per image with ``--no-gate``; the
gated result (cellbin2's own rule: every top-k FOV must match the template) is
the same run's result when its ``line_score`` is 1, since the gate is the only
difference between the two modes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, record  # noqa: E402

WORK = ROOT / "benchmarks" / "_work"
PEER_SCRIPT = ROOT / "benchmarks" / "peer_cellbin2.py"
PEER_PYTHON = Path(os.environ.get("IMAGEQC_PEER_PYTHON", "/work/peer-cellbin2-venv/bin/python"))
SECTION = "## track-line sensitivity sweep (benchmarks/bench_track_sweep.py)"
ANGLE_TOL, SCALE_TOL, ORIGIN_TOL = 0.05, 0.002, 2.0
BASE_N, BASE_ANGLE = 10584, 1.3

#: axis -> (unit, values, quick values, value -> generator overrides)
AXES: dict[str, tuple[str, tuple[float, ...], tuple[float, ...], object]] = {
    "depth": ("grey levels", (0.5, 1, 2, 3, 4, 6, 9.9), (1, 2, 3), lambda v: {"line_contrast": v / 10}),
    "noise": ("sigma, grey levels", (0.5, 1.5, 3, 5, 8), (1.5, 5), lambda v: {"noise": v / 255}),
    "seam": ("fov_gain", (0, 0.1, 0.25, 0.4, 0.6), (0, 0.4), lambda v: {"fov_gain": v}),
    "tissue": ("tissue_fraction", (0, 0.4, 0.6, 0.7, 0.8), (0.4, 0.8), lambda v: {"tissue_fraction": v}),
    "angle": ("deg", (-7.5, 0.3, 2, 3, 4, 7.5, 9, 12, 20), (3, 9, 20), lambda v: {"angle_deg": v}),
    "size": ("px", (4000, 10584, 20580, 30000), (4000, 6000, 10584), lambda v: {"width": int(v), "height": int(v)}),
}
#: the base chip's value on each axis (rows marked with * are the base chip; size: the base side)
BASE_VALUE = {"depth": 3, "noise": 1.5, "seam": 0.25, "tissue": 0.4, "angle": BASE_ANGLE}


@dataclass
class Point:
    """Results of one sweep point over its seeds."""

    axis: str
    value: float
    ours_ok: list[bool] = field(default_factory=list)
    ours_passed: list[bool] = field(default_factory=list)
    ours_score: list[float] = field(default_factory=list)
    ours_s: list[float] = field(default_factory=list)
    peer_gated: list[bool] = field(default_factory=list)
    peer_free: list[bool] = field(default_factory=list)
    peer_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _origin_error(found, truth) -> float:
    """Distance from the true origin to the nearest period crossing of the found grid, px."""
    p = found.template.period
    uv = found.image_to_chip(*truth.origin_px)
    near = found.chip_to_image(round(uv[0] / p) * p, round(uv[1] / p) * p)
    return float(np.hypot(*(near - np.asarray(truth.origin_px))))


def _accurate(angle: float | None, scale, truth) -> str:
    """Empty when the fitted angle and scales match the truth, else what is off."""
    if angle is None or not math.isfinite(angle):
        return "not found"
    da = abs(angle - truth.angle_deg)
    ds = max(abs(scale[i] / truth.scale[i] - 1) for i in (0, 1))
    if da > ANGLE_TOL:
        return f"angle off {da:.2f} deg"
    if ds > SCALE_TOL:
        return f"scale off {100 * ds:.2f} %"
    return ""


def run_ours(path: Path, truth) -> tuple[str, float, bool, float]:
    """Our detector on the TIFF: (failure or "", score, passed, seconds)."""
    import tifffile

    from qc.track import find_track_lines

    image = tifffile.memmap(path, mode="r")
    t0 = time.perf_counter()
    r = find_track_lines(image, "SS2")
    dt = time.perf_counter() - t0
    del image
    why = _accurate(r.angle_deg if r.found else None, r.scale, truth)
    if why == "not found" and r.problem:
        why += f" ({r.problem})"
    elif not why:
        d = _origin_error(r.grid, truth.grid)
        why = f"origin off {d:.1f} px" if d > ORIGIN_TOL else ""
    return why, float(r.score), r.passed, dt


def run_peer(path: Path, truth) -> tuple[str, bool, float]:
    """The peer with ``--no-gate``: (failure or "", whether cellbin2's gate would pass, seconds)."""
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), str(path), "--json", "--fov", "2000", "--stain", "DAPI", "--no-gate"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as e:
        return f"peer crashed ({type(e).__name__})", False, math.nan
    if res.get("error"):
        return f"peer error: {res['error'][:60]}", False, float(res.get("seconds") or math.nan)
    why = _accurate(res["angle_deg"] if res["found"] else None, res["scale"], truth)
    gate = res["detail"].get("line_score") == 1.0
    return why, gate, float(res["seconds"])


def sweep(axes: list[str], seeds: int, quick: bool, peer: bool, log) -> list[Point]:
    """Run every point of ``axes`` over ``seeds`` seeds; identical images run once."""
    from qc.testing.chips import real_looking, write_chip_tiff

    base_n = 6000 if quick else BASE_N
    WORK.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, Point] = {}
    points = []
    for axis in axes:
        _unit, values, qvalues, over = AXES[axis]
        for v in qvalues if quick else values:
            params = {"width": base_n, "height": base_n, "angle_deg": BASE_ANGLE, **over(v)}
            key = tuple(sorted(params.items()))
            if key in done:  # the base chip again, under another axis
                points.append(replace(done[key], axis=axis, value=v))
                continue
            pt = Point(axis, v)
            for seed in range(1, seeds + 1):
                path = WORK / f"sweep_{axis}_{v}_{seed}.tif"
                try:
                    truth = write_chip_tiff(path, tile=None, seed=seed, **real_looking(**params))
                    why, score, passed, secs = run_ours(path, truth)
                    pt.ours_ok.append(not why)
                    pt.ours_passed.append(not why and passed)
                    pt.ours_score.append(score)
                    pt.ours_s.append(secs)
                    if why:
                        pt.notes.append(f"ours s{seed}: {why}")
                    rec = {"axis": axis, "value": v, "seed": seed, "ours": why or "ok",
                           "score": round(score, 1), "ours_s": round(secs, 2)}  # fmt: skip
                    if peer:
                        pwhy, gate, psecs = run_peer(path, truth)
                        pt.peer_free.append(not pwhy)
                        pt.peer_gated.append(not pwhy and gate)
                        pt.peer_s.append(psecs)
                        if pwhy:
                            pt.notes.append(f"peer s{seed}: {pwhy}")
                        elif not gate:
                            pt.notes.append(f"peer s{seed}: gate fails")
                        rec.update(peer=pwhy or "ok", gate=gate, peer_s=psecs)
                finally:
                    path.unlink(missing_ok=True)
                print(json.dumps(rec), file=log, flush=True)
            done[key] = pt
            points.append(pt)
    return points


def _frac(xs: list[bool]) -> str:
    return f"{sum(xs)}/{len(xs)}" if xs else "-"


def _mean(xs: list[float], fmt: str = "{:.1f}") -> str:
    xs = [x for x in xs if math.isfinite(x)]
    return fmt.format(sum(xs) / len(xs)) if xs else "-"


def _score(xs: list[float]) -> str:
    if not xs:
        return "-"
    lo, hi = min(xs), max(xs)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"


def _first_failure(points: list[Point], attr: str) -> dict[str, str]:
    """Per axis, the values where a detector missed at least one seed."""
    out: dict[str, list[str]] = {}
    for p in points:
        xs = getattr(p, attr)
        if xs and not all(xs):
            out.setdefault(p.axis, [])
            out[p.axis].append(f"{p.value:g} ({_frac(xs)})")
    return {k: ", ".join(v) for k, v in out.items()}


def table(points: list[Point], peer: bool, base_n: int) -> list[str]:
    rows = [
        "| axis | value | ours ok | ours passed (>= 60) | ours score | ours s | peer gated ok | peer no-gate ok | peer s | failures |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        unit = AXES[p.axis][0]
        star = " *" if p.value == BASE_VALUE.get(p.axis, base_n) else ""
        worse = peer and sum(p.ours_ok) < sum(p.peer_free)
        ours = _frac(p.ours_ok) + (" **fewer than peer**" if worse else "")
        worse = peer and sum(p.ours_passed) < sum(p.peer_gated)
        passed = _frac(p.ours_passed) + (" **fewer than peer gated**" if worse else "")
        rows.append(
            f"| {p.axis} ({unit}) | {p.value:g}{star} | {ours} | {passed} | {_score(p.ours_score)} | "
            f"{_mean(p.ours_s)} | {_frac(p.peer_gated) if peer else 'n/a'} | {_frac(p.peer_free) if peer else 'n/a'} | "
            f"{_mean(p.peer_s) if peer else 'n/a'} | {'; '.join(p.notes)} |"
        )
    return rows


def conclusions(points: list[Point], peer: bool) -> list[str]:
    lines = []
    for label, attr in [("ours (found and accurate)", "ours_ok"), ("ours passing (score >= 60)", "ours_passed")] + (
        [("peer gated", "peer_gated"), ("peer no-gate", "peer_free")] if peer else []
    ):
        fails = _first_failure(points, attr)
        text = "; ".join(f"{k} at {v}" for k, v in fails.items()) if fails else "no miss on any point"
        lines.append(f"- {label} misses: {text}.")
    if peer:
        for what, ours, theirs in [
            ("ours ok < peer no-gate ok", "ours_ok", "peer_free"),
            (
                "ours passed < peer gated ok (cellbin2's own acceptance: recall or valid area > 0.1)",
                "ours_passed",
                "peer_gated",
            ),
        ]:
            worse = [p for p in points if sum(getattr(p, ours)) < sum(getattr(p, theirs))]
            names = ", ".join(f"{p.axis}={p.value:g}" for p in worse) if worse else "none"
            lines.append(f"- Points where {what}: {names}.")
    return lines


def _code_version() -> str:
    """The checkout's commit, and whether qc/ has uncommitted changes (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "qc"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" (qc/ modified)" if dirty.stdout.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points, 6000 px base chip, 1 seed by default")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per point (default 3, quick 1)")
    ap.add_argument("--axes", default=",".join(AXES), help=f"comma-separated subset of {','.join(AXES)}")
    ap.add_argument("--no-peer", action="store_true", help="skip the cellbin2 peer")
    ap.add_argument("--log", help="also append one JSON line per run to this file (default: stderr only)")
    args = ap.parse_args()
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    bad = set(axes) - set(AXES)
    if bad:
        ap.error(f"unknown axes {sorted(bad)}; known: {','.join(AXES)}")
    seeds = args.seeds or (1 if args.quick else 3)
    peer = not args.no_peer and PEER_PYTHON.exists()
    if peer:
        code = "import importlib.metadata as m; print(m.version('cellbin2'))"
        ver = subprocess.run([str(PEER_PYTHON), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        peer_line = (
            f"Peer: cellbin2 {ver}, classical line path (TrackLineQC line detector + TemplateMatcher + "
            "TemplateReferenceV1) via benchmarks/peer_cellbin2.py --fov 2000 --stain DAPI --no-gate; "
            "'gated' applies cellbin2's own rule (every top-k FOV must match) to the same run."
        )
    else:
        why = "--no-peer" if args.no_peer else f"{PEER_PYTHON} not found (set IMAGEQC_PEER_PYTHON)"
        peer_line = f"Peer: not run ({why})."
        print(peer_line, file=sys.stderr)

    info = machine_info("cv2", "tifffile")
    code = _code_version()
    log = open(args.log, "a", encoding="utf-8") if args.log else sys.stderr  # noqa: SIM115
    t0 = time.perf_counter()
    try:
        points = sweep(axes, seeds, args.quick, peer, log)
    finally:
        if args.log:
            log.close()
    wall = time.perf_counter() - t0

    base_n = 6000 if args.quick else BASE_N
    text = "\n".join(
        [
            SECTION,
            "",
            f"Where detection starts to fail: one parameter at a time is moved away from a real-looking "
            f"{base_n} x {base_n} uint8 DAPI chip (qc.testing.chips.real_looking: surface 10/255, lines 3 px and "
            f"3 grey levels deep, noise 1.5 levels, 2000 px FOVs with +-25 % gains and 20 % vignetting, 40 % "
            f"saturated tissue, 60 debris; SS2, scale 1, angle {BASE_ANGLE} deg), {seeds} seed(s) per point; "
            "both detectors read the same uncompressed TIFF. 'ok' = grid found, angle within 0.05 deg and both "
            "scales within 0.2 % (ours also origin within 2 px); 'passed' = ok and our score >= 60; seconds are "
            "detection only (the peer's own timer, from reading the image). * = the base chip.",
            "",
            *table(points, peer, base_n),
            "",
            *conclusions(points, peer),
            "",
            peer_line,
            "",
            f"Code: imageqc {code}. Machine: {info}. Whole sweep: {wall / 60:.1f} min wall (including writing the images); a load "
            "average above the core count means other processes shared the CPU, so the seconds are upper bounds.",
            "",
        ]
    )
    print(text)
    record("track-sweep" + ("-quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
