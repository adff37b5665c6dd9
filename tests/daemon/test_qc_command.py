"""`imageqc qc` end to end: verdict, JSON report, outputs and exit codes."""

from __future__ import annotations

import json
import tarfile

from daemon.cli import main
from tests.daemon.conftest import CHIP


def test_qc_passes_prints_the_verdict_and_writes_outputs(qc_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    code = main(["qc", str(qc_files["nuclear"]), str(qc_files["if"]), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith(f"{CHIP}  DAPI+mIF  PASS")
    assert all(len(line) <= 80 for line in out.splitlines())
    archives = list((tmp_path / "out").glob(f"{CHIP}_*.tar.gz"))
    assert len(archives) == 1
    with tarfile.open(archives[0]) as tar:
        names = tar.getnames()
    assert any(n.endswith(f"pictures/{CHIP}_CD31_IF_calibration.png") for n in names)


def test_qc_json_is_the_report_contract(qc_files, capsys):
    assert main(["qc", str(qc_files["nuclear"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "imageqc.report/1" and doc["verdict"] == "pass" and doc["stain"] == "DAPI"
    assert set(doc) >= {"chip", "stain", "verdict", "reasons", "images", "duration_s", "software"}


def test_qc_fail_exits_3_with_reasons(qc_files, capsys):
    assert main(["qc", str(qc_files["fail"])]) == 3
    out = capsys.readouterr().out
    assert "FAIL" in out and "track line score" in out


def test_qc_usage_and_read_errors(qc_files, tmp_path, capsys):
    assert main(["qc", str(tmp_path / "nope.tif")]) == 2
    assert "no such file" in capsys.readouterr().err
    broken = tmp_path / f"{CHIP}.tif"
    broken.write_bytes(qc_files["nuclear"].read_bytes()[:5000])
    assert main(["qc", str(broken)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("imageqc qc: ") and str(broken) in err and len(err.splitlines()) == 1
    assert main(["qc"]) == 2
