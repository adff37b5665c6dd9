"""Live QC (issue #18): warning latency, CPU share during a scan, and time from completion to verdict.

A real service (discovery, live QC, the QC worker, as `imageqc run` starts them, at their shipped
priorities) watches an inbox while :class:`qc.testing.scan.ScanWriter` writes a real-looking chip as
a microscope does: ``ROWS x COLS`` tiles of ``TILE``^2 px, one after another, each in chunks, over
``SECONDS``.

1. Good chip, live QC on: the live thread's CPU time over the scan (its share of one core and of the
   machine), and the time from the set being queued (complete) to the verdict (the QC child's
   ``verdict`` event: report and pictures written, notifications due), with how many pairs and FOV
   checks the final QC still computed, and to the job finished (IPR and SAW archive written).
2. The same tiles (new content: another seed) written at once, live QC off: time from queued to verdict
   (the final QC does all the work).
3. A chip without track lines, live QC on, written at the same pace until the warning: latency from
   the triggering tile being written (the tile whose check made the warning due) to the warning.

    python benchmarks/bench_live.py             # 20 x 20 tiles of 2048^2 over 600 s (the issue's case)
    python benchmarks/bench_live.py --quick     # 6 x 6 tiles of 1024^2 over 30 s, not recorded
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, publish


def _config(root: Path, *, live: bool, settle: float) -> Any:
    from daemon.config import load_config_text

    (root / "inbox").mkdir(parents=True, exist_ok=True)
    text = (
        f'state_dir = "state"\n[[watch]]\npath = "inbox"\nsettle_seconds = {settle}\n'
        "[discovery]\ngrouping_window_s = 0\nrescan_interval_s = 10\n"
        '[service]\ntick_seconds = 0.5\n[logging]\nconsole = "off"\n'
        f"[live]\nenabled = {'true' if live else 'false'}\n"
    )
    return load_config_text(text, file=str(root / "imageqc.toml"), base=root)


def _thread_cpu(native_id: int | None) -> float:
    import psutil

    for t in psutil.Process().threads():
        if t.id == native_id:
            return float(t.user_time + t.system_time)
    return 0.0


def _process_cpu() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def _run(
    root: Path, tiles: list, chip: str, *, seconds: float, live: bool, settle: float, until_warning: bool = False
) -> dict[str, Any]:
    from daemon.service import Daemon, default_components
    from daemon.store import JobState, Store
    from qc.testing.scan import ScanWriter

    cfg = _config(root, live=live, settle=settle)
    rows = max(r for r, _, _ in tiles) + 1
    cols = max(c for _, c, _ in tiles) + 1
    h, w = tiles[0][2].shape[:2]
    info = {"rows": rows, "cols": cols, "overlap": 0.1, "tile_width": w, "tile_height": h}
    d = Daemon(cfg, components=default_components(cfg))
    d.start()
    comp = next((c for c in d.components if c.name == "live"), None)
    out: dict[str, Any] = {}
    try:
        writer = ScanWriter(root / "inbox" / chip, tiles, seconds, info)
        cpu0, t0 = _process_cpu(), time.monotonic()
        writer.start()
        live_cpu0 = None
        while True:
            if comp is not None and comp._thread is not None and live_cpu0 is None:
                live_cpu0 = _thread_cpu(comp._thread.native_id)
            if until_warning and comp is not None:
                sets = comp.health()["sets"]
                hist = [h for s in sets for h in s.get("history", []) if h["event"] == "raised"]
                if hist:
                    writer.stop()
                    first = hist[0]
                    k = first["fovs_checked"]
                    written = writer.written
                    out["warning"] = first["code"]
                    out["fovs_checked"] = k
                    out["latency_s"] = first["at"] - written[k - 1][2] if len(written) >= k else None
                    return out
            if writer._thread is not None and not writer._thread.is_alive():
                break
            time.sleep(0.2)
        scan_s = time.monotonic() - t0
        out["scan_s"] = scan_s
        out["process_cpu_s"] = _process_cpu() - cpu0
        if comp is not None and comp._thread is not None:
            out["live_cpu_s"] = _thread_cpu(comp._thread.native_id) - (live_cpu0 or 0.0)
            out["live"] = next((s for s in comp.health()["sets"] if s["chip"] == chip), None)
        last_tile = writer.written[-1][2]
        with Store(cfg.database_path, readonly=True) as store:
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                jobs = store.list_jobs(chip=chip)
                done = [
                    j for j in jobs if j.state in (JobState.DONE.value, JobState.SKIPPED.value, JobState.FAILED.value)
                ]
                if done:
                    j = done[0]
                    # the verdict reaches people when the QC child announces it (report and pictures written);
                    # the job finishes after the IPR and the SAW archive
                    announced = [e.at for e in store.events(j.id, kinds=["verdict"])]
                    verdict_at = announced[0] if announced else j.updated_at
                    out["queued_to_verdict_s"] = verdict_at - j.created_at
                    out["last_tile_to_verdict_s"] = verdict_at - last_tile
                    out["queued_to_finished_s"] = j.updated_at - j.created_at
                    res = store.get_result(j.id) or {}
                    rep = res.get("report") or {}
                    st = next((im.get("stitching") for im in rep.get("images", []) if im.get("stitching")), {}) or {}
                    out["pairs_total"] = st.get("pairs_total")
                    out["pairs_computed"] = st.get("pairs_computed")
                    out["fovs_cached"] = next(
                        (
                            im["fov_checks"].get("fovs_cached")
                            for im in rep.get("images", [])
                            if isinstance(im.get("fov_checks"), dict)
                        ),
                        None,
                    )
                    out["qc_s"] = rep.get("duration_s")
                    out["stage_s"] = rep.get("stage_s") or {}
                    out["verdict"] = rep.get("verdict") or j.state
                    break
                time.sleep(0.2)
        if comp is not None:
            out["live"] = next((s for s in comp.health()["sets"] if s["chip"] == chip), out.get("live"))
    finally:
        d.stop()
    return out


def _stages(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in (r.get("stage_s") or {}).items()) or "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 x 6 tiles of 1024^2 over 30 s; not recorded")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--settle", type=float, default=10.0)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.tile, args.seconds, args.settle = 6, 1024, 30.0, 5.0
    from qc.testing.scan import scan_tiles

    info = machine_info("cv2", "onnxruntime")
    n = args.rows
    print(f"generating {n} x {n} tiles of {args.tile}^2 ...", flush=True)
    g0 = time.monotonic()
    good = scan_tiles("good", rows=n, cols=n, tile=args.tile, seed=11)
    gen_s = time.monotonic() - g0
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        print("1/3 good chip, live QC on ...", flush=True)
        results["on"] = _run(Path(tmp) / "on", good, "C02533C", seconds=args.seconds, live=True, settle=args.settle)
        print(results["on"], flush=True)
        other = scan_tiles("good", rows=n, cols=n, tile=args.tile, seed=12)
        del good
        print("2/3 the same scan (other content) written at once, live QC off ...", flush=True)
        results["off"] = _run(Path(tmp) / "off", other, "C02531C", seconds=0.0, live=False, settle=args.settle)
        print(results["off"], flush=True)
        del other
        lineless = scan_tiles("no_lines", rows=n, cols=n, tile=args.tile, seed=13)
        print("3/3 a chip without track lines, live QC on, until the warning ...", flush=True)
        results["warn"] = _run(
            Path(tmp) / "warn",
            lineless,
            "A02677B5",
            seconds=args.seconds,
            live=True,
            settle=args.settle,
            until_warning=True,
        )
        print(results["warn"], flush=True)
    on, off, warn = results["on"], results["off"], results["warn"]
    live = on.get("live") or {}
    cores = os.cpu_count() or 1
    share = on.get("live_cpu_s", 0.0) / max(on["scan_s"], 1e-9)
    per_tile = on.get("live_cpu_s", 0.0) / max(1, (live.get("fovs_computed") or n * n))
    lines = [
        "## Live QC (`benchmarks/bench_live.py`)",
        "",
        f"Machine: {info}. {n} x {n} tiles of {args.tile}^2 uint8 (real-looking chip, 10% overlap) written one by "
        f"one, each in 4 chunks, over {args.seconds:.0f} s; settle time {args.settle:g} s; live QC and QC worker at their "
        f"shipped priorities (low), live QC with 1 thread. Generating the tiles took {gen_s:.0f} s.",
        "",
        "| what | measured |",
        "|---|---|",
        f"| live QC CPU during the scan | {on.get('live_cpu_s', 0):.0f} s in {on['scan_s']:.0f} s = {100 * share:.1f} % of one core "
        f"({100 * share / cores:.1f} % of the machine's {cores}); whole service process {on.get('process_cpu_s', 0):.0f} s |",
        f"| FOVs checked live / skipped (fell behind) | {live.get('fovs_checked')} / {live.get('skipped')} of {n * n} |",
        f"| pairs registered live | {live.get('pairs')} |",
        f"| queued (complete) to verdict, live QC on | {on.get('queued_to_verdict_s', float('nan')):.1f} s "
        f"(final QC computed {on.get('pairs_computed')} of {on.get('pairs_total')} pairs) |",
        f"| queued (complete) to verdict, live QC off | {off.get('queued_to_verdict_s', float('nan')):.1f} s "
        f"(computed {off.get('pairs_computed')} of {off.get('pairs_total')} pairs) |",
        f"| queued to the job finished (IPR and SAW archive written after the verdict), on / off | "
        f"{on.get('queued_to_finished_s', float('nan')):.1f} s / {off.get('queued_to_finished_s', float('nan')):.1f} s |",
        f"| last tile written to verdict, on / off (includes the {args.settle:g} s settle time) | "
        f"{on.get('last_tile_to_verdict_s', float('nan')):.1f} s / {off.get('last_tile_to_verdict_s', float('nan')):.1f} s |",
        f"| the final QC itself (report duration), on / off | {on.get('qc_s') or float('nan'):.1f} s / "
        f"{off.get('qc_s') or float('nan'):.1f} s; stages on: {_stages(on)}; off: {_stages(off)} |",
        f"| the issue's bound for on: QC of the last row (live CPU per tile x {n}) + the whole-chip track fit | "
        f"{per_tile * n:.1f} s + {(on.get('stage_s') or {}).get('track', float('nan')):.1f} s = "
        f"{per_tile * n + (on.get('stage_s') or {}).get('track', float('nan')):.1f} s |",
        f"| warning latency after the triggering tile (no track lines; warned at FOV {warn.get('fovs_checked')}) | "
        f"{warn.get('latency_s', float('nan')):.1f} s ({warn.get('warning')}) |",
        "",
        "The triggering tile is the one whose check made the warning due (the first 15 % of the grid, or two rows).",
    ]
    publish("bench_live", lines, save=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
