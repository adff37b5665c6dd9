"""Every `imageqc` command against a real state folder: output, JSON, exit codes, width."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from daemon.cli import main
from daemon.logging import bind_job, configure_logging, get_logger
from daemon.store import JobState, Store

ARCHIVE = "/srv/imageqc/outputs/a/rather/deep/folder/of/the/site/SS200000135TL_D1_20261202_101500_0.1.0.tar.gz"


@pytest.fixture
def state(make_config, tmp_path, monkeypatch):
    """A state folder with jobs in several states and a log, as the service leaves it."""
    cfg = make_config()
    monkeypatch.setenv("IMAGEQC_CONFIG", str(tmp_path / "imageqc.toml"))
    now = time.time()
    with Store(cfg.database_path) as s:
        ids = {}
        for i, (chip, _state) in enumerate(
            [
                ("SS200000135TL_D1", "done"),
                ("SS200000108BR_A3A4_CD31_IF_with_a_long_name", "failed"),
                ("C02533C", "running"),
                ("A02677B5", "queued"),
            ]
        ):
            ssid, _ = s.add_scan_set(
                chip=chip,
                root=str(cfg.watch[0].path),
                fingerprint=f"fp{i}",
                members=[{"name": chip, "path": f"{cfg.watch[0].path}/{chip}.tif", "size": 1_234_567}],
                now=now - 600,
            )
            ids[chip] = s.create_job(ssid, now=now - 600)
        done, failed, running = (
            ids["SS200000135TL_D1"],
            ids["SS200000108BR_A3A4_CD31_IF_with_a_long_name"],
            ids["C02533C"],
        )
        s.claim("w", now=now - 500)
        s.save_result(
            done,
            verdict="fail",
            report={"verdict": "fail", "reasons": ["track line score 42 < 60: few track crossings found"]},
            archive=ARCHIVE,
        )
        s.transition(done, JobState.QC_DONE, owner="w", now=now - 400)
        s.transition(done, JobState.SKIPPED, now=now - 399)
        s.claim("w", now=now - 300)
        s.transition(
            failed,
            JobState.FAILED,
            owner="w",
            error="CorruptImageError: " + "the TIFF is truncated " * 5,
            failed_stage="qc",
            now=now - 200,
        )
        s.claim("w", now=now - 100, lease_s=10**6)
        s.set_progress(running, "w", "clarity", 40.0)
    configure_logging(file=cfg.log_file, console="off")
    log = get_logger("imageqc.test")
    with bind_job(done, "SS200000135TL_D1"):
        log.info("qc finished", verdict="fail")
    with bind_job(failed, "SS200000108BR_A3A4_CD31_IF_with_a_long_name"):
        log.error("qc failed", error="truncated")
    log.debug("idle")
    configure_logging(console="off")
    logging.getLogger().handlers.clear()
    return cfg, ids


def _out(capsys):
    out = capsys.readouterr()
    return out.out, out.err


def _fits(text: str) -> None:
    """Every line within 80 columns, but a path to copy (printed whole on its own line)."""
    too_wide = [line for line in text.splitlines() if len(line) > 80 and not line.startswith("archive ")]
    assert not too_wide, too_wide


def test_status_json_and_human(state, capsys):
    _cfg, ids = state
    assert main(["status", "--json"]) == 0
    st = json.loads(_out(capsys)[0])
    assert st["schema"] == "imageqc.status/1"
    assert st["counts"]["skipped"] == 1 and st["counts"]["failed"] == 1 and st["counts"]["running"] == 1
    assert (
        st["active"][0]["chip"] == "C02533C"
        and st["active"][0]["stage"] == "clarity"
        and st["active"][0]["progress"] == 40.0
    )
    assert st["recent_errors"][0]["job_id"] == ids["SS200000108BR_A3A4_CD31_IF_with_a_long_name"]
    assert st["service"]["running"] is False
    assert st["disk"]["state_dir"]["free_bytes"] > 0
    assert main(["status"]) == 0
    text = _out(capsys)[0]
    _fits(text)
    assert "not running" in text and "clarity" in text and "40%" in text and "CorruptImageError" in text
    (verdict,) = st["recent_verdicts"]
    assert verdict["job_id"] == ids["SS200000135TL_D1"] and verdict["verdict"] == "fail"
    assert verdict["chip"] == "SS200000135TL_D1" and verdict["reason"].startswith("track line score 42 < 60")
    assert "recent QC" in text and "SS200000135TL_D1 FAIL" in text and "track line score 42" in text


def test_status_on_a_folder_where_nothing_ran(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--json"]) == 0
    st = json.loads(_out(capsys)[0])
    assert st["service"]["running"] is False and "never run" in st["service"]["reason"]
    assert not (tmp_path / ".imageqc").exists()  # status creates nothing


def test_a_database_damaged_inside_gives_one_clear_line_not_a_traceback(state, capsys):
    from tests.daemon.test_store import damage_pages

    cfg, _ids = state
    damage_pages(cfg.database_path)
    assert main(["jobs"]) == 1
    _, err = _out(capsys)
    assert err.startswith("imageqc: the job database") and "is damaged" in err and len(err.strip().splitlines()) == 1
    assert main(["status", "--json"]) == 0  # status still answers, with the reason
    st = json.loads(_out(capsys)[0])
    assert st["service"]["running"] is False and "is damaged" in st["service"]["reason"]


def test_jobs_lists_filters_and_json(state, capsys):
    _cfg, _ids = state
    assert main(["jobs"]) == 0
    text = _out(capsys)[0]
    _fits(text)
    assert text.index("A02677B5") < text.index("SS200000135TL_D1")  # newest first
    row = next(line for line in text.splitlines() if "SS200000135TL_D1" in line)
    assert " QC FAIL " in row and "track line score 42" in row  # the verdict and its first reason
    assert main(["jobs", "--chip", "SS200000135TL_D1", "--json"]) == 0
    (done,) = json.loads(_out(capsys)[0])["jobs"]
    assert done["verdict"] == "fail" and done["reason"].startswith("track line score 42 < 60")
    assert main(["jobs", "--state", "failed", "--json"]) == 0
    data = json.loads(_out(capsys)[0])
    assert data["schema"] == "imageqc.jobs/1"
    assert [j["chip"] for j in data["jobs"]] == ["SS200000108BR_A3A4_CD31_IF_with_a_long_name"]
    assert main(["jobs", "--chip", "C02533C", "--json"]) == 0
    (running,) = json.loads(_out(capsys)[0])["jobs"]
    assert running["state"] == "running" and running["verdict"] is None and running["reason"] is None
    assert main(["jobs", "--state", "nonsense"]) == 2


def test_show_human_and_json(state, capsys):
    _cfg, ids = state
    job = ids["SS200000135TL_D1"]
    assert main(["show", str(job)]) == 0
    text = _out(capsys)[0]
    _fits(text)
    assert "QC FAIL" in text.splitlines()[0] and "state skipped" in text.splitlines()[0]
    assert "verdict   FAIL" in text and "track line score 42 < 60" in text and "qc_done -> skipped" in text
    # the archive SAW takes is named whole, on one line to copy (the terminal wraps it)
    assert f"archive   {ARCHIVE}" in text.splitlines()
    assert "--image-tar" in text
    assert main(["show", str(job), "--json"]) == 0
    data = json.loads(_out(capsys)[0])
    assert data["schema"] == "imageqc.job/1" and data["job"]["state"] == "skipped"
    assert data["result"]["report"]["verdict"] == "fail"
    assert [e["to_state"] for e in data["events"]] == ["queued", "running", "qc_done", "skipped"]
    assert data["scan_set"]["members"][0]["size"] == 1_234_567
    assert main(["show", "999"]) == 2
    assert "no job 999" in _out(capsys)[1]


def test_retry_and_cancel(state, capsys):
    cfg, ids = state
    failed, queued = ids["SS200000108BR_A3A4_CD31_IF_with_a_long_name"], ids["A02677B5"]
    assert main(["retry", str(failed)]) == 0
    assert "queued" in _out(capsys)[0]
    assert main(["cancel", str(queued)]) == 0
    assert "cancelled" in _out(capsys)[0]
    with Store(cfg.database_path) as s:
        assert s.get_job(failed).state == "queued"
        assert s.get_job(queued).state == "failed" and s.get_job(queued).failed_stage == "cancelled"
    assert main(["retry", str(ids["C02533C"])]) == 1  # running: not retryable
    assert "only failed or skipped" in _out(capsys)[1]
    assert main(["cancel", "abc"]) == 2


def test_a_retried_job_shows_no_old_error_in_show_jobs_or_status(state, capsys):
    """The old failure is history once the job is queued again: `show` (both forms), `jobs --json` and
    `status --json` stop showing it as the job's error; `show`'s history still has it."""
    _cfg, ids = state
    failed = ids["SS200000108BR_A3A4_CD31_IF_with_a_long_name"]
    old = "CorruptImageError: the TIFF is truncated"
    assert main(["retry", str(failed)]) == 0
    _out(capsys)
    assert main(["show", str(failed), "--json"]) == 0
    data = json.loads(_out(capsys)[0])
    assert data["job"]["state"] == "queued" and data["job"]["error"] is None and data["job"]["failed_stage"] is None
    assert next(e["message"] for e in data["events"] if e["to_state"] == "failed").startswith(old)
    assert main(["show", str(failed)]) == 0
    text = _out(capsys)[0]
    assert not any(line.startswith("error") for line in text.splitlines()), text
    assert "failed  CorruptImageError:" in text  # in the history
    assert main(["jobs", "--json"]) == 0
    (job,) = [j for j in json.loads(_out(capsys)[0])["jobs"] if j["id"] == failed]
    assert job["state"] == "queued" and job["error"] is None
    assert main(["status", "--json"]) == 0
    assert json.loads(_out(capsys)[0])["recent_errors"] == []


def test_logs_filters_and_formats(state, capsys):
    _cfg, _ids = state
    assert main(["logs"]) == 0
    text = _out(capsys)[0]
    assert "qc finished" in text and "qc failed" in text
    assert main(["logs", "--level", "error"]) == 0
    lines = _out(capsys)[0].splitlines()
    assert len(lines) == 1 and "ERROR" in lines[0] and "qc failed" in lines[0]
    assert main(["logs", "--chip", "SS200000135TL_D1", "--json"]) == 0
    recs = [json.loads(x) for x in _out(capsys)[0].splitlines()]
    assert [r["event"] for r in recs] == ["qc finished"]
    assert main(["logs", "-n", "1"]) == 0
    assert len(_out(capsys)[0].splitlines()) == 1


def test_version_and_usage_errors(capsys):
    assert main(["version"]) == 0
    assert _out(capsys)[0].startswith("imageqc ")
    assert main(["version", "--json"]) == 0
    assert json.loads(_out(capsys)[0])["schema"] == "imageqc.version/1"
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in _out(capsys)[1]
    assert main([]) == 2
    assert main(["--help"]) == 0
    text = _out(capsys)[0]
    assert "run" in text and "status" in text
    _fits(text)


def test_a_bad_config_is_a_usage_error_for_every_command(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[service]\nworkers = -1\n")
    for cmd in (["status"], ["jobs"], ["show", "1"], ["logs"], ["run"]):
        assert main([*cmd, "--config", str(bad)]) == 2
        assert "service.workers: must be >= 1" in _out(capsys)[1]


ADVICE = (
    "SS200000135TL_D1.tif: track line score 12 < 60: no line grid found; check focus and exposure and that "
    "the chip serial SS200000135TL_D1 is right (its track template decides where lines are expected)"
)


@pytest.mark.parametrize("columns", [80, 200])
def test_no_human_view_cuts_the_reason_or_its_advice(make_config, tmp_path, monkeypatch, capsys, columns):
    """#15: status, jobs, show, uploads and logs print the whole reason and advice at 80 and 200 columns."""
    cfg = make_config()
    monkeypatch.setenv("IMAGEQC_CONFIG", str(tmp_path / "imageqc.toml"))
    monkeypatch.setenv("COLUMNS", str(columns))
    error = (
        "upload target 'hpc': the share /mnt/hpc/stereo-seq/site-a/incoming is full. free space there; uploads resume "
        * 2
    )
    checks = [
        {
            "metric": "track",
            "image": "SS200000135TL_D1",
            "value": 12.0,
            "threshold": ">= 60",
            "passed": False,
            "required": True,
            "reason": ADVICE,
            "detail": None,
        },
        {
            "metric": "clarity",
            "image": "SS200000135TL_D1",
            "value": 71.5,
            "threshold": ">= 80",
            "passed": False,
            "required": False,
            "reason": "clarity 71.5 < 80 (advisory)",
            "detail": None,
        },
        {
            "metric": "calibration",
            "image": "SS200000135TL_D1_CD31_IF",
            "value": 0.41,
            "threshold": "offset <= 20 px, similarity >= 0.01",
            "passed": True,
            "required": True,
            "reason": None,
            "detail": "offset 7.2 px, similarity 0.410",
        },
    ]
    with Store(cfg.database_path) as s:
        ssid, _ = s.add_scan_set(
            chip="SS200000135TL_D1",
            root=str(cfg.watch[0].path),
            fingerprint="fp",
            members=[{"name": "SS200000135TL_D1", "path": "x.tif", "size": 1}],
        )
        job = s.create_job(ssid)
        s.claim("w")
        s.save_result(
            job, verdict="fail", report={"verdict": "fail", "reasons": [ADVICE], "checks": checks}, archive=ARCHIVE
        )
        s.transition(job, JobState.QC_DONE, owner="w")
        s.transition(job, JobState.SKIPPED)
        ssid2, _ = s.add_scan_set(
            chip="A02677B5",
            root=str(cfg.watch[0].path),
            fingerprint="fp2",
            members=[{"name": "A02677B5", "path": "y.tif", "size": 1}],
        )
        job2 = s.create_job(ssid2)
        s.claim("w")
        s.transition(job2, JobState.FAILED, owner="w", error=error, failed_stage="upload")
        s.plan_uploads(
            job2,
            [
                {
                    "target": "hpc",
                    "kind": "input",
                    "local_path": "y.tif",
                    "remote_key": "site-a/" + "deep/" * 20 + "A02677B5.tif",
                    "size": 1,
                    "mtime_ns": 1,
                }
            ],
        )
    configure_logging(file=cfg.log_file, console="off")
    with bind_job(job, "SS200000135TL_D1"):
        get_logger("imageqc.test").warning("qc verdict", reason=ADVICE)
    configure_logging(console="off")
    logging.getLogger().handlers.clear()

    for argv, wanted in (
        (["status"], [ADVICE, error.strip()]),
        (["jobs"], [ADVICE, error.strip()]),
        (
            ["show", str(job)],
            [ADVICE, ARCHIVE, "offset 7.2 px, similarity 0.410", "offset <= 20 px, similarity >= 0.01"],
        ),
        (["uploads"], ["site-a/" + "deep/" * 20 + "A02677B5.tif"]),
        (["logs"], [ADVICE]),
    ):
        assert main(argv) == 0, argv
        text = _out(capsys)[0]
        if argv != ["logs"]:  # log lines stay whole lines (grep); a terminal wraps them
            too_wide = [line for line in text.splitlines() if len(line) > columns and not line.startswith("archive ")]
            assert not too_wide, (argv, too_wide)
        for w in wanted:  # wrapped or folded, never cut: every character is there, in order
            assert "".join(w.split()) in "".join(text.split()), (argv, w, text)
    assert main(["show", str(job)]) == 0
    text = _out(capsys)[0]
    flat = " ".join(text.split())
    assert "track SS200000135TL_D1: 12 (needs >= 60) FAIL" in flat
    assert "clarity SS200000135TL_D1: 72 (needs >= 80) below (advisory: does not fail QC)" in flat


def test_retry_qc_runs_qc_again_for_a_skipped_or_failed_upload_job(state, capsys):
    """#15: `retry --qc` sends a job back to QC whatever stopped it; plain retry resumes where it stopped."""
    cfg, ids = state
    skipped = ids["SS200000135TL_D1"]
    assert main(["retry", str(skipped)]) == 0  # plain: back to qc_done (upload, if one is configured now)
    assert "qc_done" in _out(capsys)[0]
    with Store(cfg.database_path) as s:
        s.transition(skipped, JobState.SKIPPED)
    assert main(["retry", "--qc", str(skipped)]) == 0
    assert "queued" in _out(capsys)[0]
    with Store(cfg.database_path) as s:
        job = s.get_job(skipped)
        assert job.state == "queued"
        assert s.events(skipped)[-1].message == "retry requested, QC runs again"
    assert main(["retry", "--qc", str(ids["C02533C"])]) == 1  # running: nothing to retry
    assert "only failed or skipped" in _out(capsys)[1]


def _strict_json(text: str):
    """Parse JSON as other programs do: ``Infinity`` and ``NaN`` are not JSON."""

    def refuse(name):
        raise AssertionError(f"{name} in the JSON output")

    return json.loads(text, parse_constant=refuse)


def test_infinite_times_an_older_recovery_stamped_are_shown_as_a_dash_and_null(state, capsys):
    """Issue #20 case 7: an older version recovered with now=inf, stamping inf into the job's and its
    event's times; every reader showed it for good (OverflowError in `show`, `Infinity` in --json)."""
    cfg, ids = state
    job = ids["A02677B5"]
    inf = float("inf")
    with Store(cfg.database_path) as s, s.db() as c:  # the rows exactly as that recovery wrote them
        c.execute("UPDATE jobs SET updated_at = ?, queued_at = ? WHERE id = ?", (inf, inf, job))
        c.execute("UPDATE events SET at = ? WHERE job_id = ?", (inf, job))
        c.execute(
            "UPDATE jobs SET next_attempt_at = ? WHERE id = ?",
            (inf, ids["SS200000108BR_A3A4_CD31_IF_with_a_long_name"]),
        )
    assert main(["show", str(job)]) == 0
    text = _out(capsys)[0]
    assert re.search(r"^\s+-\s+- -> queued", text, re.MULTILINE), text  # the history line's time is '-'
    assert main(["show", str(job), "--json"]) == 0
    data = _strict_json(_out(capsys)[0])
    assert data["job"]["updated_at"] is None and data["job"]["queued_at"] is None and data["events"][0]["at"] is None
    assert main(["jobs"]) == 0
    row = next(line for line in _out(capsys)[0].splitlines() if "A02677B5" in line)
    assert " - " in row
    assert main(["jobs", "--json"]) == 0
    assert any(j["updated_at"] is None for j in _strict_json(_out(capsys)[0])["jobs"])
    assert main(["status"]) == 0
    assert "CorruptImageError" in _out(capsys)[0]
    assert main(["status", "--json"]) == 0
    assert _strict_json(_out(capsys)[0])["recent_errors"][0]["retry_at"] is None
