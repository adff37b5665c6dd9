"""Per-job overhead of the service's QC worker (issue #16 item 2): warm worker vs a fresh process per job.

N small DAPI chips (generated, 1200 px) are QC'd one after another by the
service's own :class:`daemon.worker.ProcessWorker` running the real job
function (``daemon.jobs:run_qc_job``: read, track, clarity, report, pictures,
archive), once with ``qc.worker_jobs = 1`` (a fresh process per job, as before)
and once with the default warm worker. The floor is the same QC done in one
warm process (``run_qc`` and ``write_run_outputs`` in this process, imports
already paid). Overhead per job = (worker time - floor) / N.

    python benchmarks/bench_worker.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, publish


def _member(path: Path, name: str) -> dict:
    st = path.stat()
    return {
        "name": name,
        "path": str(path),
        "format": "tiff",
        "role": "nuclear",
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "files": 1,
    }


def _chips(folder: Path, n: int) -> list[tuple[str, Path]]:
    import tifffile

    from qc.testing.chips import generate_chip, shared_data_dir

    data = shared_data_dir()
    image = generate_chip(data_dir=data, width=1200, height=1200, scale=(0.5, 0.5), angle_deg=1.0, seed=3).image
    out = []
    for i in range(n):
        chip = f"SS2000{10000 + i:05d}TL_D1"
        path = folder / f"{chip}.tif"
        tifffile.imwrite(path, image)
        out.append((chip, path))
    return out


def _through_worker(root: Path, chips: list[tuple[str, Path]], worker_jobs: int) -> float:
    from daemon.config import load_config_text
    from daemon.store import Store
    from daemon.worker import ProcessWorker

    state = root / f"state-{worker_jobs}"
    text = f'state_dir = "{state.as_posix()}"\n[[watch]]\npath = "{chips[0][1].parent.as_posix()}"\n[qc]\nworker_jobs = {worker_jobs}\n'
    cfg = load_config_text(text, base=root)
    with Store(cfg.database_path) as store:
        for i, (chip, path) in enumerate(chips):
            ssid, _ = store.add_scan_set(
                chip=chip, root=str(cfg.watch[0].path), fingerprint=f"fp{i}", members=[_member(path, chip)]
            )
            store.create_job(ssid)
        worker = ProcessWorker(cfg, store, target="daemon.jobs:run_qc_job", owner="bench", slots=1)
        t0 = time.perf_counter()
        for _ in chips:
            job = store.claim("bench", lease_s=600)
            assert job is not None
            worker.submit(job)
            worker.join(600)
            assert store.get_job(job.id).state == "qc_done", store.get_job(job.id).error
        elapsed = time.perf_counter() - t0
        worker.stop(10)
    return elapsed


def _floor(root: Path, chips: list[tuple[str, Path]]) -> float:
    from daemon.config import load_config_text
    from daemon.jobs import qc_settings
    from qc.io import open_scan_set
    from qc.pipeline import run_qc, write_run_outputs

    cfg = load_config_text(f'state_dir = "{(root / "floor").as_posix()}"\n', base=root)
    settings = qc_settings(cfg, stain="auto")
    with open_scan_set([chips[0][1]]) as scan:  # imports and model loaded before the clock starts
        run_qc(scan, settings)
    t0 = time.perf_counter()
    for _chip, path in chips:
        with open_scan_set([path]) as scan:
            report = run_qc(scan, settings)
            write_run_outputs(report, root / "floor-out", scan_set=scan, threads=settings.threads)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 jobs instead of 20")
    args = ap.parse_args()
    n = 4 if args.quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "inbox").mkdir()
        chips = _chips(root / "inbox", n)
        floor = _floor(root, chips)
        fresh = _through_worker(root, chips, worker_jobs=1)
        warm = _through_worker(root, chips, worker_jobs=50)
    rows = [
        ("floor: QC in one warm process (no worker)", floor, 0.0),
        ("fresh process per job (`qc.worker_jobs = 1`, before)", fresh, (fresh - floor) / n),
        ("warm worker (default `qc.worker_jobs = 50`)", warm, (warm - floor) / n),
    ]
    lines = [
        "## QC worker per-job overhead (`benchmarks/bench_worker.py`)",
        "",
        f"Machine: {machine_info()}. Run {time.strftime('%Y-%m-%d %H:%M')}.",
        f"{n} generated 1200 px DAPI chips QC'd one after another by the service's ProcessWorker running the real job",
        "(read, track, clarity, report, pictures, SAW archive), one slot; the floor is the same QC in one process.",
        "",
        "| how | total | per job | overhead per job |",
        "|---|---|---|---|",
        *[f"| {name} | {t:.1f} s | {t / n:.2f} s | {over:+.2f} s |" for name, t, over in rows],
    ]
    publish("bench_worker", lines, save=not args.quick)


if __name__ == "__main__":
    main()
