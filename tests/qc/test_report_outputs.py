"""Run outputs: written atomically, and the leftovers of a killed writer are recognised and removed."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

from qc.report import QCReport, abandoned_outputs, remove_abandoned_outputs, write_outputs
from tests.helpers import dead_pid, run_child

REPO = Path(__file__).resolve().parents[2]

# A child that starts writing a run and dies abruptly (no cleanup runs) while drawing the pictures.
_DIES_MID_WRITE = """
import os, sys
from qc.report import QCReport, write_outputs

def die(report, folder):
    (folder / "half.png").write_bytes(b"not finished")
    os._exit(9)

rep = QCReport(chip="C02533C", stain="DAPI", verdict="pass", reasons=(), images=(), duration_s=1.0,
               software_version="0.1.0", started_at=1_700_000_000.0)
write_outputs(rep, sys.argv[1], pictures=die)
"""


def _report(chip="C02533C", started_at=1_700_000_100.0) -> QCReport:
    return QCReport(
        chip=chip,
        stain="DAPI",
        verdict="pass",
        reasons=(),
        images=(),
        duration_s=1.0,
        software_version="0.1.0",
        started_at=started_at,
    )


def _host() -> str:
    from qc.report import _host_tag

    return _host_tag()


def test_a_writer_killed_mid_write_leaves_a_hidden_partial_that_is_removed(tmp_path):
    out = tmp_path / "outputs"
    finished = write_outputs(_report(), out)
    proc = run_child(
        [sys.executable, "-c", _DIES_MID_WRITE, str(out)],
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 9, proc.stderr
    leftovers = [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and (leftovers[0] / "pictures" / "half.png").exists()
    assert leftovers[0].name.startswith(".C02533C_20231114_221320_0.1.0.partial-")

    assert abandoned_outputs(out) == leftovers
    assert remove_abandoned_outputs(out) == leftovers
    assert not leftovers[0].exists()
    # the finished run is untouched
    assert sorted(p.name for p in out.iterdir()) == sorted([finished.folder.name, finished.archive.name])
    with tarfile.open(finished.archive) as tar:
        assert "imageqc/report.json" in tar.getnames()
    assert abandoned_outputs(out) == []


def test_only_dead_writers_on_this_host_count_as_abandoned(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    host, dead = _host(), dead_pid()
    dead_dir = out / f".C02533C_20231114_221320_0.1.0.partial-{host}-{dead}.k3j_x9"
    dead_arc = out / f".C02533C_20231114_221320_0.1.0.tar.gz.partial-{host}-{dead}"
    alive = out / f".C02533C_20231114_221321_0.1.0.partial-{host}-{os.getpid()}.abc123"  # a write under way
    other_host = out / f".C02533C_20231114_221322_0.1.0.partial-otherpc-{dead}.abc123"  # a shared folder
    unrelated = [out / ".DS_Store", out / ".C02533C.partial-notes", out / "C02533C_20231114_221323_0.1.0"]
    for d in (dead_dir, alive, other_host, unrelated[2]):
        d.mkdir()
        (d / "report.json").write_text("{}", encoding="utf-8")
    for f in (dead_arc, *unrelated[:2]):
        f.write_bytes(b"x")

    assert abandoned_outputs(out) == sorted([dead_dir, dead_arc])
    remove_abandoned_outputs(out)
    assert not dead_dir.exists() and not dead_arc.exists()
    assert alive.exists() and other_host.exists() and all(p.exists() for p in unrelated)


def test_a_missing_output_folder_has_nothing_abandoned(tmp_path):
    assert abandoned_outputs(tmp_path / "never-made") == []


def test_a_dead_writers_partial_inside_a_finished_run_folder_is_abandoned(tmp_path):
    """The IPR and a fused image are written into the run folder after the verdict; a killed writer's
    temporary file there is removed, a live writer's and the run's own files are kept."""
    out = tmp_path / "outputs"
    run = write_outputs(_report(), out, archive=False).folder
    host, dead = _host(), dead_pid()
    dead_fused = run / f".C02533C_fov_stitched.tif.partial-{host}-{dead}"
    dead_ipr = run / f".{run.name}.ipr.partial-{host}-{dead}"
    alive = run / f".C02533C_CD31_fov_stitched.tif.partial-{host}-{os.getpid()}"
    for f in (dead_fused, dead_ipr, alive):
        f.write_bytes(b"half")
    assert abandoned_outputs(out) == sorted([dead_fused, dead_ipr])
    remove_abandoned_outputs(out)
    assert sorted(p.name for p in run.iterdir()) == sorted([alive.name, "report.json"])
