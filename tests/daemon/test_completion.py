"""Completion: settle and grouping waits, writers, structural checks on real files, markers, fingerprints."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from daemon.completion import Judge, MemberState, SetView, fingerprint, member_files, open_for_writing
from daemon.config import WatchRoot
from daemon.snapshot import MemberStat, WalkPolicy, probe


def _tif(path: Path, shape=(64, 64), **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.arange(np.prod(shape), dtype=np.uint16).reshape(shape), **kw)
    return path


def _policy(root: Path, **kw) -> WalkPolicy:
    return WalkPolicy.from_config(WatchRoot(path=root, **kw))


def _member(policy: WalkPolicy, path: Path, *, first_seen=0.0, last_change=0.0) -> MemberState:
    got = probe(policy, os.path.realpath(path))
    assert got is not None and hasattr(got, "member"), f"{path} is not a member: {got}"
    m = got.member
    return MemberState(got.path, m.name, m.chip, m.format, m.role, m.stain, got.stat, first_seen, last_change)


def _view(*members: MemberState, last_change=0.0) -> SetView:
    return SetView(members[0].chip, os.path.dirname(members[0].path), tuple(members), last_change)


def _judge(root: Path, **kw) -> Judge:
    marker = kw.pop("marker", "")
    return Judge(_policy(root, marker=marker), settle_s=kw.pop("settle_s", 10.0), marker=marker, **kw)


# -- waits ------------------------------------------------------------------------


def test_settle_then_grouping_window_then_checks(tmp_path):
    root = tmp_path / "inbox"
    nuclear = _member(_policy(root), _tif(root / "C02533C.tif"), first_seen=100.0, last_change=100.0)
    judge = _judge(root, settle_s=10.0, grouping_s=30.0)
    view = _view(nuclear, last_change=100.0)
    v = judge.timing(view, 105.0)
    assert (v.complete, v.stage, v.recheck_at) == (False, "settling", 110.0)
    v = judge.timing(view, 112.0)
    assert (v.stage, v.recheck_at) == ("grouping", 130.0)
    assert judge.timing(view, 130.0) is None
    # a late IF image restarts both waits, from its own arrival
    stained = dataclasses.replace(nuclear, name="C02533C_CD31_IF", role="IF", stain="CD31", first_seen=125.0)
    view = _view(nuclear, stained, last_change=125.0)
    assert judge.timing(view, 134.0).stage == "settling" and judge.timing(view, 140.0).stage == "grouping"
    assert judge.timing(view, 155.0) is None
    assert judge.checks(view, 155.0, set()).complete


# -- structure --------------------------------------------------------------------


def test_a_tiff_is_incomplete_until_its_last_byte_arrives(tmp_path):
    src = _tif(tmp_path / "src.tif", (256, 256), tile=(64, 64))
    data = src.read_bytes()
    root = tmp_path / "inbox"
    root.mkdir()
    dst = root / "SS200000135TL_D1.tif"
    judge = _judge(root)
    reasons = []
    for end in (len(data) // 4, len(data) // 2, len(data) - 1):
        dst.write_bytes(data[:end])  # the file grows in chunks
        v = judge.checks(_view(_member(judge.policy, dst)), 0.0, set())
        assert not v.complete and v.stage == "incomplete"
        reasons.append(v.reason)
    assert all("SS200000135TL_D1.tif" in r for r in reasons) and any("cut short" in r for r in reasons)
    dst.write_bytes(data)
    assert judge.checks(_view(_member(judge.policy, dst)), 0.0, set()).complete


def test_real_czi_files_whole_and_truncated(tmp_path, shared_data):
    root = tmp_path / "inbox"
    root.mkdir()
    judge = _judge(root)
    whole = root / "C02533C.czi"
    shutil.copyfile(shared_data / "czi" / "mosaic_test.czi", whole)
    assert judge.checks(_view(_member(judge.policy, whole)), 0.0, set()).complete
    cut = root / "A02677B5.czi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    v = judge.checks(_view(_member(judge.policy, cut)), 0.0, set())
    assert not v.complete and "A02677B5.czi" in v.reason


def test_real_grid_at_tiles_complete_and_with_a_tile_missing(tmp_path, shared_data):
    root = tmp_path / "inbox"
    folder = root / "SS200000135TL_D1"
    shutil.copytree(shared_data / "tiles" / "stitch2d", folder)
    judge = _judge(root)
    assert judge.checks(_view(_member(judge.policy, folder)), 0.0, set()).complete
    (folder / "stitch2d_ex[Grid@1 1].jpg").unlink()
    v = judge.checks(_view(_member(judge.policy, folder)), 0.0, set())
    assert not v.complete and "1 of 6 tiles missing (first: row 1, column 1)" in v.reason


def _grid(folder: Path, cells, name="{r:04d}_{c:04d}", shape=(8, 8)) -> None:
    for r, c in cells:
        _tif(folder / f"scan_{name.format(r=r, c=c)}_x.tif", shape)


@pytest.mark.parametrize("meta", ["info.ini", "1.ini", "info.json"])
def test_motic_and_go_optical_metadata_declare_the_grid(tmp_path, meta):
    root = tmp_path / "inbox"
    folder = root / "SS200000135TL_D1"
    _grid(folder, [(r, c) for r in range(2) for c in range(3)])
    if meta == "info.json":
        (folder / meta).write_text(json.dumps({"scan": {"rows": 3, "cols": 3, "overlap": 0.1}}))
    else:
        (folder / meta).write_text("[Scan]\nRows=3\nCols=3\n")
    judge = _judge(root)
    v = judge.checks(_view(_member(judge.policy, folder)), 0.0, set())
    assert not v.complete and "3 of 9 tiles missing (first: row 2, column 0)" in v.reason
    _grid(folder, [(2, c) for c in range(3)])
    assert judge.checks(_view(_member(judge.policy, folder)), 0.0, set()).complete


def test_leica_snake_order_and_a_custom_pattern(tmp_path):
    root = tmp_path / "inbox"
    leica = root / "SS200000135TL_D1"
    for i in range(5):
        _tif(leica / f"TileScan 1_s{i:02d}_ch00.tif", (8, 8))
    (leica / "MetaData").mkdir()
    cells = "".join(f'<Tile FieldX="{c}" FieldY="{r}"/>' for r in range(2) for c in range(3))
    (leica / "MetaData" / "TileScan 1.xml").write_text(f"<Data><Attachment>{cells}</Attachment></Data>")
    judge = _judge(root)
    v = judge.checks(_view(_member(judge.policy, leica)), 0.0, set())
    assert "1 of 6 tiles missing (first: row 1, column 0)" in v.reason  # index 5 snakes back to column 0
    _tif(leica / "TileScan 1_s05_ch00.tif", (8, 8))
    assert judge.checks(_view(_member(judge.policy, leica)), 0.0, set()).complete
    custom = root / "A02677B5"
    for r, c in [(0, 0), (0, 1), (1, 1)]:
        _tif(custom / f"field-r{r}-c{c}.tif", (8, 8))
    pattern = r"r(?P<row>\d+)-c(?P<col>\d+)"
    judge = Judge(WalkPolicy.from_config(WatchRoot(path=root, tile_pattern=pattern)), settle_s=1)
    v = judge.checks(_view(_member(judge.policy, custom)), 0.0, set())
    assert "1 of 4 tiles missing (first: row 1, column 0)" in v.reason
    plain = Judge(_policy(root), settle_s=1).checks(_view(_member(_policy(root), custom)), 0.0, set())
    assert "no tile naming convention" in plain.reason and "tile_pattern" in plain.reason


def test_tiles_named_anyhow_are_complete_when_every_one_their_tile_configuration_lists_is_whole(tmp_path):
    root = tmp_path / "inbox"
    folder = root / "SS200000135TL_D1"
    names = ["1.tif", "2.tif", "tile three.tif"]
    for n in names:
        _tif(folder / n, (64, 64))
    config = "# Define the image coordinates\ndim = 2\n" + "".join(
        f"{n}; ; ({i * 50}.0, 0.0)\n" for i, n in enumerate(names)
    )
    (folder / "TileConfiguration.txt").write_text(config + "4.tif; ; (150.0, 0.0)\n")
    judge = _judge(root)
    v = judge.checks(_view(_member(judge.policy, folder)), 0.0, set())
    assert not v.complete and "1 of 4 tiles that TileConfiguration.txt lists are missing (first: 4.tif)" in v.reason
    last = _tif(folder / "4.tif", (64, 64))
    last.write_bytes(last.read_bytes()[:-100])  # listed and present, but still being written
    v = judge.checks(_view(_member(judge.policy, folder)), 0.0, set())
    assert not v.complete and "4.tif" in v.reason
    _tif(folder / "4.tif", (64, 64))
    assert judge.checks(_view(_member(judge.policy, folder)), 0.0, set()).complete


def test_a_truncated_newest_tile_keeps_a_full_grid_incomplete(tmp_path):
    root = tmp_path / "inbox"
    folder = root / "SS200000135TL_D1"
    _grid(folder, [(0, 0), (0, 1)], shape=(64, 64))
    last = folder / "scan_0000_0001_x.tif"
    last.write_bytes(last.read_bytes()[:-100])
    judge = _judge(root)
    v = judge.checks(_view(_member(judge.policy, folder)), 0.0, set())
    assert not v.complete and "scan_0000_0001_x.tif" in v.reason


def test_qc_archives_cut_short_are_incomplete_without_being_decompressed(tmp_path):
    root = tmp_path / "inbox"
    root.mkdir()
    good = root / "SS200000135TL_D1_20240131_101500_0.1.0.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        payload = os.urandom(200_000)
        info = tarfile.TarInfo("SS200000135TL_D1/report.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    judge = _judge(root)
    assert judge.checks(_view(_member(judge.policy, good)), 0.0, set()).complete
    cut = root / "C02533C.tar.gz"
    cut.write_bytes(good.read_bytes()[:-5000])
    v = judge.checks(_view(_member(judge.policy, cut)), 0.0, set())
    assert not v.complete and "the gzip trailer gives an uncompressed size" in v.reason and "cut short" in v.reason


def test_ambiguous_members_and_if_images_without_a_nuclear_image(tmp_path):
    root = tmp_path / "inbox"
    pol = _policy(root)
    a = _member(pol, _tif(root / "C02533C.tif"))
    shutil.copyfile(tmp_path / "inbox" / "C02533C.tif", root / "C02533C.tiff")
    b = _member(pol, root / "C02533C.tiff")
    judge = _judge(root)
    v = judge.checks(_view(a, b), 0.0, set())
    assert v.stage == "ambiguous" and "C02533C.tif, C02533C.tiff" in v.reason
    stained = _member(pol, _tif(root / "A02677B5_CD31_IF.tif"))
    v = judge.checks(_view(stained), 0.0, set())
    assert v.stage == "incomplete" and "no nuclear image A02677B5" in v.reason


def test_structural_results_are_remembered_per_member_signature(tmp_path):
    root = tmp_path / "inbox"
    calls = []

    def whole(policy, member):
        calls.append(member.path)
        return

    judge = _judge(root, whole=whole)
    m = _member(judge.policy, _tif(root / "C02533C.tif"))
    for _ in range(3):
        assert judge.checks(_view(m), 0.0, set()).complete
    assert len(calls) == 1
    judge.checks(_view(dataclasses.replace(m, stat=MemberStat(1, 2, 1, "1:2"))), 0.0, set())
    assert len(calls) == 2


# -- markers ----------------------------------------------------------------------


def test_with_a_marker_the_marker_alone_decides(tmp_path):
    root = tmp_path / "inbox"
    tif = _tif(root / "C02533C.tif")
    tif.write_bytes(tif.read_bytes()[:-10])  # truncated: the marker overrides structure
    judge = _judge(root, marker="{chip}.done", settle_s=60.0)
    view = _view(_member(judge.policy, tif, last_change=100.0), last_change=100.0)
    assert judge.timing(view, 100.5) is None  # no settle wait either
    v = judge.checks(view, 101.0, set())
    assert (v.complete, v.stage, v.recheck_at) == (False, "marker", 101.0 + judge.recheck_s)
    assert "C02533C.done" in v.reason
    (root / "C02533C.done").write_text("")
    assert judge.checks(view, 102.0, set()).complete


# -- writers ------------------------------------------------------------------------


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the /proc check is Linux's; Windows uses sharing modes"
)
def test_a_file_held_open_for_writing_by_another_process_is_not_complete(tmp_path):
    root = tmp_path / "inbox"
    tif = _tif(root / "C02533C.tif")
    other = _tif(root / "A02677B5.tif")
    code = "import sys, time; f = open(sys.argv[1], 'r+b'); g = open(sys.argv[2], 'rb'); print('ok', flush=True); time.sleep(3600)"  # killed by the test
    proc = subprocess.Popen([sys.executable, "-c", code, str(tif), str(other)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ok"
        held = open_for_writing([str(tif), str(other)])
        assert held == {os.path.realpath(tif)}  # the file opened read-only is not a writer
        judge = _judge(root)
        v = judge.checks(_view(_member(judge.policy, tif)), 50.0, held)
        assert (v.stage, v.recheck_at) == ("open", 50.0 + judge.recheck_s) and "still open for writing" in v.reason
    finally:
        proc.kill()
        proc.wait(60)
    assert open_for_writing([str(tif)]) == set()


def test_member_files_lists_tiles(tmp_path):
    root = tmp_path / "inbox"
    folder = root / "SS200000135TL_D1"
    _grid(folder, [(0, 0), (0, 1)])
    pol = _policy(root)
    assert sorted(os.path.basename(p) for p in member_files(pol, _member(pol, folder))) == [
        "scan_0000_0000_x.tif",
        "scan_0000_0001_x.tif",
    ]


# -- identity -------------------------------------------------------------------------


def test_fingerprint_is_order_free_and_follows_names_sizes_mtimes_and_tiles(tmp_path):
    st = MemberStat(10, 1_000, 1, "10:1000")
    a = MemberState("/r/C02533C.tif", "C02533C", "C02533C", "tiff", "nuclear", None, st, 0.0, 0.0)
    b = MemberState("/r/C02533C_CD31_IF.tif", "C02533C_CD31_IF", "C02533C", "tiff", "IF", "CD31", st, 5.0, 9.0)
    fp = fingerprint([a, b])
    assert fp == fingerprint([b, a]) and len(fp) == 64
    assert fp == fingerprint([a, dataclasses.replace(b, first_seen=99.0, path="/elsewhere/x.tif")])  # times, place: no
    for changed in (
        dataclasses.replace(b, name="C02533C_GFP_IF"),
        dataclasses.replace(b, stat=MemberStat(11, 1_000, 1, "11:1000")),
        dataclasses.replace(b, stat=MemberStat(10, 1_001, 1, "10:1001")),
        dataclasses.replace(b, stat=MemberStat(10, 1_000, 1, "other tile mtimes")),
    ):
        assert fingerprint([a, changed]) != fp
    assert fingerprint([a]) != fp


def test_the_job_member_dict(tmp_path):
    root = tmp_path / "inbox"
    m = _member(_policy(root), _tif(root / "C02533C_CD31_IF.tif"))
    d = m.job_member()
    assert d == {
        "name": "C02533C_CD31_IF",
        "path": os.path.realpath(root / "C02533C_CD31_IF.tif"),
        "format": "tiff",
        "role": "IF",
        "stain": "CD31",
        "size": m.stat.size,
        "mtime_ns": m.stat.mtime_ns,
        "files": 1,
    }
    assert time.time_ns() >= d["mtime_ns"] > 0
