"""Watching: the tree walk and snapshot diff, real observers as hints, supervision, rescans."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from daemon.config import WatchRoot
from daemon.snapshot import (
    MemberStat,
    WalkPolicy,
    diff_snapshots,
    norm,
    probe,
    scan_tree,
)
from daemon.watcher import (
    HINT_DEEP,
    PollLister,
    Rescanner,
    RootMissing,
    RootWatcher,
    choose_observer,
    default_observer,
)
from tests.helpers import scaled, wait_until


def _tif(path: Path, shape=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.zeros(shape, np.uint8))
    return path


def _tiles(folder: Path, rows: int, cols: int) -> Path:
    for r in range(rows):
        for c in range(cols):
            _tif(folder / f"img_{r:04d}_{c:04d}_x.tif", (8, 8))
    return folder


def _policy(root: Path, exclude=(), **kw) -> WalkPolicy:
    return WalkPolicy.from_config(WatchRoot(path=root, **kw), exclude=exclude)


# -- choosing the observer ---------------------------------------------------------


def test_auto_picks_polling_for_network_paths_and_native_for_local_disks(tmp_path):
    assert choose_observer("auto", "//nas/stereo/export") == "polling"
    assert choose_observer("auto", r"\\nas\stereo\export") == "polling"
    assert choose_observer("auto", str(tmp_path)) == "native"
    assert choose_observer("auto", str(tmp_path), is_network=lambda p: True) == "polling"
    assert choose_observer("native", "//nas/x") == "native" and choose_observer("polling", str(tmp_path)) == "polling"


# -- the walk ----------------------------------------------------------------------


def test_scan_tree_finds_files_tile_folders_and_sets_in_their_own_folders(tmp_path):
    root = tmp_path / "inbox"
    _tif(root / "C02533C.tif")
    _tif(root / "C02533C_CD31_IF.TIF")
    _tiles(root / "2024-05-01" / "SS200000135TL_D1", 2, 3)
    _tif(root / "SS200000108BR_A3A4" / "SS200000108BR_A3A4.tif")  # a folder per chip: a container, not tiles
    (root / "SS200000108BR_A3A4" / "SS200000108BR_A3A4_GFP_IF").mkdir()
    _tif(root / "SS200000108BR_A3A4" / "SS200000108BR_A3A4_GFP_IF" / "t_0000_0000_.tif")
    (root / "notes.txt").write_text("hello")
    _tif(root / "C02533C.tif.part")
    _tif(root / "skipme" / "D02070C3D3.tif")
    res = scan_tree(_policy(root, ignore=("skip*",)))
    found = {os.path.relpath(p, norm(root)): f for p, f in res.members.items()}
    assert set(found) == {
        "C02533C.tif",
        "C02533C_CD31_IF.TIF",
        os.path.join("2024-05-01", "SS200000135TL_D1"),
        os.path.join("SS200000108BR_A3A4", "SS200000108BR_A3A4.tif"),
        os.path.join("SS200000108BR_A3A4", "SS200000108BR_A3A4_GFP_IF"),
    }
    tiles = found[os.path.join("2024-05-01", "SS200000135TL_D1")]
    assert tiles.member.format == "tiles" and tiles.stat.files == 6
    assert found["C02533C_CD31_IF.TIF"].member.role == "IF"
    assert res.ignored == ((os.path.join(norm(root), "notes.txt"), "not a .tif, .tiff, .czi or .tar.gz file"),)
    assert res.complete and not res.unreadable and not res.rejected
    assert res.files == 2 + 6 + 1 + 1 + 1  # members' files (tiles counted) and the ignored note


def test_scan_tree_never_follows_links_or_enters_the_service_folders(tmp_path):
    root = tmp_path / "inbox"
    outside = tmp_path / "elsewhere"
    _tif(outside / "C02533C.tif")
    _tif(root / "out" / "A02677B5.tif")
    root.mkdir(exist_ok=True)
    if sys.platform != "win32":
        (root / "link").symlink_to(outside, target_is_directory=True)
        (root / "D02070C3D3.tif").symlink_to(outside / "C02533C.tif")
    pol = _policy(root, exclude=(root / "out",))
    assert scan_tree(pol).members == {}
    assert probe(pol, str(root / "out" / "A02677B5.tif")) is None


def test_strict_naming_rejects_non_serials_and_lenient_naming_takes_them(tmp_path):
    root = tmp_path / "inbox"
    _tif(root / "mouse1.tif")
    _tiles(root / "sample7", 1, 2)
    _tif(root / "export" / "C02533C.tif")  # a plainly named folder is walked, not taken for tiles
    strict = scan_tree(_policy(root))
    assert [os.path.basename(p) for p in strict.members] == ["C02533C.tif"]
    assert sorted(os.path.basename(r.path) for r in strict.rejected) == ["mouse1.tif", "sample7"]
    assert all("naming = strict" in r.reason for r in strict.rejected)
    lenient = scan_tree(_policy(root, naming="lenient"))
    got = {os.path.basename(p): f for p, f in lenient.members.items()}
    assert set(got) == {"C02533C.tif", "mouse1.tif", "sample7"}
    assert not got["mouse1.tif"].serial and got["C02533C.tif"].serial and got["sample7"].member.format == "tiles"


def test_non_recursive_roots_and_partial_scans(tmp_path):
    root = tmp_path / "inbox"
    _tif(root / "C02533C.tif")
    _tif(root / "sub" / "A02677B5.tif")
    _tiles(root / "sub" / "SS200000135TL_D1", 1, 1)
    assert [os.path.basename(p) for p in scan_tree(_policy(root, recursive=False)).members] == ["C02533C.tif"]
    pol = _policy(root)
    assert sorted(os.path.basename(p) for p in scan_tree(pol, str(root / "sub")).members) == [
        "A02677B5.tif",
        "SS200000135TL_D1",
    ]
    one = scan_tree(pol, str(root / "sub" / "SS200000135TL_D1"))  # a tile folder examined as an entry
    assert list(one.members) == [norm(root / "sub" / "SS200000135TL_D1")]


def test_tile_folder_stat_changes_with_any_tile(tmp_path):
    folder = _tiles(tmp_path / "inbox" / "SS200000135TL_D1", 1, 2)
    pol = _policy(tmp_path / "inbox")
    before = probe(pol, str(folder)).stat
    tile = folder / "img_0000_0001_x.tif"
    st = tile.stat()
    os.utime(tile, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = probe(pol, str(folder)).stat
    assert after.sig != before.sig and after.size == before.size and after.files == 2
    assert probe(pol, str(folder / "gone")) is None


def test_diff_of_two_snapshots_is_pure_and_protects_unreadable_folders():
    a, b = MemberStat(1, 1, 1, "1:1"), MemberStat(2, 2, 1, "2:2")
    old = {"/r/x.tif": a, "/r/y.tif": a, "/r/share/z.tif": a}
    new = {"/r/x.tif": b, "/r/n.tif": a}
    d = diff_snapshots(old, new, unreadable=["/r/share"])
    assert d.created == ("/r/n.tif",) and d.modified == ("/r/x.tif",) and d.deleted == ("/r/y.tif",)
    assert not diff_snapshots(new, dict(new)) and set(d.paths) == {"/r/n.tif", "/r/x.tif", "/r/y.tif"}


# -- observers ------------------------------------------------------------------------


@pytest.fixture
def watchers():
    made: list[RootWatcher] = []
    yield made
    for w in made:
        w.stop()


def _watch(made, root: Path, **kw) -> RootWatcher:
    w = RootWatcher(_policy(root), **kw)
    made.append(w)
    return w


def _hinted(w: RootWatcher, name: str) -> bool:
    return any(os.path.basename(p) == name for p in w.hints.drain())


def _until_watching(w: RootWatcher, root: Path) -> None:
    """Until the observer reports events: a probe file is rewritten until its hint arrives, then the hints are
    drained. Files the test writes next are seen by a running observer, not by a guess at how long it takes to start.
    """

    def probe_seen() -> bool:
        (root / "probe.tif").write_bytes(os.urandom(16))
        return _hinted(w, "probe.tif")

    wait_until(probe_seen, "the observer to report a probe file", every=0.1)
    w.hints.drain()


@pytest.mark.parametrize("mode", ["native", "polling"])
def test_observers_turn_events_into_hints(tmp_path, watchers, mode):
    root = tmp_path / "inbox"
    root.mkdir()
    w = _watch(watchers, root, configured=mode, poll_s=0.1)
    assert w.start() and w.mode == mode and w.health() == "ok"
    _until_watching(w, root)
    _tif(root / "C02533C.tif")
    wait_until(lambda: _hinted(w, "C02533C.tif"), "_hinted(w, 'C02533C.tif')")
    (root / "SS200000135TL_D1").mkdir()
    flags = {}
    wait_until(
        lambda: flags.update(w.hints.drain()) or any(p.endswith("SS200000135TL_D1") for p in flags),
        "flags.update(w.hints.drain()) or any(p.endswith('SS200000135TL_D1') for p in flags)",
    )
    assert flags[os.path.join(norm(root), "SS200000135TL_D1")] & HINT_DEEP or mode == "polling"


def test_the_polling_lister_never_lists_the_tiles_of_a_tile_folder(tmp_path):
    root = tmp_path / "inbox"
    _tiles(root / "SS200000135TL_D1", 2, 2)
    _tif(root / "C02533C" / "C02533C.tif")
    (root / "readme.md").write_text("x")
    lister = PollLister(_policy(root))
    assert list(lister(str(norm(root / "SS200000135TL_D1")))) == []
    assert [e.name for e in lister(str(norm(root / "C02533C")))] == ["C02533C.tif"]
    assert sorted(e.name for e in lister(norm(root))) == ["C02533C", "SS200000135TL_D1"]


def test_a_native_observer_that_fails_to_start_falls_back_to_polling(tmp_path, watchers):
    root = tmp_path / "inbox"
    root.mkdir()

    def factory(mode, policy, poll_s):
        if mode == "native":
            raise OSError(28, "inotify watch limit reached")
        return default_observer(mode, policy, poll_s)

    w = _watch(watchers, root, configured="auto", poll_s=0.1, factory=factory)
    assert w.start() and w.mode == "polling" and "native failed" in w.health()
    _until_watching(w, root)
    _tif(root / "C02533C.tif")
    wait_until(lambda: _hinted(w, "C02533C.tif"), "_hinted(w, 'C02533C.tif')")


@pytest.mark.parametrize("how", ["observer stopped", "emitter raised"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_killed_observer_is_replaced_and_asks_for_a_rescan(tmp_path, watchers, how):
    root = tmp_path / "inbox"
    root.mkdir()
    w = _watch(watchers, root, configured="native", poll_s=0.1)
    assert w.start() and w.supervise() is None
    old = w.observer
    if how == "observer stopped":
        old.stop()
    else:
        emitter = next(iter(old.emitters))

        def boom(timeout):
            raise OSError(5, "Input/output error")

        emitter.queue_events = boom  # the real emitter thread dies on its next loop...
        (root / "wake.txt").write_text("x")  # ...which this event starts
    wait_until(lambda: not w.alive(), "not w.alive()")
    assert w.supervise() == "observer restarted"
    assert w.observer is not old and w.alive() and w.restarts == 1 and w.health() == "restarted 1x"
    _until_watching(w, root)
    _tif(root / "C02533C.tif")
    wait_until(lambda: _hinted(w, "C02533C.tif"), "_hinted(w, 'C02533C.tif')")


def test_a_vanished_root_is_reported_and_watched_again_when_it_returns(tmp_path, watchers):
    root = tmp_path / "inbox"
    root.mkdir()
    w = _watch(watchers, root, configured="native", is_network=lambda p: True)
    assert w.start()
    root.rmdir()
    assert w.supervise() is None and w.health() == "share missing" and w.observer is None
    root.mkdir()
    w._retry_at = 0.0
    assert w.supervise() == "folder back" and w.alive() and w.health() == "ok"


def test_a_root_missing_at_start_is_watched_once_it_appears(tmp_path, watchers):
    root = tmp_path / "later"
    w = _watch(watchers, root, configured="polling", poll_s=0.1)
    assert not w.start() and w.health() == "folder missing"
    root.mkdir()
    assert w.supervise() == "folder back" and w.alive()


def test_an_event_queue_overflow_asks_for_a_rescan(tmp_path, watchers):
    root = tmp_path / "inbox"
    root.mkdir()
    w = _watch(watchers, root, configured="native")
    assert w.start()
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
    assert w.supervise() == "events lost"
    assert w.supervise() is None


# -- the rescanner ----------------------------------------------------------------


def test_the_rescanner_walks_at_start_on_request_and_reports_missing_roots(tmp_path):
    root, gone = tmp_path / "inbox", tmp_path / "gone"
    _tif(root / "C02533C.tif")
    rs = Rescanner([_policy(root), _policy(gone)], interval_s=3600)
    rs.start()
    try:
        got = [rs.results.get(timeout=scaled(10)), rs.results.get(timeout=scaled(10))]
        missing = [g for g in got if isinstance(g, RootMissing)]
        scans = [g for g in got if not isinstance(g, RootMissing)]
        assert [m.root for m in missing] == [norm(gone)]
        assert list(scans[0].members) == [norm(root / "C02533C.tif")]
        _tif(root / "A02677B5.tif")
        rs.request(norm(root))
        again = rs.results.get(timeout=scaled(10))
        assert len(again.members) == 2 and rs.last[norm(root)]["files"] == 2
    finally:
        t = time.monotonic()
        rs.stop()
        assert time.monotonic() - t < scaled(5) and not rs.alive()  # woken at once, not after its 3600 s interval
