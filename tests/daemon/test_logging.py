"""Logs: JSON lines with job and chip, secrets never written, rotation, the log viewer."""

from __future__ import annotations

import io
import json
import logging
import os
import threading

import pytest

from daemon.logging import bind_job, configure_logging, get_logger, register_secret
from daemon.logview import LogFilter, follow_records, format_record, read_records
from tests.helpers import scaled, wait_until

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "logs" / "imageqc.jsonl"
    console = io.StringIO()
    configure_logging(level="debug", file=path, console="json", stream=console)
    yield path, console
    configure_logging(console="off")


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_lines_are_json_with_job_and_chip_inside_bind_job(log_file):
    path, console = log_file
    log = get_logger("t")
    log.info("outside")
    with bind_job(12, "SS200000135TL_D1"):
        log.info("qc started", stage="track")
        logging.getLogger("thirdparty").warning("plain stdlib line")
    recs = _records(path)
    assert recs[0]["event"] == "outside" and "job_id" not in recs[0]
    assert recs[1]["event"] == "qc started" and recs[1]["job_id"] == 12 and recs[1]["chip"] == "SS200000135TL_D1"
    assert recs[1]["stage"] == "track" and recs[1]["level"] == "info" and recs[1]["timestamp"].endswith("Z")
    assert recs[2]["event"] == "plain stdlib line" and recs[2]["job_id"] == 12
    assert [json.loads(x)["event"] for x in console.getvalue().splitlines()] == [r["event"] for r in recs]


def test_secrets_are_never_written(log_file):
    path, console = log_file
    register_secret(SECRET)
    log = get_logger("t")
    log.info("credentials loaded", secret_access_key=SECRET, access_key_id="AKIAEXAMPLE", password="pw1234")
    log.info("connecting", endpoint="https://qcuser:hunter2@minio.lab:9000/bucket")
    log.info(f"boto said: signature for {SECRET} does not match")
    log.info("nested", detail={"token": "tok-123456", "items": [f"key={SECRET}"]})

    def fails(secret=SECRET):
        raise RuntimeError(f"auth failed with {secret}")

    try:
        fails()
    except RuntimeError:
        log.exception("upload failed")
    text = path.read_text(encoding="utf-8") + console.getvalue()
    for leaked in (SECRET, "AKIAEXAMPLE", "pw1234", "hunter2", "tok-123456"):
        assert leaked not in text
    recs = _records(path)
    assert recs[0]["secret_access_key"] == "***"
    assert recs[1]["endpoint"] == "https://qcuser:***@minio.lab:9000/bucket"
    assert "RuntimeError: auth failed with ***" in recs[-1]["exception"]


def test_file_rotates_and_the_viewer_reads_all_files_in_order(tmp_path):
    path = tmp_path / "imageqc.jsonl"
    configure_logging(file=path, max_bytes=10_000, backups=3, console="off")
    log = get_logger("t")
    for i in range(300):
        with bind_job(i % 3, f"C0253{i % 3}C"):
            log.info("tick", i=i, level_hint="x" * 20)
    configure_logging(console="off")
    assert (tmp_path / "imageqc.jsonl.1").exists()
    seen = [r["i"] for r in read_records(path)]
    assert seen == sorted(seen) and seen[-1] == 299
    only = list(read_records(path, LogFilter(chip="C02531C")))
    assert only and all(r["chip"] == "C02531C" for r in only)


def test_level_filter_and_formatting(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text(
        '{"timestamp": "2026-11-22T10:00:00.1Z", "level": "info", "event": "queued", "job_id": 3, "chip": "C02533C"}\n'
        '{"timestamp": "2026-11-22T10:00:01.1Z", "level": "error", "event": "qc failed", "job_id": 3, "chip": "C02533C", "error": "truncated"}\n'
        "not json at all\n"
    )
    errors = list(read_records(path, LogFilter(level="warning")))
    assert [r["event"] for r in errors] == ["qc failed"]
    line = format_record(errors[0])
    assert line == "2026-11-22 10:00:01 ERROR [3 C02533C] qc failed  error=truncated"
    assert format_record(list(read_records(path))[-1]) == "not json at all"


def test_follow_sees_new_lines_and_survives_rotation(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"event": "old"}\n')
    got: list[str] = []
    stop = threading.Event()

    looks = [0]

    def stopped() -> bool:  # asked before each look: the second time, the first look opened the file at its end
        looks[0] += 1
        return stop.is_set()

    def reader():
        for rec in follow_records(path, stop=stopped, interval=0.02):
            got.append(rec["event"])

    t = threading.Thread(target=reader)
    t.start()
    try:
        wait_until(lambda: looks[0] >= 2, "the reader to open the file")
        with path.open("a") as fh:
            fh.write('{"event": "new1"}\n')
        path.rename(tmp_path / "f.jsonl.1")  # the reader still reads new1 from the file it holds, then the new one
        path.write_text('{"event": "after-rotation"}\n')
        wait_until(lambda: "after-rotation" in got, "the record written after the rotation", seen=lambda: got)
    finally:
        stop.set()
        t.join(scaled(30))
    assert got == ["new1", "after-rotation"]


@pytest.mark.skipif(
    not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to make every write fail with ENOSPC"
)
def test_a_full_log_disk_is_said_once_not_as_a_traceback_per_line_and_recovery_is_said(tmp_path, capsys):
    path = tmp_path / "imageqc.jsonl"
    path.symlink_to("/dev/full")  # every write: No space left on device
    configure_logging(level="info", file=path, console="off")
    try:
        log = get_logger("t")
        for i in range(5):
            log.info("line while the disk is full", i=i)
        err = capsys.readouterr().err
        assert err.count("cannot write the log file") == 1, err
        assert "No space left on device" in err and "free space there" in err
        assert "Logging error" not in err and "Traceback" not in err
        path.unlink()  # space returns: the next line reopens the file and is written
        log.info("space is back")
        assert "is writable again" in capsys.readouterr().err
        assert [json.loads(x)["event"] for x in path.read_text(encoding="utf-8").splitlines()] == ["space is back"]
    finally:
        configure_logging(console="off")


def test_watchdogs_stopped_emitter_error_is_dropped_and_its_other_errors_kept(tmp_path):
    """inotify events read while an observer stops are logged by watchdog as an error; nothing is lost."""
    path = tmp_path / "log.jsonl"
    configure_logging(level="info", file=path, console="off")
    try:
        wd = logging.getLogger("watchdog.observers.inotify")
        wd.error("InotifyEmitter.queue_events() called when the thread is inactive")
        wd.error("inotify watch limit reached")
    finally:
        configure_logging(console="off")
    events = [json.loads(x)["event"] for x in path.read_text().splitlines()]
    assert events == ["inotify watch limit reached"]
