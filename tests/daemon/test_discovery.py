"""Discovery end to end: a real Daemon, real observers and real files in temporary folders.

Tests never assert on timings; they assert order (nothing is queued while it
is still being written) and counts (each set queued exactly once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from daemon.cli import main
from daemon.config import OutputConfig, load_config_text
from daemon.jobs import member_changes
from daemon.logging import configure_logging
from daemon.status import collect_status
from daemon.store import SCHEMA_VERSION, Store
from daemon.watcher import default_observer
from tests.discovery_service import NullRunner, rescans
from tests.helpers import QC_NORMAL_PRIORITY, scaled, wait_until


def _tif_bytes(shape=(64, 64), **kw) -> bytes:
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(len(shape)).integers(0, 255, shape, dtype=np.uint8), **kw)
    return buf.getvalue()


def _tif(path: Path, shape=(32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tif_bytes(shape))
    return path


DISCOVERY = {"grouping_window_s": 0, "rescan_interval_s": 1, "poll_interval_s": 0.2, "incomplete_timeout_s": 600}


def make_discovery_config(tmp_path: Path, watch: str = "", *, tick: float = 0.1, **discovery):
    """A config with one watch root ``inbox`` (extra ``watch`` settings) and fast discovery settings."""
    settings = {**DISCOVERY, **discovery}
    text = (
        'state_dir = "state"\n[[watch]]\npath = "inbox"\n'
        + watch
        + "\n[discovery]\n"
        + "".join(f"{k} = {v}\n" for k, v in settings.items())
        + f"[service]\ntick_seconds = {tick}\nlease_seconds = 5\nretry_base_s = 1\nshutdown_timeout_s = 2\n"
        + '[logging]\nconsole = "off"\n'
        + QC_NORMAL_PRIORITY
    )
    (tmp_path / "imageqc.toml").write_text(text)
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return load_config_text(text, file=str(tmp_path / "imageqc.toml"), base=tmp_path)


@pytest.fixture
def service(tmp_path, discovery_service):
    """``start(watch_toml, runner=..., discovery={...}, **component_kwargs)`` -> (daemon, discovery, config)."""

    def start(watch="", *, runner=None, cfg=None, tick=0.1, discovery=None, **kw):
        cfg = cfg or make_discovery_config(tmp_path, watch, tick=tick, **(discovery or {}))
        return discovery_service.start(cfg, runner=runner, **kw)

    start.stop = discovery_service.stop
    return start


def _jobs(cfg, chip=None):
    with Store(cfg.database_path) as s:
        return s.list_jobs(chip=chip, newest_first=False)


def _states(cfg):
    """(chip, state) of every job, for a failure message."""
    return [(j.chip, j.state) for j in _jobs(cfg)]


def _until_jobs(cfg, pred, what, timeout=30.0):
    """Until ``pred(jobs)`` holds; fails with the jobs seen last."""
    return wait_until(lambda: pred(_jobs(cfg)), what, timeout=timeout, seen=lambda: _states(cfg))


def _until_root(disc, key, value, timeout=30.0):
    """Until the first root's health field ``key`` is ``value``; fails with the field seen last."""
    wait_until(
        lambda: disc.health()["roots"][0][key] == value,
        f"the watch root's {key} to be {value!r}",
        timeout=timeout,
        seen=lambda: disc.health()["roots"][0],
    )


def _members(cfg, job):
    with Store(cfg.database_path) as s:
        return s.get_scan_set(job.scan_set_id).members


def _inbox(cfg) -> Path:
    return cfg.watch[0].path


# -- slow writers -------------------------------------------------------------------


def test_slowly_written_sets_are_not_queued_early(service):
    settle = 2.0
    _d, disc, cfg = service(f"settle_seconds = {settle}\n", runner=None)
    inbox = _inbox(cfg)
    data = _tif_bytes((512, 512), tile=(64, 64))
    big = inbox / "SS200000135TL_D1.tif"
    tiles = inbox / "A02677B5"
    gaps, last_write = [], time.time()
    with big.open("wb") as fh:  # a big TIFF grows in chunks while tiles appear one by one
        for k, start in enumerate(range(0, len(data), len(data) // 12)):
            fh.write(data[start : start + len(data) // 12])
            fh.flush()
            if k < 9:
                r, c = divmod(k, 3)
                _tif(tiles / f"img_{r:04d}_{c:04d}_DAPI.tif", (16, 16))
            if k == 4:
                (tiles / ".DS_Store").write_bytes(b"\0" * 10)  # junk a file browser leaves
            now = time.time()
            gaps.append(now - last_write)
            last_write = now
            assert not _jobs(cfg) or max(gaps) >= settle, "queued while still being written"
            time.sleep(0.1)  # the writer's pace, not a wait
    last_write = time.time()
    _until_jobs(cfg, lambda js: sum(j.state == "skipped" for j in js) == 2, "both sets skipped", timeout=60)
    jobs = _jobs(cfg)
    assert sorted(j.chip for j in jobs) == ["A02677B5", "SS200000135TL_D1"]
    assert all(j.queued_at > last_write for j in jobs)
    tiles_member = _members(cfg, next(j for j in jobs if j.chip == "A02677B5"))
    assert tiles_member == [
        {
            "name": "A02677B5",
            "path": str(tiles.resolve()),
            "format": "tiles",
            "role": "nuclear",
            "stain": None,
            "size": tiles_member[0]["size"],
            "mtime_ns": tiles_member[0]["mtime_ns"],
            "files": 10,
        }
    ]
    rescans(disc)  # more ticks and rescans: still one job each
    assert len(_jobs(cfg)) == 2
    for job in jobs:  # what the QC job checks before it runs agrees with what discovery recorded
        assert member_changes(_members(cfg, job)) == []


def test_nuclear_and_late_if_images_form_one_set_within_the_grouping_window(service):
    window = scaled(5.0)  # the IF image below must come inside it even on a busy machine
    _d, disc, cfg = service("settle_seconds = 0.3", runner=NullRunner(), discovery={"grouping_window_s": window})
    inbox = _inbox(cfg)
    _tif(inbox / "C02533C.tif")
    wait_until(
        lambda: [w["stage"] for w in disc.waiting()["sets"]] == ["grouping"],
        "the set to settle and wait in its grouping window",
        seen=lambda: disc.waiting()["sets"],
    )
    assert not _jobs(cfg)
    _tif(inbox / "C02533C_CD31_IF.tif")
    _tif(inbox / "C02533C_GFAP_IF.czi.part")  # a partial copy is never a member
    _until_jobs(cfg, bool, "the set to be queued", timeout=30 + window)
    rescans(disc)
    (job,) = _jobs(cfg)
    assert [m["name"] for m in _members(cfg, job)] == ["C02533C", "C02533C_CD31_IF"]
    assert [m["role"] for m in _members(cfg, job)] == ["nuclear", "IF"]


def test_growing_tile_folders_include_an_if_images_folder_for_its_pairs_only(service):
    """Live QC is handed every tile folder of a set still settling; the IF image's without per-FOV checks."""
    _d, disc, cfg = service("settle_seconds = 3600", runner=NullRunner())
    inbox = _inbox(cfg)
    for folder in ("C02533C", "C02533C_CD31_IF"):
        for c in range(2):
            _tif(inbox / folder / f"FOV_0000_{c:04d}_20261203120000.tif")

    def growing():
        try:  # read from the test's thread while the service's may be updating its sets
            return sorted((Path(g.folder).name, g.fov_checks) for g in disc.growing_tile_folders())
        except RuntimeError:
            return None

    wait_until(
        lambda: growing() == [("C02533C", True), ("C02533C_CD31_IF", False)],
        "both tile folders to be growing",
        seen=growing,
    )


# -- restarts -----------------------------------------------------------------------


def test_sets_finished_while_the_service_was_stopped_are_queued_at_start(service):
    d, disc, cfg = service("settle_seconds = 0.5")
    inbox = _inbox(cfg)
    data = _tif_bytes((128, 128))
    (inbox / "SS200000135TL_D1.tif").write_bytes(data[: len(data) // 2])  # half written when the service stops
    _until_root(disc, "members", 1)
    service.stop(d)
    (inbox / "SS200000135TL_D1.tif").write_bytes(data)  # finished while stopped
    _tif(inbox / "sub" / "C02533C.tif")  # arrived while stopped
    d2, _disc2, _ = service(cfg=cfg)
    _until_jobs(cfg, lambda js: sum(j.state == "skipped" for j in js) == 2, "both sets skipped", timeout=60)
    assert sorted(j.chip for j in _jobs(cfg)) == ["C02533C", "SS200000135TL_D1"]
    service.stop(d2)
    _d3, disc3, _ = service(cfg=cfg)  # nothing new: nothing queued again
    rescans(disc3)
    assert len(_jobs(cfg)) == 2


# -- events are hints only ------------------------------------------------------------


class _Deaf:
    """An observer factory whose observers watch an empty folder elsewhere: no event ever arrives."""

    def __init__(self, elsewhere: Path):
        self.elsewhere = elsewhere

    def __call__(self, mode, policy, poll_s):
        self.elsewhere.mkdir(exist_ok=True)
        real = default_observer(mode, policy, poll_s)
        schedule = real.schedule
        real.schedule = lambda handler, path, **kw: schedule(handler, str(self.elsewhere), **kw)
        return real


@pytest.mark.parametrize("mode", ["polling", "no events at all"])
def test_polling_only_and_rescans_alone_find_everything(service, tmp_path, mode):
    extra = "settle_seconds = 0.3\n"
    kw = {}
    if mode == "polling":
        extra += 'observer = "polling"\n'
    else:
        kw["observer_factory"] = _Deaf(tmp_path / "elsewhere")
    _d, disc, cfg = service(extra, runner=NullRunner(), **kw)
    inbox = _inbox(cfg)
    rescans(disc, 1)  # the first walk is over: what follows is found by polling or later rescans
    _tif(inbox / "C02533C.tif")
    _tif(inbox / "C02533C_CD31_IF.tif")
    _tif(inbox / "2024" / "A02677B5.tif")
    for r in range(2):
        for c in range(2):
            _tif(inbox / "2024" / "SS200000135TL_D1" / f"t_{r:04d}_{c:04d}_.tif", (16, 16))
    _until_jobs(cfg, lambda js: len(js) == 3, "three sets queued")
    root = disc.health()["roots"][0]
    assert root["observer"] == ("polling" if mode == "polling" else "native") and root["health"] == "ok"
    rescans(disc)
    assert sorted(j.chip for j in _jobs(cfg)) == ["A02677B5", "C02533C", "SS200000135TL_D1"]


# -- many sets ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_thousand_sets_arriving_at_random_times_are_each_queued_exactly_once(service):
    _d, disc, cfg = service("settle_seconds = 0.5\n", runner=NullRunner(), tick=0.2)
    inbox = _inbox(cfg)
    data = _tif_bytes((16, 16))
    rng = random.Random(1234)
    chips = [f"SS2{n:08d}_D1" for n in range(1000)]
    folders = [inbox / f"day{k}" for k in range(10)]
    for f in folders:
        f.mkdir()

    def writer():
        for chip in chips:
            folder = folders[rng.randrange(len(folders))]
            tmp = folder / f"{chip}.tif.part"
            tmp.write_bytes(data)
            os.replace(tmp, folder / f"{chip}.tif")  # how exporters finish a file
            if rng.random() < 0.05:
                time.sleep(rng.uniform(0.05, 0.3))  # arrival times, not a wait

    t = threading.Thread(target=writer, name="test-writer")
    t.start()
    t.join()
    wait_until(lambda: len(_jobs(cfg)) >= 1000, "1000 sets queued", timeout=60, seen=lambda: len(_jobs(cfg)))
    rescans(disc)  # more rescans and ticks: nothing twice
    jobs = _jobs(cfg)
    assert len(jobs) == 1000 and sorted(j.chip for j in jobs) == chips
    assert len({j.fingerprint for j in jobs}) == 1000 and all(j.state == "queued" for j in jobs)
    assert disc.health()["roots"][0]["members"] == 1000 and disc.health()["roots"][0]["pending"] == 0


def test_a_tick_that_runs_out_of_time_leaves_the_rest_for_the_next(service):
    _d, disc, cfg = service(
        "settle_seconds = 0.2", runner=NullRunner(), tick=0.05, discovery={"rescan_interval_s": 3600}
    )
    disc.tick_budget_s = 0.0  # one path and one set per tick: slow shares do not stall the service
    for k in range(12):
        _tif(_inbox(cfg) / f"SS2{k:08d}_D1.tif")
    _until_jobs(cfg, lambda js: len(js) == 12, "12 sets queued")
    assert len({j.fingerprint for j in _jobs(cfg)}) == 12


# -- supervision ----------------------------------------------------------------------


def test_a_killed_observer_is_replaced_and_the_service_keeps_finding_sets(service, capsys):
    _d, disc, cfg = service('settle_seconds = 0.3\nobserver = "native"', runner=NullRunner())
    watcher = disc._roots[0].watcher
    wait_until(watcher.alive, "the observer to run")
    watcher.observer.stop()  # the observer thread dies
    _until_root(disc, "health", "restarted 1x")
    assert watcher.alive()
    _tif(_inbox(cfg) / "C02533C.tif")
    _until_jobs(cfg, lambda js: len(js) == 1, "the set queued")
    wait_until(  # after the next rescan
        lambda: collect_status(cfg)["watchers"][0]["files"] == 1,
        "status to count the file",
        seen=lambda: collect_status(cfg)["watchers"],
    )
    (w,) = collect_status(cfg)["watchers"]
    assert w["health"] == "restarted 1x" and w["observer"] == "native" and w["path"] == str(_inbox(cfg).resolve())
    assert w["last_rescan"] is not None
    assert main(["status", "--config", cfg.source]) == 0
    text = capsys.readouterr().out
    text = text[text.index("service   ") :]  # the service's own console log comes first in this process
    assert all(len(line) <= 80 for line in text.splitlines()), text  # a long path wraps, nothing is cut
    flat = " ".join(text.split())
    # the path may be broken anywhere when it is longer than a line (xdist's tmp paths are): compare without spaces
    assert "".join(f"watch {_inbox(cfg).resolve()} native restarted 1x rescanned".split()) in "".join(flat.split())
    assert ", 1 files, 0 set(s) settling" in flat


# -- incomplete, changed, vanished ------------------------------------------------


@pytest.fixture
def json_log(tmp_path):
    path = tmp_path / "log.jsonl"
    configure_logging(level="info", file=path, console="off")

    def records(event=None):
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r for r in recs if event is None or r["event"] == event]

    yield records
    configure_logging(console="off")


def test_a_truncated_tiff_is_never_queued_and_is_reported_once(service, json_log):
    d, disc, cfg = service("settle_seconds = 0.3", runner=NullRunner(), discovery={"incomplete_timeout_s": 1.5})
    inbox = _inbox(cfg)
    data = _tif_bytes((256, 256))
    (inbox / "C02533C.tif").write_bytes(data[:-500])
    _until_jobs(cfg, bool, "the cut-short set to be reported")
    rescans(disc)
    (job,) = _jobs(cfg)
    assert job.state == "failed" and job.failed_stage == "discovery" and job.next_attempt_at is None
    assert "C02533C" in job.error and "incomplete" in job.error and "cut short" in job.error
    service.stop(d)
    _d2, disc2, _ = service(cfg=cfg, runner=NullRunner())  # reported once, even across a restart
    rescans(disc2, 3)  # past another incomplete_timeout_s
    assert len(_jobs(cfg)) == 1 and len(json_log("scan set never completed; reported")) == 1
    (inbox / "C02533C.tif").write_bytes(data[:-300])  # changed, still cut short: a new report replaces the old
    _until_jobs(cfg, lambda js: len(js) == 2 and js[0].state == "superseded", "the old report superseded")
    assert _jobs(cfg)[1].state == "failed" and "cut short" in _jobs(cfg)[1].error
    (inbox / "C02533C.tif").write_bytes(data)  # re-exported whole
    _until_jobs(cfg, lambda js: any(j.state == "queued" for j in js), "the whole set queued")
    _first, old, new = _jobs(cfg)
    assert old.state == "superseded" and new.state == "queued" and new.fingerprint != old.fingerprint


def test_a_re_export_makes_a_new_job_and_supersedes_the_older_one(service):
    _d, _disc, cfg = service("settle_seconds = 0.3", runner=NullRunner())
    tif = _tif(_inbox(cfg) / "SS200000135TL_D1.tif")
    _until_jobs(cfg, lambda js: len(js) == 1, "the set queued")
    first = _jobs(cfg)[0]
    tif.write_bytes(_tif_bytes((48, 48)))  # exported again, different content
    _until_jobs(cfg, lambda js: len(js) == 2, "the re-export queued")
    old, new = _jobs(cfg)
    assert old.id == first.id and old.state == "superseded" and new.state == "queued"
    with Store(cfg.database_path) as s:
        assert any("superseded by job" in (e.message or "") for e in s.events(old.id))


def test_sets_deleted_or_renamed_before_they_are_queued_are_dropped_cleanly(service, json_log):
    _d, disc, cfg = service("settle_seconds = 1.5", runner=NullRunner())
    inbox = _inbox(cfg)
    doomed = _tif(inbox / "C02533C.tif")
    renamed = _tif(inbox / "A02677B5.tif")
    _until_root(disc, "members", 2)
    doomed.unlink()
    renamed.rename(inbox / "D02070C3D3.tif")
    _until_jobs(cfg, lambda js: len(js) == 1, "the renamed set queued")
    rescans(disc)
    assert [j.chip for j in _jobs(cfg)] == ["D02070C3D3"]
    dropped = json_log("scan set disappeared before it was complete; dropped")
    assert sorted(r["chip"] for r in dropped) == ["A02677B5", "C02533C"]
    with Store(cfg.database_path) as s:
        members, sets = s.discovery_load()
    assert [Path(m["path"]).name for m in members] == ["D02070C3D3.tif"] and len(sets) == 1


def test_strict_naming_reports_a_name_once_ever_and_lenient_naming_takes_it(service, json_log):
    d, _disc, cfg = service("settle_seconds = 0.3", runner=NullRunner())
    inbox = _inbox(cfg)
    _tif(inbox / "mouse1.tif")
    for k in range(30):
        (inbox / f"notes{k}.txt").write_text("x")  # not candidates: debug lines only
    wait_until(lambda: json_log("names are not chip serials; ignored (naming = strict)"), "the strict-naming warning")
    service.stop(d)
    d2, disc2, _ = service(cfg=cfg, runner=NullRunner())
    rescans(disc2)
    (warning,) = json_log("names are not chip serials; ignored (naming = strict)")
    assert warning["names"] == ["mouse1.tif"] and not _jobs(cfg)
    assert not [r for r in json_log() if r["level"] in ("error", "critical")]
    service.stop(d2)
    lenient = dataclasses.replace(cfg, watch=(dataclasses.replace(cfg.watch[0], naming="lenient"),))
    service(cfg=lenient, runner=NullRunner())
    _until_jobs(cfg, lambda js: [j.chip for j in js] == ["mouse1"], "mouse1 queued under lenient naming")
    assert len(json_log("accepted a name that is not a chip serial (naming = lenient)")) == 1


def test_a_marker_file_decides_when_configured(service):
    _d, disc, cfg = service('settle_seconds = 0.2\nmarker = "{chip}.done"', runner=NullRunner())
    inbox = _inbox(cfg)
    _tif(inbox / "C02533C.tif")
    _tif(inbox / "C02533C_CD31_IF.tif")
    rescans(disc)
    assert not _jobs(cfg)
    (inbox / "C02533C.done").write_text("")
    _until_jobs(cfg, lambda js: len(js) == 1, "the set queued once its marker came")
    assert len(_members(cfg, _jobs(cfg)[0])) == 2


def test_the_output_folder_is_never_watched_even_inside_a_root(service, tmp_path):
    cfg = make_discovery_config(tmp_path, "settle_seconds = 0.2")
    out = cfg.watch[0].path / "qc-out"
    cfg = dataclasses.replace(cfg, output=OutputConfig(dir=str(out)))  # the loader refuses this; be defensive anyway
    _d, disc, _ = service(cfg=cfg, runner=NullRunner())
    _tif(out / "C02533C.tif")
    _tif(cfg.watch[0].path / "A02677B5.tif")
    _until_jobs(cfg, lambda js: len(js) == 1, "the set in the root queued")
    rescans(disc)
    assert [j.chip for j in _jobs(cfg)] == ["A02677B5"]


def test_a_missing_root_is_reported_and_nothing_under_it_is_dropped(service):
    _d, disc, cfg = service("settle_seconds = 30", runner=NullRunner())
    inbox = _inbox(cfg)
    _tif(inbox / "C02533C.tif")
    _until_root(disc, "members", 1)
    moved = inbox.with_name("inbox-away")
    inbox.rename(moved)  # the share goes away
    _until_root(disc, "health", "folder missing")
    rescans(disc)  # a rescan of a missing root deletes nothing
    assert disc.health()["roots"][0]["members"] == 1
    moved.rename(inbox)
    _until_root(disc, "health", "ok")
    rescans(disc)  # the rescan after it came back finds the same member
    assert disc.health()["roots"][0]["members"] == 1 and not _jobs(cfg)


# -- the store's discovery tables --------------------------------------------------


def test_store_keeps_discovery_state_and_notes_once(tmp_path):
    member = {
        "path": "/r/C02533C.tif",
        "root": "/r",
        "set_key": "/r/C02533C#set",
        "name": "C02533C",
        "chip": "C02533C",
        "format": "tiff",
        "role": "nuclear",
        "stain": None,
        "size": 10,
        "mtime_ns": 5,
        "files": 1,
        "sig": "10:5",
        "first_seen": 1.0,
        "last_change": 2.0,
    }
    sset = {
        "set_key": "/r/C02533C#set",
        "root": "/r",
        "chip": "C02533C",
        "folder": "/r",
        "first_seen": 1.0,
        "last_change": 2.0,
        "settling_since": 1.0,
    }
    with Store(tmp_path / "db.sqlite3") as s:
        assert s.schema_version == SCHEMA_VERSION
        s.discovery_save(members=[member], sets=[sset])
        s.discovery_save(members=[{**member, "size": 11, "last_change": 3.0}])  # upsert
        members, sets = s.discovery_load()
        assert members == [{**member, "size": 11, "last_change": 3.0}] and sets == [sset]
        s.discovery_save(drop_members=["/r/C02533C.tif"], drop_sets=["/r/C02533C#set"])
        assert s.discovery_load() == ([], [])
        assert s.note_once("not_serial:/r/x.tif", "not_serial") and not s.note_once("not_serial:/r/x.tif", "not_serial")
    with Store(tmp_path / "db.sqlite3") as s:  # and after reopening
        assert not s.note_once("not_serial:/r/x.tif", "not_serial")


def test_status_lists_every_waiting_set_and_misnamed_name_with_why(service, capsys, monkeypatch):
    """#15: sets that wait silently (misnamed, IF without its nuclear image, still settling) are listed in status."""
    _d, _disc, cfg = service("settle_seconds = 0.3", runner=NullRunner())
    inbox = _inbox(cfg)
    _tif(inbox / "mouse brain 1.tif")  # not a chip serial (strict naming): ignored, but said so in status
    _tif(inbox / "C02533C_CD31_IF.tif")  # an IF image whose nuclear image has not arrived
    _tif(inbox / "A02677B5.tif")  # complete: queued, not waiting

    def waiting():
        w = collect_status(cfg)["waiting"]
        return w if w["sets"] and w["misnamed"] and _jobs(cfg) else None

    wait_until(
        waiting, "status to list the waiting set and the misnamed name", seen=lambda: collect_status(cfg)["waiting"]
    )
    w = waiting()
    (s,) = w["sets"]
    assert s["chip"] == "C02533C" and s["stage"] == "incomplete" and "no nuclear image C02533C" in s["reason"]
    assert [n["path"] for n in w["misnamed"]] == [str(inbox / "mouse brain 1.tif")]
    assert [j.chip for j in _jobs(cfg)] == ["A02677B5"]
    monkeypatch.setenv("IMAGEQC_CONFIG", str(Path(cfg.source)))
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "waiting" in text.splitlines()
    assert "C02533C" in flat and "incomplete: IF images but no nuclear image C02533C" in flat
    assert "ignored" in flat and "mouse brain 1.tif" in flat and "not a chip serial" in flat.lower()
    (inbox / "mouse brain 1.tif").unlink()  # gone at the next full rescan
    _tif(inbox / "C02533C.tif")  # the nuclear image arrives: the set is queued and no longer waits
    wait_until(
        lambda: not collect_status(cfg)["waiting"]["sets"] and not collect_status(cfg)["waiting"]["misnamed"],
        "nothing left waiting",
        seen=lambda: collect_status(cfg)["waiting"],
    )
