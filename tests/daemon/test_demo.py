"""`imageqc demo` against a real running service: discovered, QC'd, uploaded, followed."""

from __future__ import annotations

from pathlib import Path

from daemon.cli import main
from daemon.service import Daemon, default_components
from daemon.store import Store
from tests.helpers import QC_NORMAL_PRIORITY


def test_demo_set_goes_through_discovery_qc_and_upload(tmp_path, capsys, monkeypatch):
    hpc = tmp_path / "hpc"
    hpc.mkdir()
    text = (
        'state_dir = "state"\n[[watch]]\npath = "inbox"\nsettle_seconds = 1\n'
        "[discovery]\ngrouping_window_s = 0.5\nrescan_interval_s = 2\n"
        '[service]\ntick_seconds = 0.2\nlease_seconds = 30\n[logging]\nconsole = "off"\n'
        + QC_NORMAL_PRIORITY
        + f'[[upload]]\nname = "hpc"\ntype = "hpc"\npath = "{hpc.as_posix()}"\nmode = "all"\n'
    )
    conf = tmp_path / "site.toml"
    conf.write_text(text)
    monkeypatch.setenv("IMAGEQC_CONFIG", str(conf))
    from daemon.config import load_config

    cfg = load_config(conf)
    d = Daemon(cfg, components=default_components(cfg))
    d.start()
    try:
        code = main(["demo", "--size", "1500", "--seconds", "1", "--follow", "--chip", "C02533C"])
        out = capsys.readouterr().out
        # a chip without lines fails QC: --follow exits 3, as `imageqc qc` does (#15)
        code_fail = main(["demo", "--size", "1500", "--seconds", "1", "--follow", "--chip", "A02677B5", "--no-lines"])
        out_fail = capsys.readouterr().out
    finally:
        d.stop()
    assert code == 0, out
    assert code_fail == 3 and "verdict: fail" in out_fail, out_fail
    assert "wrote C02533C.tif" in out and "job #1: running" in out and "job #1: done" in out
    assert "verdict: pass" in out
    with Store(cfg.database_path) as s:
        job = s.list_jobs(chip="C02533C")[0]
        assert job.state == "done" and job.chip == "C02533C"
        assert s.get_result(job.id)["report"]["stain"] == "DAPI+mIF"
    uploaded = sorted(p.name for p in hpc.rglob("*") if p.is_file())
    assert "C02533C.tif" in uploaded and "C02533C_CD31_IF.tif" in uploaded and "report.json" in uploaded
    assert any(n.endswith(".tar.gz") for n in uploaded)
    assert not list(hpc.rglob("*.imageqc-partial"))
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == [
        "A02677B5.tif",
        "A02677B5_CD31_IF.tif",
        "C02533C.tif",
        "C02533C_CD31_IF.tif",
    ]


def test_demo_refuses_names_the_service_would_not_take(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    assert main(["demo", "--chip", "my sample"]) == 2
    assert "not a name the service accepts" in capsys.readouterr().err
    assert not Path("inbox").exists() or not any(Path("inbox").iterdir())


def test_demo_follow_refuses_when_no_service_watches_the_folder(tmp_path, monkeypatch, capsys):
    """#15: --follow would wait half an hour for nothing; it says so at once and writes nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    from daemon import demo

    real = demo._no_service_watching
    monkeypatch.setattr(demo, "_no_service_watching", lambda cfg, folder: real(cfg, folder, wait_s=0.0))
    assert main(["demo", "--follow", "--seconds", "0"]) == 1
    err = capsys.readouterr().err
    assert "no service is running with state folder" in err and "imageqc run" in err
    assert not Path("inbox").exists() or not any(Path("inbox").iterdir())


def test_demo_without_the_stain_crops_says_how_to_give_them(tmp_path, monkeypatch, capsys):
    """#15: outside a source checkout the demo must say how to point at the data on the command line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    monkeypatch.setenv("IMAGEQC_SHARED_DATA", str(tmp_path / "nowhere"))
    assert main(["demo", "--seconds", "0"]) == 1
    err = capsys.readouterr().err
    assert f"none were found in {tmp_path / 'nowhere'}" in err and "imageqc demo --data /path/to/shared/data" in err
    assert main(["demo", "--seconds", "0", "--data", str(tmp_path)]) == 1
    assert f"none were found in {tmp_path}" in capsys.readouterr().err
