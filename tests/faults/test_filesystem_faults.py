"""File-system faults an acquisition PC meets (issue #20): special files, roots and folders that go away.

Each fault is injected for real: a FIFO made with ``os.mkfifo``, a watch root
renamed away or made unreadable, a set's folder renamed while its QC runs, a
folder whose name is not valid UTF-8. Where the case is about the service
loop (a FIFO that would block it) the real service runs in a subprocess;
the others run discovery or the QC job in-process against real folders.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from tests.discovery_service import NullRunner, rescans
from tests.helpers import scaled, wait_until

from .conftest import config_text, hpc_target, serial, verify_exactly_once

pytestmark = pytest.mark.soak

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo is POSIX only")

FIFO_WARNING = "not regular files (FIFO, socket or device); skipped, never opened: only regular files are read"


def _nobody_reads(fifo: Path) -> bool:
    """True when no process has ``fifo`` open for reading (a non-blocking writer open fails with ENXIO)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        return e.errno == errno.ENXIO
    os.close(fd)
    return False


# -- case 12: a FIFO named like a chip ------------------------------------------------------


@needs_fifo
def test_a_fifo_named_like_a_chip_is_reported_once_and_never_blocks_the_service(make_service, chip_images):
    svc = make_service(config_text())
    inbox = svc.root / "inbox"
    fifo = inbox / "A02677B5.tif"
    os.mkfifo(fifo)  # a writer that never comes: opening it for reading would wait forever
    svc.start()
    svc.wait_running()
    (inbox / f"{serial(1)}.tif").write_bytes(chip_images[0])  # an ordinary set beside it
    svc.wait_for(lambda: any(j.chip == serial(1) and j.state == "skipped" for j in svc.jobs()), 120, "the ordinary set")

    def beat() -> float:
        return svc.read(lambda s: s.get_status()["service"][1]) or 0.0

    first = beat()
    svc.wait_for(lambda: beat() > first, 30, "the heartbeat to go on")
    assert [j.chip for j in svc.jobs()] == [serial(1)]
    (warning,) = [e for e in svc.log() if e.get("event") == FIFO_WARNING]
    assert warning["names"] == ["A02677B5.tif"] and "FIFO (named pipe)" in warning["reason"], warning
    assert _nobody_reads(fifo)
    assert svc.stop(timeout=60) == 0  # SIGTERM stops it

    svc.start()  # and a restart does not hang on it either, nor report it again
    svc.wait_running()
    svc.wait_for(
        lambda: svc.read(lambda s: s.get_status()["service"][0]["components"]["discovery"]["roots"][0]["last_rescan"]),
        60,
        "a rescan after the restart",
    )
    assert len([e for e in svc.log() if e.get("event") == FIFO_WARNING]) == 1
    assert [j.chip for j in svc.jobs()] == [serial(1)] and _nobody_reads(fifo)
    assert svc.stop(timeout=60) == 0
    assert fifo.exists() and not fifo.is_file()  # left as it was


@needs_fifo
def test_readers_refuse_a_fifo_at_once_instead_of_waiting_for_a_writer(tmp_path):
    from qc.io import check_czi_whole, check_tiff_whole, detect_format, open_image
    from qc.io.regular import NotRegularFileError, open_regular

    fifo = tmp_path / "A02677B5.tif"
    os.mkfifo(fifo)
    czi = tmp_path / "A02677B5.czi"
    os.mkfifo(czi)
    calls = {
        "open_regular": lambda: open_regular(fifo),
        "detect_format": lambda: detect_format(fifo),
        "open_image": lambda: open_image(fifo),
        "check_tiff_whole": lambda: check_tiff_whole(fifo),
        "check_czi_whole": lambda: check_czi_whole(czi),
    }
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        for name, call in calls.items():
            try:
                call()
                outcome[name] = None
            except BaseException as e:
                outcome[name] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(scaled(60))
    if t.is_alive():
        for f in (fifo, czi):  # a writer's open lets a blocked reader go, so the test process can end
            with contextlib.suppress(OSError):
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"a reader blocked opening the FIFO; finished: {sorted(outcome)}")
    for name in calls:
        e = outcome[name]
        assert isinstance(e, NotRegularFileError), (name, e)
        assert (
            f"{fifo if name != 'check_czi_whole' else czi}: a FIFO (named pipe), not a regular file. Only regular files are read"
            in str(e)
        ), str(e)
    assert _nobody_reads(fifo) and _nobody_reads(czi)


# -- case 10: names that are not valid UTF-8 --------------------------------------------------


@pytest.mark.skipif(
    sys.platform in ("win32", "darwin"), reason="the file system must accept any bytes in a name (Linux)"
)
def test_a_folder_named_in_another_encoding_is_qcd_uploaded_and_shown_escaped(make_service, chip_images):
    svc = make_service(config_text(uploads=[hpc_target()]))
    folder = Path(
        os.fsdecode(os.fsencode(svc.root / "inbox") + b"/Lauf \xff 2024")
    )  # Latin-1 'y' from another code page
    folder.mkdir()
    (folder / f"{serial(2)}.tif").write_bytes(chip_images[0])
    svc.start()
    svc.wait_running()
    svc.wait_for(lambda: [j.state for j in svc.jobs()] == ["done"], 180, "the set done")
    verify_exactly_once(svc, [serial(2)], hpc=svc.root / "hpc")
    log = svc.log()
    assert not [e for e in log if e.get("level") in ("error", "critical")], [
        e for e in log if e.get("level") == "error"
    ][:3]
    found = [e for e in log if e.get("event") == "scan set found" and e.get("chip") == serial(2)]
    assert found and found[0]["folder"].endswith("/inbox/Lauf \\xff 2024"), found  # escaped, readable
    with svc.store() as s:
        (member,) = s.get_scan_set(svc.jobs()[0].scan_set_id).members
        assert member["path"] == str(folder / f"{serial(2)}.tif")  # stored losslessly: the path opens
    st = svc.cli("status")
    assert st.returncode == 0 and serial(2) in st.stdout, st.stdout + st.stderr
    show = svc.cli("show", str(svc.jobs()[0].id))
    assert show.returncode == 0 and f"Lauf \\xff 2024/{serial(2)}.tif" in show.stdout, show.stdout + show.stderr
    as_json = svc.cli("show", str(svc.jobs()[0].id), "--json")  # JSON keeps the name losslessly (\udcff escapes)
    assert json.loads(as_json.stdout)["scan_set"]["members"][0]["path"] == str(folder / f"{serial(2)}.tif")
    assert svc.stop() == 0
    svc.start()  # the discovery state saved with that name loads again
    svc.wait_running()
    svc.wait_for(
        lambda: svc.read(lambda s: s.get_status()["service"][0]["components"]["discovery"]["roots"][0]["last_rescan"]),
        60,
        "a rescan after the restart",
    )
    assert [(j.chip, j.state) for j in svc.jobs()] == [(serial(2), "done")]
    assert not [e for e in svc.log() if e.get("level") in ("error", "critical")]
    assert svc.stop() == 0


def test_upload_keys_carry_bytes_that_are_not_utf8_as_percent_escapes():
    from daemon.upload.policy import render_key

    name = os.fsdecode(b"img_0000_0001_\xe4.tif")  # a tile named in Latin-1 inside a tile folder
    assert render_key("{prefix}/{chip}/{name}", prefix="p", chip="A02677B5", name=f"A02677B5/{name}") == (
        "p/A02677B5/A02677B5/img_0000_0001_%E4.tif"
    )


# -- cases 1 and 2: the watch root or a set's folder goes away ----------------------------------
#
# In-process: the real discovery in a real Daemon (a runner that claims nothing), and the real QC
# job in a real worker child, run by the test at the moment the fault is in place.

_QUEUE_ONLY = (
    'state_dir = "state"\n[[watch]]\npath = "inbox"\nsettle_seconds = 0.3\n'
    "[discovery]\ngrouping_window_s = 0\nrescan_interval_s = 1\npoll_interval_s = 0.2\nincomplete_timeout_s = 600\n"
    "[service]\ntick_seconds = 0.1\nlease_seconds = 60\nretry_base_s = 1\nmax_attempts = 1\nshutdown_timeout_s = 2\n"
    '[output]\npictures = false\n[qc]\nthreads = 1\npriority = "normal"\n[logging]\nconsole = "off"\n'
)


@pytest.fixture
def queue_only(tmp_path, discovery_service):
    """``start(cfg=None)`` -> (daemon, discovery, config): discovery queues, nothing claims; the test runs QC."""
    from daemon.config import load_config_text

    (tmp_path / "imageqc.toml").write_text(_QUEUE_ONLY)
    (tmp_path / "inbox").mkdir()
    base = load_config_text(_QUEUE_ONLY, file=str(tmp_path / "imageqc.toml"), base=tmp_path)

    def start(cfg=None):
        return discovery_service.start(cfg or base, runner=NullRunner())

    start.stop = discovery_service.stop
    start.config = base
    return start


def _jobs(cfg):
    from daemon.store import Store

    with Store(cfg.database_path) as s:
        return s.list_jobs(newest_first=False)


def _until_states(cfg, states, what=None):
    """Until the jobs' states are ``states``; fails with the jobs seen last."""
    wait_until(
        lambda: [j.state for j in _jobs(cfg)] == states,
        what or f"the jobs to be {states}",
        seen=lambda: [(j.id, j.chip, j.state, j.error) for j in _jobs(cfg)],
    )


def _until_health(disc, health):
    wait_until(lambda: _health(disc) == health, f"the watch root to report {health!r}", seen=lambda: _health(disc))


def _run_qc(cfg, job_id):
    """The QC job as the service runs it: claimed, then run in a worker child; returns the job after it."""
    from daemon.store import Store
    from daemon.worker import ProcessWorker

    with Store(cfg.database_path) as store:
        job = store.claim("fault-test", lease_s=120)
        assert job is not None and job.id == job_id, job
        worker = ProcessWorker(cfg, store, target="daemon.jobs:run_qc_job", owner="fault-test")
        worker.submit(job)
        worker.join(scaled(240))
        return store.get_job(job_id), [e.message for e in store.events(job_id)]


def _health(disc):
    return disc.health()["roots"][0]["health"]


def test_a_watch_root_gone_when_qc_starts_fails_transiently_and_the_set_is_queued_again_when_it_returns(
    queue_only, chip_images
):
    from daemon.store import Store

    _, disc, cfg = queue_only()
    inbox = cfg.watch[0].path
    (inbox / f"{serial(4)}.tif").write_bytes(chip_images[0])
    _until_states(cfg, ["queued"])
    (job,) = _jobs(cfg)
    away = inbox.with_name("inbox-unmounted")
    inbox.rename(away)  # the share goes away just as QC starts
    _until_health(disc, "folder missing")
    failed, _ = _run_qc(cfg, job.id)
    assert failed.state == "failed" and failed.failed_stage == "files", failed
    assert f"the watch root {inbox} is unavailable (folder missing)" in failed.error, failed.error
    assert "queued again as soon as the folder is back" in failed.error
    assert failed.next_attempt_at is None  # max_attempts = 1: only the root's return can bring it back
    inbox.write_text("a file took the root's name")  # replaced by a file
    _until_health(disc, "not a folder")
    assert [j.state for j in _jobs(cfg)] == ["failed"]
    inbox.unlink()
    away.rename(inbox)  # back
    _until_states(cfg, ["queued"])
    assert _health(disc) == "ok"
    done, events = _run_qc(cfg, job.id)
    assert done.state in ("qc_done", "skipped"), done  # skipped: the running service's "QC done; no upload configured"
    with Store(cfg.database_path) as s:
        assert s.get_result(job.id)["verdict"] == "pass"
    assert "the scan set's files can be read again; queued again" in events
    assert len(_jobs(cfg)) == 1  # the same job, not a second one


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="permissions are not enforced for root (uid 0): run it as an ordinary user, or in a user "
    "namespace: unshare --user --map-user=1000 --map-group=1000 python -m pytest ...",
)
def test_an_unreadable_watch_root_is_reported_and_its_sets_are_retried_once_readable(queue_only, chip_images):
    _, disc, cfg = queue_only()
    inbox = cfg.watch[0].path
    (inbox / f"{serial(5)}.tif").write_bytes(chip_images[0])
    _until_states(cfg, ["queued"])
    (job,) = _jobs(cfg)
    inbox.chmod(0)
    try:
        _until_health(disc, "permission denied")
        failed, _ = _run_qc(cfg, job.id)
        assert failed.state == "failed" and failed.failed_stage == "files", failed
        assert "(permission denied)" in failed.error, failed.error
    finally:
        inbox.chmod(0o755)
    _until_states(cfg, ["queued"])
    assert _health(disc) == "ok"


def test_a_set_folder_renamed_after_queueing_is_a_new_set_and_the_old_job_says_where_it_went(queue_only, chip_images):
    import dataclasses

    from daemon.store import Store

    d, _, cfg = queue_only()
    inbox = cfg.watch[0].path
    (inbox / "run 7").mkdir()
    (inbox / "run 7" / f"{serial(6)}.tif").write_bytes(chip_images[0])
    _until_states(cfg, ["queued"])
    (old,) = _jobs(cfg)
    queue_only.stop(d)
    (inbox / "run 7").rename(inbox / "run 7 mouse")  # the operator renames the folder before QC runs
    slow = dataclasses.replace(cfg, watch=(dataclasses.replace(cfg.watch[0], settle_seconds=600),))
    d, _, _ = queue_only(slow)  # discovery sees the files at their new place; not settled yet
    new_path = str(inbox / "run 7 mouse" / f"{serial(6)}.tif")

    def known() -> bool:
        with Store(cfg.database_path) as s:
            return any(m["path"] == new_path for m in s.discovery_load()[0])

    wait_until(known, "discovery to record the set at its new place")
    failed, _ = _run_qc(cfg, old.id)
    assert failed.state == "failed" and failed.next_attempt_at is None, failed
    assert f"the scan set moved to {inbox / 'run 7 mouse'} after it was queued" in failed.error, failed.error
    queue_only.stop(d)
    queue_only()  # settles: the moved set is a new scan set, queued from where it is now
    wait_until(lambda: len(_jobs(cfg)) == 2, "the moved set queued", seen=lambda: _jobs(cfg))
    first, moved = _jobs(cfg)
    assert first.id == old.id and first.state == "superseded" and moved.state == "queued"  # nothing left failed
    assert "the scan set moved to" in first.error  # its error still says where the set went
    with Store(cfg.database_path) as s:
        assert [m["path"] for m in s.get_scan_set(moved.scan_set_id).members] == [new_path]


def test_a_set_folder_gone_with_its_files_is_retried_and_queued_again_when_it_comes_back(queue_only, chip_images):
    _, _, cfg = queue_only()
    inbox = cfg.watch[0].path
    (inbox / "run 8").mkdir()
    (inbox / "run 8" / f"{serial(7)}.tif").write_bytes(chip_images[0])
    _until_states(cfg, ["queued"])
    (job,) = _jobs(cfg)
    away = inbox.parent / "being-copied-back"
    (inbox / "run 8").rename(away)  # moved out of the root: nothing under the root says where it went
    failed, _ = _run_qc(cfg, job.id)
    assert failed.state == "failed" and failed.failed_stage == "files", failed
    assert f"the scan set's folder {inbox / 'run 8'} is missing" in failed.error, failed.error
    away.rename(inbox / "run 8")
    _until_states(cfg, ["queued"])  # the same job, queued again


def test_jobs_queued_before_paths_were_part_of_the_identity_are_still_recognised_in_place(queue_only, chip_images):
    """Back-compat: a job stored with the old fingerprint (names, sizes, times) is not queued a second time."""
    from daemon.completion import MemberState, fingerprint
    from daemon.snapshot import WalkPolicy, probe
    from daemon.store import Store

    cfg = queue_only.config
    inbox = cfg.watch[0].path
    here = inbox / f"{serial(8)}.tif"
    here.write_bytes(chip_images[0])
    (inbox / "moved").mkdir()
    moved = inbox / "moved" / f"{serial(9)}.tif"
    moved.write_bytes(chip_images[1])
    policy = WalkPolicy.from_config(cfg.watch[0])
    with Store(cfg.database_path) as s:  # what an older version recorded, before the service starts again
        for path, recorded_at in ((here, here), (moved, inbox / moved.name)):
            f = probe(policy, str(path.resolve()))
            m = MemberState(
                str(recorded_at.resolve()),
                f.member.name,
                f.member.chip,
                f.member.format,
                f.member.role,
                f.member.stain,
                f.stat,
                0.0,
                0.0,
            )
            ssid, _ = s.add_scan_set(
                chip=m.chip, root=str(inbox), fingerprint=fingerprint([m]), members=[m.job_member()]
            )
            job_id = s.create_job(ssid)
            s.transition(s.claim("old-version").id, "qc_done", owner="old-version")
            s.transition(job_id, "done")
    _, disc, _ = queue_only()
    wait_until(lambda: len(_jobs(cfg)) == 3, "the set recorded elsewhere queued where it is", seen=lambda: _jobs(cfg))
    old_here, old_moved, new = _jobs(cfg)
    assert (old_here.state, old_moved.state, new.state) == ("done", "done", "queued") and new.chip == serial(9)
    rescans(disc)  # more ticks and rescans: the set in place stays done, nothing else is queued
    assert len(_jobs(cfg)) == 3
