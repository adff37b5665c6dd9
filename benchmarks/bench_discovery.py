"""Discovery benchmark: detection latency and idle CPU with 100,000 files under watch.

Generates a watch root of tile folders (100,000 small TIFF tiles; 10,000 with
``--quick``), then for each observer mode (native, polling) starts the service
in a child process (the real Daemon and Discovery, with a runner that claims
no job so only discovery works) and measures

- start-up: time until every existing set is queued, and the rescan duration;
- idle CPU of the service process (user + system seconds / wall seconds)
  over ``--idle`` seconds with nothing changing;
- detection latency: a new scan set (a TIFF written in chunks) appears; from
  its last write to ``queued_at`` in the job database, minus the settle time.

The issue's targets: native at most settle + 5 s; polling at most settle +
one rescan interval. Run: ``python benchmarks/bench_discovery.py [--quick]``.
Figures go to benchmarks/RESULTS.md between the ``bench_discovery`` markers.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
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

SETTLE_S = 5.0
RESCAN_S = 60.0
POLL_S = 5.0
TICK_S = 2.0


def _tile_bytes() -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((4, 4), np.uint8))
    return buf.getvalue()


def make_tree(root: Path, files: int, tiles_per_folder: int = 500) -> int:
    """``files`` tiles in tile folders of ``tiles_per_folder`` (a 20 x 25 grid), ten date folders."""
    data = _tile_bytes()
    folders = files // tiles_per_folder
    cols = 25
    rows = tiles_per_folder // cols
    for k in range(folders):
        folder = root / f"2024-06-{k % 10 + 1:02d}" / f"SS2{k:08d}_D1"
        folder.mkdir(parents=True)
        for r in range(rows):
            for c in range(cols):
                (folder / f"img_{r:04d}_{c:04d}_DAPI.tif").write_bytes(data)
    return folders


def write_config(base: Path, root: Path, mode: str, state: str) -> Path:
    text = (
        f'state_dir = "{state}"\n[[watch]]\npath = "{root.as_posix()}"\nsettle_seconds = {SETTLE_S}\nobserver = "{mode}"\n'
        f"[discovery]\ngrouping_window_s = 0\nrescan_interval_s = {RESCAN_S}\npoll_interval_s = {POLL_S}\n"
        f'[service]\ntick_seconds = {TICK_S}\n[logging]\nconsole = "off"\nlevel = "info"\n'
    )
    path = base / f"{state}.toml"
    path.write_text(text)
    return path


def serve(config: str) -> None:
    """The child: the real service with discovery and a runner that never claims a job."""
    from daemon.config import load_config
    from daemon.discovery import Discovery
    from daemon.logging import configure_logging
    from daemon.service import Daemon

    class NoWorker:
        def free_slots(self) -> int:
            return 0

        def submit(self, job: object) -> None:
            raise AssertionError

        def active(self) -> list:
            return []

        def stop(self, timeout: float) -> None:
            pass

    cfg = load_config(config)
    configure_logging(level="info", file=cfg.log_file, console="off")
    Daemon(cfg, runner=NoWorker(), components=[Discovery(cfg)]).run_forever()


def _jobs(db: Path) -> list:
    from daemon.errors import DatabaseUnavailable
    from daemon.store import Store

    try:
        with Store(db, readonly=True) as s:
            return s.list_jobs(newest_first=False)
    except DatabaseUnavailable:
        return []


def _root_health(db: Path) -> dict:
    from daemon.store import Store

    with Store(db, readonly=True) as s:
        svc = s.get_status().get("service", ({}, 0))[0]
    return (svc.get("components", {}).get("discovery", {}).get("roots") or [{}])[0]


def _wait(pred, timeout: float, every: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def run_mode(base: Path, root: Path, mode: str, sets: int, idle_s: float, samples: int) -> dict:
    cfg = write_config(base, root, mode, f"state-{mode}")
    db = base / f"state-{mode}" / "imageqc.sqlite3"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(cfg)], env=env)
    try:
        ps = psutil.Process(proc.pid)
        if not _wait(lambda: len(_jobs(db)) >= sets, timeout=600):
            raise RuntimeError(f"{mode}: only {len(_jobs(db))} of {sets} existing sets queued in 600 s")
        startup = time.time() - t0
        _wait(lambda: _root_health(db).get("files"), timeout=120)
        health = _root_health(db)
        time.sleep(2 * TICK_S)
        c0, w0 = ps.cpu_times(), time.monotonic()
        time.sleep(idle_s)
        c1, w1 = ps.cpu_times(), time.monotonic()
        idle = (c1.user + c1.system - c0.user - c0.system) / (w1 - w0)
        rss = ps.memory_info().rss / 2**20
        big = io.BytesIO()  # a real, whole TIFF written in chunks
        tifffile.imwrite(big, np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8))
        data = big.getvalue()
        lat = []
        for k in range(samples):
            path = root / "new" / f"A{k + 10000 * (mode == 'polling'):05d}C.tif"
            path.parent.mkdir(exist_ok=True)
            with path.open("wb") as fh:
                step = len(data) // 8
                for i in range(0, len(data), step):
                    fh.write(data[i : i + step])
                    fh.flush()
                    time.sleep(0.1)
            last = path.stat().st_mtime
            chip = path.stem
            if not _wait(lambda chip=chip: any(j.chip == chip for j in _jobs(db)), timeout=SETTLE_S + RESCAN_S + 60):
                raise RuntimeError(f"{mode}: {chip} never queued")
            job = next(j for j in _jobs(db) if j.chip == chip)
            lat.append(job.queued_at - last)
        return {
            "mode": mode,
            "startup_s": startup,
            "rescan_s": health.get("rescan_s"),
            "files": health.get("files"),
            "observer": health.get("observer"),
            "idle_cpu": idle,
            "rss_mb": rss,
            "latency": lat,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 files, 15 s idle, 3 samples per mode")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--idle", type=float, default=None, help="idle measurement, seconds")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    files = args.files or (10_000 if args.quick else 100_000)
    idle_s = args.idle or (15.0 if args.quick else 60.0)
    samples = args.samples or (3 if args.quick else 5)
    base = Path(tempfile.mkdtemp(prefix="imageqc-bench-"))
    try:
        root = base / "inbox"
        t = time.monotonic()
        sets = make_tree(root, files)
        print(f"generated {files:,} files in {sets} tile folders in {time.monotonic() - t:.1f} s", flush=True)
        results = []
        for mode in ("native", "polling"):
            r = run_mode(base, root, mode, sets, idle_s, samples)
            results.append(r)
            lat = r["latency"]
            print(
                f"{mode:8s} start-up {r['startup_s']:.1f} s (rescan {r['rescan_s']} s, {r['files']} files) | idle CPU "
                f"{100 * r['idle_cpu']:.2f} % | RSS {r['rss_mb']:.0f} MB | latency - settle: median "
                f"{statistics.median(lat) - SETTLE_S:.2f} s, max {max(lat) - SETTLE_S:.2f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    lines = [
        "## Discovery (`benchmarks/bench_discovery.py`" + (" --quick" if args.quick else "") + ")",
        "",
        f"Machine: {machine_info('watchdog')}. Run {time.strftime('%Y-%m-%d %H:%M')}.",
        f"{files:,} TIFF tiles in {files // 500} tile folders under one root; the service in a child process "
        f"(tick {TICK_S:g} s, settle {SETTLE_S:g} s, rescan every {RESCAN_S:g} s, polling every {POLL_S:g} s, "
        f"grouping window 0); idle CPU over {idle_s:g} s with nothing changing; latency from the last write of a "
        f"new 1 MiB TIFF (written in 8 chunks) to `queued_at`, minus the settle time, {samples} samples.",
        "Targets: native <= settle + 5 s; polling <= settle + one rescan interval.",
        "",
        "| observer | start-up to all queued s | full rescan s | files seen | idle CPU % | RSS MB | latency - settle median s | max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lat = r["latency"]
        lines.append(
            f"| {r['mode']} | {r['startup_s']:.1f} | {r['rescan_s']} | {r['files']:,} | {100 * r['idle_cpu']:.2f} | "
            f"{r['rss_mb']:.0f} | {statistics.median(lat) - SETTLE_S:.2f} | {max(lat) - SETTLE_S:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        record("bench_discovery", text)


if __name__ == "__main__":
    main()
