"""Every PC's status in the bucket (daemon/fleet.py, issue #19 part 3): three real services write their fleet
documents into moto's S3 server, one of them with its wall clock an hour behind (stale); `imageqc fleet` reads them
back and lists stale, stopped and failing PCs first."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.cli import main
from daemon.config import load_config_text
from daemon.fleet import FLEET_SCHEMA, FleetReporter, read_fleet
from daemon.service import Daemon
from daemon.store import JobState, Store
from tests.helpers import QC_NORMAL_PRIORITY, wait_until

from .conftest import S3_KEYS, new_bucket

SITE = "lab-7"


@pytest.fixture
def s3_env(monkeypatch):
    monkeypatch.setenv("IMAGEQC_T_ACCESS_KEY_ID", S3_KEYS[0])
    monkeypatch.setenv("IMAGEQC_T_SECRET_ACCESS_KEY", S3_KEYS[1])


def pc_config(base: Path, host: str, upload: str):
    folder = base / host
    (folder / "inbox").mkdir(parents=True, exist_ok=True)
    text = (
        f'state_dir = "state"\n[[watch]]\npath = "inbox"\n[site]\nname = "{SITE}"\n[service]\ntick_seconds = 0.2\n'
        f'[logging]\nconsole = "off"\n{QC_NORMAL_PRIORITY}[fleet]\ninterval_s = 60\nhost = "{host}"\n{upload}'
    )
    (folder / "imageqc.toml").write_text(text, encoding="utf-8")
    return load_config_text(text, file=str(folder / "imageqc.toml"), base=folder)


def s3_target(endpoint: str, bucket: str) -> str:
    return (
        '[[upload]]\nname = "lab-s3"\ntype = "s3"\n'
        f'endpoint = "{endpoint}"\nbucket = "{bucket}"\nregion = "us-east-1"\naddressing_style = "path"\n'
        'prefix = "stereo"\ncredentials = "env:IMAGEQC_T"\n'
    )


def printed_json(out: str) -> dict:
    """The JSON document in ``out``, between the services' own log lines."""
    lines = out.splitlines()
    start = lines.index("{")
    return json.loads("\n".join(lines[start : lines.index("}", start) + 1]))


def failed_qc(cfg) -> None:
    """A chip that failed QC, as the service leaves it."""
    with Store(cfg.database_path) as s:
        ssid, _ = s.add_scan_set(
            chip="C02533C",
            root=str(cfg.watch[0].path),
            fingerprint="fp",
            members=[{"name": "C02533C", "path": "x", "size": 1}],
        )
        job_id = s.create_job(ssid)
        s.claim("t")
        s.save_result(job_id, verdict="fail", report={"verdict": "fail", "reasons": ["track line score 12 < 60"]})
        s.transition(job_id, JobState.QC_DONE, owner="t")
        s.transition(job_id, JobState.SKIPPED)


def test_three_services_write_their_status_and_imageqc_fleet_lists_stale_and_failing_first(
    tmp_path, s3_server, s3_env, capsys
):
    bucket = new_bucket(s3_server)
    upload = s3_target(s3_server.endpoint, bucket)
    cfgs = {h: pc_config(tmp_path, h, upload) for h in ("pc-ok", "pc-fail", "pc-late")}
    failed_qc(cfgs["pc-fail"])

    def behind():
        return time.time() - 3600

    daemons = {
        h: Daemon(
            c,
            target="tests.daemon.targets:ok",
            components=[FleetReporter(c)],
            clock=behind if h == "pc-late" else time.time,
        )
        for h, c in cfgs.items()
    }
    for d in daemons.values():
        d.start()
    try:
        for d in daemons.values():
            rep = d.components[0]
            wait_until(
                lambda rep=rep: "lab-s3" in rep.health()["written"],
                "'lab-s3' in rep.health()['written']",
                timeout=60,
                seen=lambda rep=rep: rep.health(),
            )
        key = f"stereo/_fleet/{SITE}/pc-ok.json"
        doc = json.loads(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
        assert (
            doc["schema"] == FLEET_SCHEMA
            and doc["host"] == "pc-ok"
            and doc["site"] == SITE
            and doc["state"] == "running"
        )
        assert {"version", "heartbeat", "counts", "waiting", "last_verdicts", "uploads", "disk"} <= set(doc)
        assert doc["waiting"]["sets_total"] == 0 and doc["counts"]["queued"] == 0

        capsys.readouterr()
        assert main(["fleet", "--config", str(tmp_path / "pc-ok" / "imageqc.toml"), "--json"]) == 0
        listed = printed_json(capsys.readouterr().out)
        assert [(p["document"]["host"], p["kind"]) for p in listed["pcs"]] == [
            ("pc-late", "stale"),
            ("pc-fail", "failing"),
            ("pc-ok", "ok"),
        ]
        stale, failing, _ = listed["pcs"]
        assert stale["problems"][0].startswith("no status for 60 min")
        assert "last QC FAIL: C02533C (track line score 12 < 60)" in failing["problems"]
        assert listed["targets"] == {"lab-s3": {"error": None, "documents": 3}}

        assert main(["fleet", "--config", str(tmp_path / "pc-ok" / "imageqc.toml"), "--target", "lab-s3"]) == 0
        lines = [
            ln for ln in capsys.readouterr().out.splitlines() if " [info     ] " not in ln
        ]  # the services' own log
        heads = [ln for ln in lines if not ln.startswith(" ")]
        assert [h.split()[0:2] for h in heads] == [
            ["STALE", f"{SITE}/pc-late"],
            ["FAILING", f"{SITE}/pc-fail"],
            ["OK", f"{SITE}/pc-ok"],
        ]
        assert any("last QC FAIL: C02533C" in ln for ln in lines)
    finally:
        for d in daemons.values():
            d.stop()
    # a clean stop writes one last document; the late PC's stays stale
    report = read_fleet(cfgs["pc-ok"])
    assert [(p["document"]["host"], p["kind"]) for p in report["pcs"]] == [
        ("pc-late", "stale"),
        ("pc-fail", "stopped"),
        ("pc-ok", "stopped"),
    ]


def test_the_document_is_rewritten_every_interval_and_a_failing_target_is_said_once(tmp_path):
    share = tmp_path / "share"
    upload = f'[[upload]]\nname = "hpc"\ntype = "hpc"\npath = "{share.as_posix()}"\nmode = "inputs"\n'
    cfg = pc_config(tmp_path, "pc-1", upload)
    with Store(cfg.database_path):
        pass
    now = [1_000_000.0]
    rep = FleetReporter(cfg, clock=lambda: now[0])
    with capture_logs() as logs:
        rep.start()
        try:
            rep.tick(now[0])  # the share is not mounted: said once, retried next interval
            wait_until(lambda: "hpc" in rep.health()["errors"], "the unreachable share to be reported")
            assert "not reachable" in rep.health()["errors"]["hpc"]
            share.mkdir()
            now[0] += 30
            rep.tick(now[0])  # not due yet: the writer is not woken, the error stands
            assert not rep._wake.is_set() and "hpc" in rep.health()["errors"]
            now[0] += 30
            rep.tick(now[0])  # one interval after the first write
            wait_until(lambda: "hpc" in rep.health()["written"], "the document written to the share")
            path = share / "_fleet" / SITE / "pc-1.json"
            assert json.loads(path.read_text())["heartbeat"] == now[0]
            assert not list(path.parent.glob(".*"))  # written whole, no partial left
        finally:
            rep.stop()
    assert json.loads(path.read_text())["state"] == "stopped"
    warnings = [r for r in logs if r["event"] == "could not write the fleet status; retried next interval"]
    assert len(warnings) == 1 and str(share) in warnings[0]["error"]
    assert any(r["event"] == "fleet status written again" for r in logs)


def test_fleet_command_says_what_is_missing(tmp_path, capsys):
    cfg_path = tmp_path / "pc" / "imageqc.toml"
    pc_config(tmp_path, "pc", "")
    assert main(["fleet", "--config", str(cfg_path)]) == 1
    assert "has no upload target" in capsys.readouterr().out
    pc_config(tmp_path, "pc", f'[[upload]]\nname = "hpc"\ntype = "hpc"\npath = "{(tmp_path / "gone").as_posix()}"\n')
    assert main(["fleet", "--config", str(cfg_path), "--target", "nas"]) == 1
    assert "no upload target named 'nas'" in capsys.readouterr().out
    assert main(["fleet", "--config", str(cfg_path)]) == 1  # the share is not there: said, exit 1
    assert "could not read target 'hpc'" in capsys.readouterr().out
