"""Hostile files met by the readers and the names we derive (issue #20, cases 9, 11, 13, 14, 15).

Each fault is real: a TIFF whose SubIFD points at itself, a 250-character
IF name, a symbolic-link loop and a link out of the root inside a tile
folder, a small tar.gz that expands far beyond its size, and onnxruntime
loaded under an empty home folder. The units at fault are exercised directly
(a QC run in a child process where the process matters), so these tests take
a few seconds, not a service's start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHIP = "SS200000601TL_D1"


@pytest.fixture(scope="module")
def chip_tif(tmp_path_factory, shared_data) -> Path:
    """One small generated DAPI chip (1200 px at scale 0.5) that passes QC."""
    import tifffile

    from qc.testing.chips import generate_chip

    root = tmp_path_factory.mktemp("readers")
    chip = generate_chip(data_dir=shared_data, seed=31, width=1200, height=1200, scale=(0.5, 0.5), angle_deg=-1.0)
    path = root / f"{CHIP}.tif"
    tifffile.imwrite(path, chip.image)
    return path


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORT_", "IMAGEQC_", "XDG_"))}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


# ---------------------------------------------------------------------------
# Case 15: onnxruntime telemetry
# ---------------------------------------------------------------------------


def test_a_qc_run_writes_nothing_under_the_users_home(chip_tif, tmp_path):
    """onnxruntime loads with its telemetry off: no ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``."""
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "qc", str(chip_tif), "--out", str(out), "--json"],
        check=False, cwd=tmp_path, env=_child_env(HOME=str(home), USERPROFILE=str(home)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["images"][0]["clarity"] is not None  # the ONNX model did run
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
