"""Which files a job uploads, under which keys; and whether inputs are still what QC saw."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.store import Store
from daemon.upload.base import InputChanged, digest_file
from daemon.upload.plan import PlanError, check_inputs, plan_job

from .conftest import make_qc_done_job

TOML = """
[site]
name = "lab-7"
[[upload]]
name = "aws"
type = "s3"
bucket = "b"
prefix = "stereo"
mode = "{aws_mode}"
[[upload]]
name = "hpc"
type = "hpc"
path = "share"
mode = "{hpc_mode}"
key_template = "{{kind}}/{{date}}/{{chip}}/{{name}}"
"""


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "state" / "db.sqlite3") as s:
        yield s


def _plan(cfg, store, job):
    scan = store.get_scan_set(store.get_job(job.id).scan_set_id)
    return plan_job(cfg, chip=job.chip, root=scan.root, members=scan.members, result=store.get_result(job.id))


def test_modes_and_templates_decide_the_files_and_keys(make_config, tmp_path, store):
    cfg = make_config(TOML.format(aws_mode="outputs", hpc_mode="all"))
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", tiles=True)
    planned = _plan(cfg, store, job)
    aws = sorted(p.remote_key for p in planned if p.target == "aws")
    assert aws == [
        f"stereo/lab-7/{job.chip}/{job.run}/{job.run}.tar.gz",
        f"stereo/lab-7/{job.chip}/{job.run}/report.json",
    ]
    hpc = sorted(p.remote_key for p in planned if p.target == "hpc")
    assert hpc == sorted(
        [
            f"inputs/20240612/{job.chip}/{job.chip}.tif",
            *(f"inputs/20240612/{job.chip}/{job.chip}_CD31_IF/tile_{r}_{c}.tif" for r in range(2) for c in range(2)),
            f"outputs/20240612/{job.chip}/{job.run}.tar.gz",
            f"outputs/20240612/{job.chip}/report.json",
        ]
    )  # the tile folder keeps its relative paths; its temp file is left out
    for p in planned:
        st = Path(p.local_path).stat()
        assert (p.size, p.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_a_missing_archive_or_input_cannot_be_planned(make_config, tmp_path, store):
    cfg = make_config(TOML.format(aws_mode="all", hpc_mode="none"))
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out")
    job.archive.unlink()
    with pytest.raises(PlanError, match=r"archive .* is missing; run QC again"):
        _plan(cfg, store, job)
    other = make_qc_done_job(store, tmp_path / "inbox2", tmp_path / "out2", chip="C02533C")
    other.inputs[0].unlink()
    with pytest.raises(PlanError, match="is gone"):
        _plan(cfg, store, other)


def test_unchanged_inputs_pass_the_check(tmp_path, store):
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", tiles=True)
    members = store.get_scan_set(store.get_job(job.id).scan_set_id).members
    assert check_inputs(members).ok


@pytest.mark.parametrize("change", ["rewritten", "touched", "tile_added", "tile_grew", "tile_touched", "deleted"])
def test_any_change_since_discovery_is_reported(tmp_path, store, change):
    job = make_qc_done_job(store, tmp_path / "inbox", tmp_path / "out", tiles=True)
    members = store.get_scan_set(store.get_job(job.id).scan_set_id).members
    tif, folder = job.inputs
    if change == "rewritten":
        tif.write_bytes(tif.read_bytes() + b"more")
    elif change == "touched":
        st = tif.stat()
        os.utime(tif, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "tile_added":
        (folder / "tile_2_0.tif").write_bytes(b"late tile")
    elif change == "tile_grew":
        with open(folder / "tile_0_0.tif", "ab") as f:
            f.write(b"x")
    elif change == "tile_touched":  # rewritten in place, same size: the newest mtime moves
        st = (folder / "tile_1_1.tif").stat()
        os.utime(folder / "tile_1_1.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    else:
        tif.unlink()
    check = check_inputs(members)
    assert not check.ok
    if change == "deleted":
        assert check.missing == (str(tif),)
    else:
        assert check.changed and not check.missing


def test_a_file_written_while_it_is_hashed_is_never_digested(tmp_path):
    path = tmp_path / "growing.tif"
    path.write_bytes(os.urandom(3 << 20))
    calls = []

    def writer_meanwhile():  # called before each block is read
        calls.append(1)
        if len(calls) == 1:
            with open(path, "ab") as f:
                f.write(b"appended by the microscope")

    with pytest.raises(InputChanged, match="changed while it was being read"):
        digest_file(path, part_size=1 << 20, check=writer_meanwhile)
    st = path.stat()
    with pytest.raises(InputChanged, match="recorded after QC"):
        digest_file(path, part_size=1 << 20, expect=(st.st_size - 1, st.st_mtime_ns))


def test_digests_are_per_part_and_whole(tmp_path):
    import hashlib

    data = os.urandom((2 << 20) + 5)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    d = digest_file(path, part_size=1 << 20, sha256_parts=True, crc64=True)
    assert d.sha256 == hashlib.sha256(data).hexdigest()
    assert d.part_md5 == tuple(hashlib.md5(data[i : i + (1 << 20)]).hexdigest() for i in range(0, len(data), 1 << 20))
    assert d.part_sha256[2] == hashlib.sha256(data[2 << 20 :]).hexdigest()
    assert d.parts == 3 and d.part_range(3) == (2 << 20, 5)
    import crcmod

    crc = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)
    assert d.crc64 == crc(data)
