"""Notifications (issue #15): outbox, apprise delivery to real servers on 127.0.0.1, dedupe, kill -9, backoff.

The endpoints are real: an HTTP server receiving apprise's JSON webhook (``json://``, attachments
base64 in the payload) and an SMTP server (aiosmtpd) receiving ``mailto://`` mail without TLS.
Time is passed in as ``now``; nothing here sleeps to wait for a backoff.
"""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import json
import os
import socket
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from daemon.cli import main
from daemon.config import load_config_text
from daemon.errors import IllegalTransition
from daemon.notify import Notifier, summary_picture
from daemon.service import Daemon
from daemon.store import JobState, Store
from tests.daemon.test_config import _err
from tests.helpers import run_child, scaled, wait_until
from tests.webhook import TOKEN, Webhook

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0
CHIP = "C02533C"
REASONS = [
    "track line score 12 < 60: no line grid found; check focus and exposure and that the chip serial is right",
    "clarity score 41 < 80: mostly severe blur; check the focus before the next scan",
]


# ---------------------------------------------------------------------------
# Real endpoints on 127.0.0.1
# ---------------------------------------------------------------------------


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp():
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self) -> None:
            self.mails: list[tuple[list[str], bytes]] = []

        async def handle_DATA(self, server, session, envelope):
            self.mails.append((list(envelope.rcpt_tos), envelope.content))
            return "250 OK"

    inbox = Inbox()
    port = _free_port()
    ctl = Controller(inbox, hostname="127.0.0.1", port=port)
    ctl.start()
    inbox.url = f"mailto://127.0.0.1:{port}?from=imageqc@lab.example&to=tech@lab.example"  # type: ignore[attr-defined]
    yield inbox
    ctl.stop()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

RULE = '[[notify.rule]]\nname = "lab"\nurls = ["env:IMAGEQC_TEST_HOOK"]\n'


@pytest.fixture
def cfg_for(make_config):
    def make(rule: str = RULE, notify: str = "") -> object:
        settings = {"retry_base_s": "60", "retry_max_s": "600", "timeout_s": "5"}
        settings.update(line.split(" = ", 1) for line in notify.splitlines() if line.strip())  # type: ignore[misc]
        return make_config("[notify]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()) + "\n" + rule)

    return make


def _picture(folder: Path, name: str) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", np.full((8, 8, 3), 200, np.uint8))
    assert ok
    (folder / name).write_bytes(buf.tobytes())
    return buf.tobytes()


def _qc_job(
    store: Store, out: Path, *, chip: str = CHIP, verdict: str = "fail", fp: str = "fp", now: float = T0
) -> int:
    ssid, _ = store.add_scan_set(chip=chip, root="/scans", fingerprint=fp, members=[], now=now)
    job_id = store.create_job(ssid, now=now)
    assert job_id is not None
    store.claim("w", now=now)
    report = {
        "schema": "imageqc.report/1",
        "chip": chip,
        "stain": "DAPI",
        "verdict": verdict,
        "reasons": REASONS if verdict == "fail" else [],
        "images": [{"name": chip, "role": "nuclear"}],
    }
    store.save_result(job_id, verdict=verdict, report=report, output_dir=str(out), now=now)
    store.transition(job_id, JobState.QC_DONE, owner="w", now=now, message=f"QC {verdict}")
    return job_id


def _failed_job(
    store: Store, *, fp: str = "ff", retry_at: float | None = None, stage: str = "upload", now: float = T0
) -> int:
    ssid, _ = store.add_scan_set(chip="SS200000135TL_D1", root="/scans", fingerprint=fp, members=[], now=now)
    job_id = store.create_job(ssid, now=now)
    assert job_id is not None
    store.claim("w", now=now)
    store.transition(
        job_id,
        JobState.FAILED,
        owner="w",
        now=now,
        error="upload target 'hpc': access denied",
        failed_stage=stage,
        next_attempt_at=retry_at,
    )
    return job_id


def _notifier(cfg, url: str, **kw) -> tuple[Notifier, Store]:
    store = Store(cfg.database_path)
    n = Notifier(cfg, store=store, environ={"IMAGEQC_TEST_HOOK": url}, tz=timezone.utc, **kw)
    n.start()
    return n, store


# ---------------------------------------------------------------------------
# What arrives
# ---------------------------------------------------------------------------


def test_qc_fail_reaches_a_json_webhook_with_chip_reason_advice_and_picture(cfg_for, webhook, tmp_path):
    cfg = cfg_for()
    n, store = _notifier(cfg, webhook.url)
    with store:
        out = tmp_path / "out" / f"{CHIP}_run"
        png = _picture(out / "pictures", f"{CHIP}_track.png")
        _picture(out / "pictures", f"{CHIP}_clarity.png")
        job_id = _qc_job(store, out)
        assert n.enqueue(now=T0 + 1) == 1
        assert n.deliver(now=T0 + 1) == 1
        assert len(webhook.messages) == 1
        path, payload = webhook.messages[0]
        assert path == f"/hook/{TOKEN}"
        assert CHIP in payload["title"] and "fail" in payload["title"]
        body = payload["message"]
        assert CHIP in body and REASONS[0] in body and REASONS[1] in body  # first reason and the advice
        assert f"imageqc show {job_id}" in body
        (att,) = payload["attachments"]
        assert att["filename"] == f"{CHIP}_track.png" and att["mimetype"] == "image/png"
        assert base64.b64decode(att["base64"]) == png
        (row,) = store.outbox()
        assert row.state == "sent" and row.delivered == ["lab[0]"] and row.attempts == 1 and row.job_id == job_id
        assert n.deliver(now=T0 + 2) == 0 and len(webhook.messages) == 1


def test_a_summary_sheet_is_preferred_to_the_track_picture(tmp_path):
    pics = tmp_path / "pictures"
    _picture(pics, f"{CHIP}_track.png")
    report = {"images": [{"name": CHIP, "role": "nuclear"}]}
    assert summary_picture(str(tmp_path), report) == pics / f"{CHIP}_track.png"
    _picture(pics, f"{CHIP}_summary.png")
    assert summary_picture(str(tmp_path), report) == pics / f"{CHIP}_summary.png"
    assert summary_picture(str(tmp_path / "nothing"), report) is None


def test_qc_fail_reaches_a_real_smtp_server_as_mail_with_the_picture(cfg_for, smtp, tmp_path):
    cfg = cfg_for()
    n, store = _notifier(cfg, smtp.url)
    with store:
        out = tmp_path / "out" / "run"
        png = _picture(out / "pictures", f"{CHIP}_track.png")
        _qc_job(store, out)
        n.enqueue(now=T0 + 1)
        assert n.deliver(now=T0 + 1) == 1
    assert len(smtp.mails) == 1
    rcpts, raw = smtp.mails[0]
    assert rcpts == ["tech@lab.example"]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert CHIP in msg["Subject"]
    text = msg.get_body(preferencelist=("plain", "html")).get_content()
    assert REASONS[0] in text
    (att,) = list(msg.iter_attachments())
    assert att.get_filename() == f"{CHIP}_track.png" and att.get_content() == png


def test_qc_pass_is_off_by_default_and_sent_when_a_rule_takes_it(cfg_for, webhook, tmp_path):
    cfg = cfg_for()
    n, store = _notifier(cfg, webhook.url)
    with store:
        _qc_job(store, tmp_path / "a", verdict="pass", fp="a")
        assert n.enqueue(now=T0 + 1) == 0
    cfg2 = cfg_for(RULE + 'events = ["qc_pass"]\n')
    n2, store2 = _notifier(cfg2, webhook.url)
    with store2:
        _qc_job(store2, tmp_path / "b", verdict="pass", fp="b", chip="SS200000135TL_D1")
        assert n2.enqueue(now=T0 + 2) == 1
        n2.deliver(now=T0 + 2)
    assert [p["title"] for _, p in webhook.messages] == ["imageqc: QC pass SS200000135TL_D1"]


def test_job_failed_only_for_good(cfg_for, webhook):
    cfg = cfg_for()
    n, store = _notifier(cfg, webhook.url)
    with store:
        final = _failed_job(store, fp="final")
        _failed_job(store, fp="retrying", retry_at=T0 + 100)
        ssid, _ = store.add_scan_set(chip="C02533C", root="/scans", fingerprint="cancel", members=[], now=T0)
        cancelled = store.create_job(ssid, now=T0)
        assert cancelled is not None
        store.cancel(cancelled, now=T0)  # by hand: nobody needs telling
        assert n.enqueue(now=T0 + 1) == 1
        # a retry that the service gives up on (service.max_attempts) is a final failure too
        gave_up = _failed_job(store, fp="gave-up", stage="qc", retry_at=T0 + 5)
        store.requeue_due(now=T0 + 6, max_attempts=1)
        assert n.enqueue(now=T0 + 7) == 1
        assert [r.job_id for r in store.outbox()] == [final, gave_up]
        n.deliver(now=T0 + 8)
        assert n.enqueue(now=T0 + 9) == 0  # nothing new: the final failure and its giving up were one message
        store.retry(final, qc=True, now=T0 + 10)  # fixed by hand, and it fails again: a new message
        store.claim("w", now=T0 + 11)
        store.transition(final, JobState.FAILED, owner="w", now=T0 + 12, error="access denied again")
        assert n.enqueue(now=T0 + 13) == 1
        n.deliver(now=T0 + 14)
    bodies = [p["message"] for _, p in webhook.messages]
    assert len(bodies) == 3 and "access denied" in bodies[0] and f"imageqc retry {final}" in bodies[0]
    assert "access denied again" in bodies[2]


# ---------------------------------------------------------------------------
# Dedupe and kill -9
# ---------------------------------------------------------------------------


def test_enqueueing_twice_or_after_a_restart_sends_one_message(cfg_for, webhook, tmp_path):
    cfg = cfg_for()
    n, store = _notifier(cfg, webhook.url)
    with store:
        _qc_job(store, tmp_path / "out")
        assert n.enqueue(now=T0 + 1) == 1
        assert n.enqueue(now=T0 + 2) == 0
        row = store.outbox()[0]
        dup = {"event": row.event, "key": row.key, "job_id": row.job_id, "title": "again", "body": "again"}
        assert store.outbox_add([dup], now=T0 + 3) == 0  # (job, event) is unique in the table itself
        with store.db() as c:  # forget the cursor: a restart that reads the whole history again
            c.execute("UPDATE kv SET value = ? WHERE namespace = 'notify' AND key = 'cursor'", (b"0",))
    again, store2 = _notifier(cfg, webhook.url)
    with store2:
        assert again.enqueue(now=T0 + 4) == 0
        assert again.deliver(now=T0 + 5) == 1
        assert again.deliver(now=T0 + 6) == 0
    assert len(webhook.messages) == 1


def test_a_verdict_announced_while_the_job_still_writes_the_archive_is_sent_then_and_once(cfg_for, webhook, tmp_path):
    """The QC child announces the verdict (report and pictures written) before it writes the IPR and archive:
    the message goes out while the job is still running, and its qc_done later adds nothing."""
    cfg = cfg_for()
    n, store = _notifier(cfg, webhook.url)
    with store:
        out = tmp_path / "out" / f"{CHIP}_run"
        _picture(out / "pictures", f"{CHIP}_summary.png")
        ssid, _ = store.add_scan_set(chip=CHIP, root="/scans", fingerprint="early", members=[], now=T0)
        job_id = store.create_job(ssid, now=T0)
        assert job_id is not None
        store.claim("w", now=T0)
        report = {"chip": CHIP, "stain": "DAPI", "verdict": "fail", "reasons": REASONS}
        store.save_result(job_id, verdict="fail", report=report, output_dir=str(out), owner="w", announce=True, now=T0)
        assert store.get_job(job_id).state == JobState.RUNNING
        assert [e.message for e in store.events(job_id, kinds=["verdict"])] == [f"QC fail: {REASONS[0]}"]
        assert n.enqueue(now=T0 + 1) == 1
        assert n.deliver(now=T0 + 1) == 1
        store.set_archive(job_id, str(out) + ".tar.gz", owner="w")
        store.transition(job_id, JobState.QC_DONE, owner="w", now=T0 + 5, message="QC fail")
        assert n.enqueue(now=T0 + 6) == 0
        assert n.deliver(now=T0 + 6) == 0
        assert store.get_result(job_id)["archive"] == str(out) + ".tar.gz"
        with pytest.raises(IllegalTransition):  # only the job's owner, while it runs
            store.set_archive(job_id, None, owner="w")
    assert len(webhook.messages) == 1
    title, body = webhook.messages[0][1]["title"], webhook.messages[0][1]["message"]
    assert CHIP in title and "fail" in title and REASONS[0] in body


def test_qc_run_again_after_its_archive_failed_sends_its_verdict_once(cfg_for, webhook, tmp_path):
    """Verdict announced, archive failed (disk full, retried), QC run again with the same verdict: one message.
    A rerun whose verdict changed is a new event and sends its own."""
    cfg = cfg_for(RULE + 'events = ["qc_fail", "qc_pass", "job_failed"]\n')
    n, store = _notifier(cfg, webhook.url)
    with store:
        ssid, _ = store.add_scan_set(chip=CHIP, root="/scans", fingerprint="rerun", members=[], now=T0)
        job_id = store.create_job(ssid, now=T0)
        assert job_id is not None
        report = {"chip": CHIP, "verdict": "fail", "reasons": REASONS}
        for attempt in range(2):
            t = T0 + 10 * attempt
            store.claim("w", now=t)
            store.save_result(job_id, verdict="fail", report=report, owner="w", announce=True, now=t)
            n.enqueue(now=t + 1)
            n.deliver(now=t + 1)
            if attempt == 0:  # the archive: disk full, a transient failure, retried
                store.transition(
                    job_id, JobState.FAILED, owner="w", now=t + 2, error="disk full", next_attempt_at=t + 3
                )
                assert store.requeue_due(now=t + 3) == [job_id]
        store.transition(job_id, JobState.QC_DONE, owner="w", now=T0 + 15)
        assert n.enqueue(now=T0 + 16) == 0
        assert len(webhook.messages) == 1 and len(store.events(job_id, kinds=["verdict"])) == 1
        store.transition(job_id, JobState.SKIPPED, now=T0 + 20)
        store.retry(job_id, qc=True, now=T0 + 21)  # thresholds changed: QC again, and now it passes
        store.claim("w", now=T0 + 22)
        store.save_result(
            job_id,
            verdict="pass",
            report={**report, "verdict": "pass", "reasons": []},
            owner="w",
            announce=True,
            now=T0 + 22,
        )
        assert n.enqueue(now=T0 + 23) == 1
        n.deliver(now=T0 + 23)
        store.transition(job_id, JobState.QC_DONE, owner="w", now=T0 + 24)
        store.transition(job_id, JobState.SKIPPED, now=T0 + 25)
        store.retry(job_id, qc=True, now=T0 + 26)  # changed back: it fails again, and people hear of it again
        store.claim("w", now=T0 + 27)
        store.save_result(job_id, verdict="fail", report=report, owner="w", announce=True, now=T0 + 27)
        assert n.enqueue(now=T0 + 28) == 1
        n.deliver(now=T0 + 28)
    assert [p["title"] for _, p in webhook.messages] == [
        f"imageqc: QC fail {CHIP}",
        f"imageqc: QC pass {CHIP}",
        f"imageqc: QC fail {CHIP}",
    ]


_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from daemon.config import load_config
    from daemon.notify import Notifier
    from daemon.store import JobState, Store

    cfg = load_config(sys.argv[1])
    store = Store(cfg.database_path)
    notifier = Notifier(cfg, store=store)
    notifier.start()
    ssid, _ = store.add_scan_set(chip="C02533C", root="/scans", fingerprint="killed", members=[])
    job = store.create_job(ssid)
    store.claim("w")
    store.transition(job, JobState.FAILED, owner="w", error="scan set incomplete: tile r003_c007 missing", failed_stage="discovery")
    if sys.argv[2] == "after-enqueue":
        assert notifier.enqueue() == 1
    print("about to send", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("moment", ["after-state-change", "after-enqueue"])
def test_killed_between_queueing_and_sending_delivers_exactly_once_after_restart(cfg_for, webhook, moment):
    cfg = cfg_for()
    proc = run_child(
        [sys.executable, "-c", _KILLED, cfg.source, moment],
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert proc.returncode == -9, proc.stderr
    assert "about to send" in proc.stdout
    assert webhook.messages == []
    now = time.time()
    n, store = _notifier(cfg, webhook.url)
    with store:
        assert n.enqueue(now=now) == (1 if moment == "after-state-change" else 0)
        assert n.deliver(now=now) == 1
        n.enqueue(now=now + 1)
        assert n.deliver(now=now + 1) == 0
    assert len(webhook.messages) == 1
    assert "tile r003_c007 missing" in webhook.messages[0][1]["message"]


# ---------------------------------------------------------------------------
# Dead and hanging endpoints, backoff, quiet hours
# ---------------------------------------------------------------------------


def test_a_dead_endpoint_neither_blocks_nor_floods_and_is_retried_with_backoff(cfg_for, webhook, tmp_path, capsys):
    cfg = cfg_for()
    dead = f"json://127.0.0.1:{_free_port()}/hook/{TOKEN}"  # nothing listens there
    n, store = _notifier(cfg, dead)
    with store, capture_logs() as logs:
        ids = [_qc_job(store, tmp_path / f"o{i}", fp=f"fp{i}", chip=f"SS20000013{i}TL_D1") for i in range(5)]
        assert n.enqueue(now=T0) == 5
        started = time.monotonic()
        for t in (T0, T0 + 1, T0 + 30, T0 + 60, T0 + 61):
            assert n.deliver(now=t) == 0
        assert time.monotonic() - started < 10  # connection refused: quick, and one try per round
        rows = store.outbox()
        assert [r.attempts for r in rows] == [2, 0, 0, 0, 0]  # T0 and T0 + 60 (backoff 60 s), the others wait
        assert rows[0].next_attempt_at == T0 + 60 + 120  # doubled
        assert all(r.next_attempt_at == T0 + 180 for r in rows[1:])
        assert "lab[0]" in (rows[0].error or "") and TOKEN not in (rows[0].error or "")
        warnings = [e for e in logs if e["event"].startswith("notification endpoint failing")]
        assert len(warnings) == 1  # once per outage, not per attempt
        assert TOKEN not in json.dumps(logs, default=str)

        assert main(["status", "--config", cfg.source]) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("notify")]
        assert len(lines) == 1 and "5 waiting" in lines[0] and "last error" in lines[0] and TOKEN not in lines[0]
        assert main(["status", "--json", "--config", cfg.source]) == 0
        st = json.loads(capsys.readouterr().out)["notifications"]
        assert st["waiting"] == 5 and st["rules"] == ["lab"] and "lab[0]" in st["last_error"]

        n.environ = {"IMAGEQC_TEST_HOOK": webhook.url}  # the endpoint is back (here: the URL fixed)
        assert n.deliver(now=T0 + 179) == 0  # still backing off
        assert n.deliver(now=T0 + 180) == 5
        assert [e["event"] for e in logs].count("notification endpoint reachable again") == 1
    assert sorted(p["title"] for _, p in webhook.messages) == sorted(
        f"imageqc: QC fail SS20000013{i}TL_D1" for i in range(5)
    )
    assert len(ids) == 5


def test_a_hanging_endpoint_is_given_up_after_the_timeout_and_the_tick_never_waits(cfg_for, tmp_path):
    cfg = cfg_for(notify="timeout_s = 1\n")
    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        n, store = _notifier(cfg, f"json://127.0.0.1:{silent.getsockname()[1]}/hook")
        with store:
            _qc_job(store, tmp_path / "out")
            started = time.monotonic()
            n.deliver(now=T0)  # nothing due yet
            n.enqueue(now=T0)
            n.deliver(now=T0)
            assert 0.9 < time.monotonic() - started < scaled(5)
            (row,) = store.outbox()
            assert row.state == "pending" and "no answer within 1 s" in (row.error or "")
            started = time.monotonic()
            n.tick(T0 + 120)  # the round runs in the background: tick returns while it waits for the silent server
            assert n._round is not None and n._round.is_alive(), (
                f"tick returned after {time.monotonic() - started:.2f} s with the round over: it waited for it"
            )
            wait_until(
                lambda: n._round is not None and not n._round.is_alive(),
                "the background round to end",
                timeout=10,
            )
            n.stop()
    finally:
        silent.close()


def test_quiet_hours_hold_non_urgent_events_until_they_end(cfg_for, webhook, tmp_path):
    cfg = cfg_for(RULE + 'quiet_hours = "22:00-07:00"\n')
    night = datetime(2026, 3, 2, 23, 0, tzinfo=timezone.utc).timestamp()
    morning = datetime(2026, 3, 3, 7, 0, tzinfo=timezone.utc).timestamp()
    n, store = _notifier(cfg, webhook.url)
    with store:
        _qc_job(store, tmp_path / "out", now=night)  # urgent
        failed = _failed_job(store, now=night)  # not urgent
        n.enqueue(now=night)
        assert n.deliver(now=night) == 1
        assert [p["title"] for _, p in webhook.messages] == [f"imageqc: QC fail {CHIP}"]
        (waiting,) = store.outbox(states=["pending"])
        assert waiting.job_id == failed and waiting.next_attempt_at == morning and waiting.attempts == 0
        assert n.deliver(now=morning - 1) == 0
        assert n.deliver(now=morning) == 1
    assert len(webhook.messages) == 2


def test_undelivered_messages_are_given_up_after_expire_after_s(cfg_for):
    cfg = cfg_for(notify="expire_after_s = 3600\n")
    n, store = _notifier(cfg, f"json://127.0.0.1:{_free_port()}/x")
    with store:
        _failed_job(store)
        n.enqueue(now=T0)
        n.deliver(now=T0)
        assert n.deliver(now=T0 + 3601) == 0
        (row,) = store.outbox()
        assert row.state == "expired"
        assert store.outbox_summary()["waiting"] == 0 and store.outbox_summary()["expired"] == 1


# ---------------------------------------------------------------------------
# Health and digest
# ---------------------------------------------------------------------------


def test_health_problems_are_sent_once_after_the_grace_time_and_their_end_too(cfg_for, webhook, tmp_path):
    cfg = cfg_for(notify="health_grace_s = 300\ndisk_free_min_gb = 0\n")
    n, store = _notifier(cfg, webhook.url)
    inbox = cfg.watch[0].path
    with store:
        n.check_health(T0)
        assert store.outbox() == []
        inbox.rmdir()  # the share went away
        for t in (T0 + 10, T0 + 100):
            n.check_health(t)
        assert store.outbox() == []  # a blip stays quiet
        for t in (T0 + 310, T0 + 400, T0 + 900):
            n.check_health(t)
        (row,) = store.outbox()
        assert "watch folder" in row.title and "folder missing" in row.title
        inbox.mkdir()
        n.check_health(T0 + 1000)
        n.check_health(T0 + 1100)
        rows = store.outbox()
        assert len(rows) == 2 and rows[1].title.startswith("imageqc: resolved: watch folder")
        n.deliver(now=T0 + 1100)
    assert len(webhook.messages) == 2


def test_a_watcher_down_in_the_services_heartbeat_is_a_health_event(cfg_for):
    from daemon.snapshot import norm

    cfg = cfg_for(notify="health_grace_s = 0\ndisk_free_min_gb = 0\n")
    n, store = _notifier(cfg, "json://127.0.0.1:1/x")
    with store:
        root = {"path": norm(cfg.watch[0].path), "health": "restarted 1x"}
        store.set_status("service", {"components": {"discovery": {"roots": [root]}}}, now=T0)
        n.check_health(T0)
        assert store.outbox() == []  # restarted and running: fine
        store.set_status(
            "service", {"components": {"discovery": {"roots": [{**root, "health": "observer down"}]}}}, now=T0
        )
        n.check_health(T0 + 1)
        (row,) = store.outbox()
        assert row.event == "health" and "observer down" in row.title


def test_low_disk_is_a_health_event(cfg_for):
    cfg = cfg_for(notify="health_grace_s = 0\ndisk_free_min_gb = 1000000\n")  # every disk is 'low'
    n, store = _notifier(cfg, "json://127.0.0.1:1/x")
    with store:
        n.check_health(T0)
        n.check_health(T0 + 60)
        titles = [r.title for r in store.outbox()]
        assert titles and all("low disk space" in t for t in titles)
        assert len(titles) == len(set(titles))  # one per folder, once


def test_daily_digest_once_a_day_at_its_time(cfg_for, webhook, tmp_path):
    cfg = cfg_for(RULE + 'events = ["digest"]\n', notify='digest_at = "08:00"\n')
    n, store = _notifier(cfg, webhook.url)
    day = datetime(2026, 3, 3, 7, 59, tzinfo=timezone.utc).timestamp()
    with store:
        _qc_job(store, tmp_path / "out", now=day - 3600)
        assert n.digest(day) is False
        assert n.digest(day + 60) is True
        assert n.digest(day + 3600) is False
        assert n.digest(day + 86400 + 60) is True  # the next day
        n.deliver(now=day + 60)
    (first, *_) = [p for _, p in webhook.messages]
    assert "2026-03-03" in first["title"] and "1 fail" in first["message"] and CHIP in first["message"]


# ---------------------------------------------------------------------------
# The service, `imageqc notify test`, the config
# ---------------------------------------------------------------------------


def test_the_service_enqueues_in_its_tick_and_delivers_in_the_background(cfg_for, webhook, monkeypatch):
    monkeypatch.setenv("IMAGEQC_TEST_HOOK", webhook.url)
    cfg = cfg_for(RULE + 'events = ["qc_pass"]\n')
    # the job's child runs at low priority: on a busy machine it may start slowly, so no short lease here
    cfg = dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, lease_seconds=120))
    with Store(cfg.database_path) as s:
        ssid, _ = s.add_scan_set(chip="SS200000135TL_D1", root=str(cfg.watch[0].path), fingerprint="fp", members=[])
    d = Daemon(cfg, target="tests.daemon.targets:ok", components=[Notifier(cfg)])
    d.start()
    try:
        with Store(cfg.database_path) as s:
            s.create_job(ssid)
        wait_until(lambda: len(webhook.messages) == 1, "len(webhook.messages) == 1", timeout=120)
    finally:
        d.stop()
    assert webhook.messages[0][1]["title"] == "imageqc: QC pass SS200000135TL_D1"


def test_notify_test_sends_to_every_url_and_exits_1_when_one_fails(cfg_for, webhook, smtp, monkeypatch, capsys):
    urls_file = Path(cfg_for().source).parent / "mail.url"
    urls_file.write_text(f"# the lab's relay\n{smtp.url}\n")
    rule = RULE + '[[notify.rule]]\nname = "mail"\nurls = ["file:mail.url"]\n'
    cfg = cfg_for(rule)
    monkeypatch.setenv("IMAGEQC_TEST_HOOK", webhook.url)
    assert main(["notify", "test", "--config", cfg.source]) == 0
    out = capsys.readouterr().out
    assert "lab[0] env:IMAGEQC_TEST_HOOK (json): OK" in out and "mail[0] file:" in out and "2 of 2" in out
    assert TOKEN not in out
    assert len(webhook.messages) == 1 and len(smtp.mails) == 1
    monkeypatch.setenv("IMAGEQC_TEST_HOOK", f"json://127.0.0.1:{_free_port()}/hook/{TOKEN}")
    assert main(["notify", "test", "--config", cfg.source]) == 1
    out = capsys.readouterr().out
    assert "lab[0] env:IMAGEQC_TEST_HOOK (json): FAILED" in out and "1 of 2" in out and TOKEN not in out
    monkeypatch.delenv("IMAGEQC_TEST_HOOK")
    assert main(["notify", "test", "--config", cfg.source]) == 1
    assert "IMAGEQC_TEST_HOOK is not set" in capsys.readouterr().out
    bare = cfg_for("")
    assert main(["notify", "test", "--config", bare.source]) == 1
    assert "no notification rules" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "key", "line", "words"),
    [
        (
            '[[notify.rule]]\nname = "a"\nurls = ["json://10.0.0.5/hook/abcdef123456"]\n',
            "notify.rule[0].urls[0]",
            3,
            "never the URL itself",
        ),
        ('[[notify.rule]]\nname = "a"\nurls = ["env:"]\n', "notify.rule[0].urls[0]", 3, "'env:NAME' or 'file:PATH'"),
        ('[[notify.rule]]\nname = "a"\nurls = "env:X"\n', "notify.rule[0].urls", 3, "must be a list"),
        ('[[notify.rule]]\nname = "a"\n', "notify.rule[0].urls", 1, "missing required"),
        ('[[notify.rule]]\nname = "a"\nurls = []\n', "notify.rule[0].urls", 3, "at least one"),
        (
            '[[notify.rule]]\nname = "a"\nurls = ["env:X"]\nquiet_hours = "22-7"\n',
            "notify.rule[0].quiet_hours",
            4,
            "HH:MM-HH:MM",
        ),
        (
            '[[notify.rule]]\nname = "a"\nurls = ["env:X"]\nquiet_hours = "22:00-22:00"\n',
            "notify.rule[0].quiet_hours",
            4,
            "equal",
        ),
        (
            '[[notify.rule]]\nname = "a"\nurls = ["env:X"]\nevents = ["qc_fial"]\n',
            "notify.rule[0].events[0]",
            4,
            "did you mean 'qc_fail'",
        ),
        (
            '[[notify.rule]]\nname = "a"\nurls = ["env:X"]\nevents = ["digest"]\n',
            "notify.rule[0].events",
            4,
            "notify.digest_at",
        ),
        (
            '[[notify.rule]]\nname = "a"\nurls = ["env:X"]\n[[notify.rule]]\nname = "a"\nurls = ["env:Y"]\n',
            "notify.rule[1].name",
            5,
            "unique",
        ),
        ('[notify]\ndigest_at = "8am"\n', "notify.digest_at", 2, "HH:MM"),
        ("[notify]\ntimeout_s = 0\n", "notify.timeout_s", 2, "must be >= 1"),
        ('[[notify.rule]]\nname = "a"\nurl = "env:X"\n', "notify.rule[0].url", 3, "did you mean 'urls'"),
        (
            '[[notify.rule]]\nname = "a"\nurls = ["env:X"]\ntoken = "abcdef123456"\n',
            "notify.rule[0].token",
            4,
            "name it in 'urls'",
        ),
    ],
)
def test_notify_config_errors_name_file_key_and_line(text, key, line, words):
    err = _err(text)
    assert (err.key, err.line) == (key, line)
    assert words in str(err) and str(err).startswith(f"site.toml:{line}: {key}: ")
    assert "abcdef123456" not in str(err)  # a URL written in the config is refused without echoing it


def test_notify_config_defaults_and_file_references_relative_to_the_config(tmp_path, capsys):
    cfg = load_config_text('[[watch]]\npath = "in"\n', base=tmp_path)
    assert cfg.notify.rule == () and cfg.notify.timeout_s == 30.0
    f = tmp_path / "site.toml"
    f.write_text(
        '[[watch]]\npath = "in"\n[[notify.rule]]\nname = "lab"\nurls = ["file:secrets/notify.url", "env:LAB_HOOK"]\n'
    )
    assert main(["config", "check", str(f)]) == 0
    out = capsys.readouterr().out
    assert "[[notify.rule]]" in out and f"file:{tmp_path / 'secrets' / 'notify.url'}" in out
    rule = load_config_text(f.read_text(), base=tmp_path).notify.rule[0]
    assert rule.events == ("qc_fail", "job_failed", "health", "early_warning")
    assert rule.urgent == ("qc_fail", "early_warning") and rule.quiet_hours == ""
