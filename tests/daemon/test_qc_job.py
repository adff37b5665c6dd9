"""The QC job in a real worker child: outputs, stored report, and the ways it fails."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from daemon.store import Store
from daemon.worker import ProcessWorker
from tests.daemon.conftest import CHIP
from tests.daemon.upload.conftest import member
from tests.helpers import scaled


@pytest.fixture
def scan_dir(qc_files, tmp_path):
    d = tmp_path / "inbox"
    d.mkdir(exist_ok=True)
    for key in ("nuclear", "if"):
        shutil.copy2(qc_files[key], d / qc_files[key].name)
    return d


def _run(cfg, members, chip=CHIP):
    with Store(cfg.database_path) as store:
        ssid, _ = store.add_scan_set(chip=chip, root=str(cfg.watch[0].path), fingerprint="fp", members=members)
        store.create_job(ssid)
        worker = ProcessWorker(cfg, store, target="daemon.jobs:run_qc_job", owner="svc")
        job = store.claim("svc", lease_s=60)
        worker.submit(job)
        worker.join(scaled(240))
        return store.get_job(job.id), store.get_result(job.id)


def test_a_queued_scan_set_gets_its_report_archive_and_qc_done(make_config, scan_dir):
    cfg = make_config()
    members = [
        member(scan_dir / f"{CHIP}.tif", CHIP, "nuclear"),
        member(scan_dir / f"{CHIP}_CD31_IF.tif", f"{CHIP}_CD31_IF", "IF"),
    ]
    job, result = _run(cfg, members)
    assert job.state == "qc_done", job.error
    assert result is not None and result["verdict"] == "pass", result and result["report"]["reasons"]
    report = result["report"]
    assert report["stain"] == "DAPI+mIF" and report["chip"] == CHIP
    archive = Path(result["archive"])
    assert archive.parent == cfg.output_dir and archive.name.startswith(f"{CHIP}_") and archive.name.endswith(".tar.gz")
    with tarfile.open(archive) as tar:
        assert any(n.endswith("/report.json") for n in tar.getnames())
    assert Path(result["output_dir"], "pictures", f"{CHIP}_track.png").exists()
    assert job.stage == "done" and job.progress == 100.0
    with Store(cfg.database_path) as store:  # the verdict was announced before the job finished its archive
        history = [(e.kind, e.to_state, e.message) for e in store.events(job.id)]
    announced = history.index(("verdict", None, "QC pass"))
    assert announced < history.index(("state", "qc_done", "QC pass"))
    # what QC read, for the uploads to check the files against (#20 case 3)
    assert result["inputs"] == {
        m["path"]: {"size": m["size"], "mtime_ns": m["mtime_ns"], "sha256": _sha256(Path(m["path"]))} for m in members
    }
    # the microscope's files are untouched
    assert [m["size"] for m in members] == [Path(m["path"]).stat().st_size for m in members]


def test_a_failing_verdict_is_still_a_finished_job(make_config, qc_files, tmp_path):
    cfg = make_config()
    job, result = _run(cfg, [member(qc_files["fail"], "C02533C", "nuclear")], chip="C02533C")
    assert job.state == "qc_done"
    assert result["verdict"] == "fail" and "track line score" in result["report"]["reasons"][0]


def test_files_that_vanished_after_queueing_fail_the_job_clearly(make_config, scan_dir):
    cfg = make_config()
    members = [member(scan_dir / f"{CHIP}.tif", CHIP, "nuclear")]
    (scan_dir / f"{CHIP}.tif").unlink()
    job, _ = _run(cfg, members)
    assert job.state == "failed" and "vanished after it was queued" in job.error and job.next_attempt_at is None


def test_files_changed_after_queueing_are_not_qcd(make_config, scan_dir):
    cfg = make_config()
    members = [member(scan_dir / f"{CHIP}.tif", CHIP, "nuclear")]
    with (scan_dir / f"{CHIP}.tif").open("ab") as fh:
        fh.write(b"\0" * 100)
    job, _ = _run(cfg, members)
    assert job.state == "failed" and "changed after it was queued" in job.error


def test_a_corrupt_image_fails_permanently_with_the_readers_reason(make_config, scan_dir):
    cfg = make_config()
    path = scan_dir / f"{CHIP}.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    job, _ = _run(cfg, [member(path, CHIP, "nuclear")])
    assert job.state == "failed" and job.next_attempt_at is None
    assert CHIP in job.error and ("truncated" in job.error or "corrupt" in job.error.lower() or "beyond" in job.error)


def test_a_full_output_disk_is_a_transient_failure_that_names_the_file_and_the_folders(
    make_config, scan_dir, monkeypatch
):
    import errno

    import qc.pipeline
    from daemon.jobs import run_qc_job
    from daemon.worker import JobContext

    cfg = make_config()
    target = cfg.output_dir / "SS200000135TL_D1_run" / "report.json"

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(qc.pipeline, "write_run_outputs", full)
    with Store(cfg.database_path) as store:
        ssid, _ = store.add_scan_set(
            chip=CHIP,
            root=str(cfg.watch[0].path),
            fingerprint="fp",
            members=[member(scan_dir / f"{CHIP}.tif", CHIP, "nuclear")],
        )
        store.create_job(ssid)
        job = store.claim("svc", lease_s=60)
    out = run_qc_job(
        JobContext(job=job, config=cfg, owner="svc", db_path=str(cfg.database_path), progress=lambda *_: None)
    )
    assert out.state == "failed" and out.transient
    assert f"disk full writing {target} (No space left on device)" in out.error
    assert str(cfg.output_dir) in out.error and str(cfg.state_dir) in out.error and "retried" in out.error


def test_an_input_rewritten_while_qc_reads_it_keeping_size_and_time_makes_qc_run_again(make_config, scan_dir):
    """Issue #20 case 3: the digest recorded with the verdict must be of the file QC read."""
    import dataclasses
    import os

    from daemon.jobs import run_qc_job
    from daemon.worker import JobContext

    cfg = make_config()
    path = scan_dir / f"{CHIP}.tif"
    with Store(cfg.database_path) as store:
        ssid, _ = store.add_scan_set(
            chip=CHIP, root=str(cfg.watch[0].path), fingerprint="fp", members=[member(path, CHIP, "nuclear")]
        )
        store.create_job(ssid)
        job = store.claim("svc", lease_s=600)
    ctx = JobContext(job=job, config=cfg, owner="svc", db_path=str(cfg.database_path), progress=lambda *_: None)
    stages: list[str] = []

    def rewrite_once_reading_began(stage: str, _pct: float | None) -> None:
        stages.append(stage)
        if len(stages) == 2:  # QC is reading: the export is written again in place, its time put back
            st = path.stat()
            with path.open("r+b") as f:
                f.seek(st.st_size - 64)
                tail = f.read(64)
                f.seek(st.st_size - 64)
                f.write(bytes(b ^ 0xFF for b in tail))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    out = run_qc_job(dataclasses.replace(ctx, progress=rewrite_once_reading_began))
    assert out.state == "failed" and out.transient, out
    assert out.error == (
        f"{path}: changed while QC ran (same size and time: written or replaced in place), so the verdict "
        "would not be for the file as it is now; QC runs again"
    )
    with Store(cfg.database_path) as store:
        assert store.get_result(job.id) is None  # no verdict recorded for a file that changed under QC
    again = run_qc_job(ctx)  # the retry QCs the file as it is now and records its digest
    assert again.state == "qc_done", again
    with Store(cfg.database_path) as store:
        assert store.get_result(job.id)["inputs"][str(path)]["sha256"] == _sha256(path)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("overlap", "passes"), [(None, False), ((0.26, 0.1), True)])
def test_the_roots_tile_overlap_is_the_stitching_guess_for_folders_without_positions(
    make_config, shared_data, overlap, passes
):
    """The real stitch2d tiles (3 x 2, no positions or overlap in their files) overlap by about 26 % x 10 %."""
    import dataclasses

    cfg = make_config()
    if overlap is not None:
        cfg = dataclasses.replace(cfg, watch=(dataclasses.replace(cfg.watch[0], tile_overlap=overlap),))
    folder = cfg.watch[0].path / "C02533C"
    shutil.copytree(shared_data / "tiles" / "stitch2d", folder)
    job, result = _run(cfg, [member(folder, "C02533C")], chip="C02533C")
    assert job.state == "qc_done", job.error
    stitching = result["report"]["images"][0]["stitching"]
    assert stitching["pairs_total"] == 7
    assert stitching["passed"] is passes, stitching
    if passes:
        assert stitching["score"] >= 90 and stitching["max_deviation_px"] <= 10


def test_a_folder_named_by_the_roots_tile_pattern_is_qcd_with_it(make_config):
    """Discovery accepts tiles named by the root's regex; QC must read them the same way."""
    import dataclasses

    import tifffile

    from qc.testing.tiles import blob_texture, make_tile_set

    texture = blob_texture((700, 900), seed=3)
    tiles = make_tile_set(texture, rows=2, cols=3, tile_size=320, overlap=0.15, seed=3)
    cfg = make_config()
    cfg = dataclasses.replace(
        cfg,
        watch=(
            dataclasses.replace(
                cfg.watch[0], tile_pattern=r"^scan-r(?P<row>\d+)-c(?P<col>\d+)\.tif$", tile_overlap=(0.15, 0.15)
            ),
        ),
    )
    folder = cfg.watch[0].path / "C02533C"
    folder.mkdir()
    for t in tiles.tiles:
        tifffile.imwrite(folder / f"scan-r{t.row}-c{t.col}.tif", t.read())
    job, result = _run(cfg, [member(folder, "C02533C")], chip="C02533C")
    assert job.state == "qc_done", job.error
    stitching = result["report"]["images"][0]["stitching"]
    assert stitching["pairs_total"] == 7 and stitching["passed"], stitching


def test_the_fused_image_of_a_tile_set_is_written_listed_and_archived(make_config, capsys):
    """Issue #17 item 4: ``[output] fused_image`` writes the stitched image beside the report, at the
    registered positions, and the stored report lists it; its pixels are the generator's mosaic."""
    import numpy as np
    import tifffile

    from qc.testing.tiles import blob_texture, make_tile_set, write_tile_folder

    cfg = make_config("[output]\nfused_image = true\n")
    texture = blob_texture((1100, 1500), seed=17)  # nuclei-like: registers to a fraction of a pixel
    ts = make_tile_set(texture, rows=2, cols=3, tile_size=400, overlap=0.1, jitter_px=4, seed=17)
    folder = write_tile_folder(ts, cfg.watch[0].path / CHIP)
    job, result = _run(cfg, [member(folder, CHIP)])
    assert job.state == "qc_done", job.error
    listed = result["report"]["outputs"]["fused_images"]
    assert listed == [{"image": CHIP, "file": "DAPI_fov_stitched.tif", "positions": "registered", "blend": "linear"}]
    fused = Path(result["output_dir"], "DAPI_fov_stitched.tif")
    with tifffile.TiffFile(fused) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled and len(tif.series[0].levels) >= 2
        img = tif.asarray()
    # the generator's mosaic in the fused frame: its top-left is the leftmost and topmost true position
    x0 = int(min(p[0] for p in ts.true_positions.values()))
    y0 = int(min(p[1] for p in ts.true_positions.values()))
    margin = int(np.abs(np.array(list(ts.offsets.values()))).max()) + 1
    truth = texture[y0 + margin : y0 + margin + img.shape[0], x0 + margin : x0 + margin + img.shape[1]]
    covered = np.zeros(img.shape, bool)
    for t in ts.tiles:
        x, y = (int(v) - o for v, o in zip(ts.true_positions[t.name], (x0, y0), strict=True))
        covered[y : y + t.height, x : x + t.width] = True
    assert img.shape == truth.shape and not img[~covered].any()
    assert (img[covered] == truth[covered]).mean() > 0.99  # registered within half a pixel: the same placement
    with tarfile.open(result["archive"]) as tar:  # like the folder's other files, in the archive under imageqc/
        assert "imageqc/DAPI_fov_stitched.tif" in tar.getnames()
    assert [p.name for p in folder.iterdir() if "fov_stitched" in p.name] == []  # never into the watch root
    from daemon.cli import main

    assert main(["show", str(job.id), "--config", cfg.source]) == 0  # imageqc show names it whole, to copy
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("fused image")]
    assert line.split()[-1] == str(fused)


_FIRST_JOB_IMPORTS = """
import json, sys
from pathlib import Path
from daemon.config import load_config_text
from daemon import jobs

jobs.warm(load_config_text(""))
before = set(sys.modules)
from qc.io import open_scan_set
from qc.pipeline import QCSettings, run_qc, write_run_outputs
from qc.stitching import MemoryPairCache

for i, paths in enumerate(json.loads(sys.argv[1])):
    with open_scan_set([Path(p) for p in paths]) as scan:
        report = run_qc(scan, QCSettings(), MemoryPairCache())
        write_run_outputs(report, Path(sys.argv[2]) / str(i), scan_set=scan, fused_image=True)
libs = ("qc", "onnxruntime", "scipy", "h5py", "isal", "cv2", "skimage", "tifffile", "imagecodecs")
print(json.dumps(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in libs)))
"""


def test_a_warm_worker_has_imported_what_a_qc_job_needs_before_its_first_job(qc_files, tmp_path):
    """daemon.jobs.warm (called once per warm worker) imports every module QC, its outputs and a tile set's
    stitching and fusion need: a DAPI + IF set and a tile folder then import nothing more."""
    import json
    import os
    import sys

    from qc.testing.tiles import blob_texture, make_tile_set, write_tile_folder
    from tests.helpers import run_child

    tiles = make_tile_set(blob_texture((900, 900), seed=3), rows=2, cols=2, tile_size=400, overlap=0.1, seed=3)
    folder = write_tile_folder(tiles, tmp_path / "C02533C")
    sets = [[str(qc_files["nuclear"]), str(qc_files["if"])], [str(folder)]]
    repo = Path(__file__).resolve().parents[2]
    proc = run_child(
        [sys.executable, "-c", _FIRST_JOB_IMPORTS, json.dumps(sets), str(tmp_path / "out")],
        timeout=scaled(240),
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert imported == [], f"imported by the first job, not by warm(): {imported}"
