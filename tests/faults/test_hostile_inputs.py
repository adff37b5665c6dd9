"""Corrupt and hostile inputs: clear errors, the service keeps running, nothing outside the roots touched.

One service watches a strict root (``inbox``) and a lenient one
(``lenient``). Before it starts, the inbox receives: a truncated TIFF, a
truncated copy of a real CZI, a TIFF whose header declares 10^6 x 10^6 px,
QC archives with ``../``, absolute and linked-out members, symbolic links to
a chip TIFF and a folder outside the root, and names with unicode and spaces
(a serial in a folder named ``Run 2024 α``, ``Mouse brain α 1.tif``, an IF
name with a Greek letter). Each ends as the naming grammar and the readers
decide, with a message that says what is wrong; afterwards an ordinary set is
processed and the files the microscope wrote are byte-identical.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import threading
import uuid
from pathlib import Path

import psutil
import pytest

from .conftest import (
    config_text,
    hpc_target,
    serial,
    tree_hashes,
    verify_exactly_once,
    write_slowly,
)

pytestmark = pytest.mark.soak


def header_bomb(side: int = 10**6) -> bytes:
    """A valid little-endian TIFF whose one IFD declares ``side`` x ``side`` 8-bit px and holds 16 bytes."""
    tags = [
        (256, 4, side),
        (257, 4, side),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, None),
        (277, 3, 1),
        (278, 4, side),
        (279, 4, 16),
    ]
    strip = 8 + 2 + 12 * len(tags) + 4
    out = b"II" + struct.pack("<HI", 42, 8) + struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        value = strip if value is None else value
        out += struct.pack("<HHI", tag, typ, 1) + (
            struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        )
    return out + struct.pack("<I", 0) + b"\x7f" * 16


def hostile_archive(path: Path, members: list[tarfile.TarInfo]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            data = b"imageqc fault test: this must never be written\n" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


class RssSampler:
    """Largest resident size seen per QC child of the service, sampled every 50 ms."""

    def __init__(self, svc) -> None:
        self.svc, self.peak, self.stop = svc, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            for p in self.svc.children() if self.svc.alive() else []:
                try:
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:  # the child ended between listing and reading
                    continue


def test_hostile_inputs_get_clear_errors_and_nothing_outside_the_roots_is_touched(
    make_service, chip_images, shared_data
):
    token = uuid.uuid4().hex[:12]
    svc = make_service(
        config_text(
            watch=[{"path": "inbox", "naming": "strict"}, {"path": "lenient", "naming": "lenient"}],
            uploads=[hpc_target()],
            discovery={"incomplete_timeout_s": 3},
        ),
        folders=("inbox", "lenient", "hpc", "outside/outdir"),
    )
    inbox, lenient, outside = svc.root / "inbox", svc.root / "lenient", svc.root / "outside"
    image = chip_images[0]
    ch = {k: serial(400 + k) for k in range(1, 10)}
    # corrupt
    (inbox / f"{ch[1]}.tif").write_bytes(image[: len(image) * 6 // 10])
    czi = (shared_data / "czi" / "mosaic_test.czi").read_bytes()
    (inbox / f"{ch[2]}.czi").write_bytes(czi[: len(czi) // 2])
    (inbox / f"{ch[3]}.tif").write_bytes(header_bomb())
    # hostile archives: '../' and absolute members; a link that leaves the archive
    escapes = [f"../../escaped-{token}.txt", f"{ch[4]}/images/../../../escaped2-{token}.txt", f"/tmp/abs-{token}.txt"]
    hostile_archive(inbox / f"{ch[4]}.tar.gz", [_file(f"{ch[4]}/report.json"), *(_file(n) for n in escapes)])
    hostile_archive(
        inbox / f"{ch[5]}.tar.gz",
        [_file(f"{ch[5]}/report.json"), _link(f"{ch[5]}/images/{ch[5]}.tif", "../../../../../../etc/passwd")],
    )
    # symbolic links inside the root to a chip TIFF and a folder outside it
    (outside / "SS200000501TL_D1.tif").write_bytes(image)
    (outside / "outdir" / "SS200000502TL_D1.tif").write_bytes(image)
    os.symlink(outside / "SS200000501TL_D1.tif", inbox / f"{ch[6]}.tif")
    os.symlink(outside / "outdir", inbox / "linked", target_is_directory=True)
    # unicode and spaces
    (inbox / f"{ch[7]}_CD31-α_IF.tif").write_bytes(
        image
    )  # the IF name allows letters A-Z, digits and '-': not a member name
    (inbox / "Mouse brain α 1.tif").write_bytes(image)  # not a serial: reported once, ignored (strict)
    (inbox / "Run 2024 α").mkdir()
    (inbox / "Run 2024 α" / f"{ch[8]}.tif").write_bytes(image)  # a serial in a folder with unicode and spaces: fine
    (lenient / "Mouse brain α 1.tif").write_bytes(image)  # accepted with a warning (lenient) and QC'd
    before = {d.name: tree_hashes(d) for d in (inbox, lenient, outside)}

    sampler = RssSampler(svc)
    svc.start()
    sampler.thread.start()
    try:
        svc.wait_running()

        def settled() -> bool:
            by = {j.chip: j for j in svc.jobs()}
            failed = [ch[k] for k in (1, 2, 3, 4, 5)]
            return all(by.get(c) is not None and by[c].state == "failed" for c in failed) and all(
                by.get(c) is not None and by[c].state == "done" for c in (ch[8], "Mouse brain α 1")
            )

        svc.wait_for(settled, 120, "every hostile input to end (failed or done)")
        svc.rescans(2)  # nothing is reported twice, nothing new is queued
        write_slowly(inbox / f"{ch[9]}.tif", image)  # an ordinary set afterwards
        svc.wait_for(lambda: any(j.chip == ch[9] and j.state == "done" for j in svc.jobs()), 90, "the ordinary set")
        st = svc.status()
        assert svc.alive() and st["service"]["running"] is True
    finally:
        sampler.stop.set()
    assert svc.stop() == 0

    jobs = {j.chip: j for j in svc.jobs()}
    assert sorted(jobs) == sorted([ch[1], ch[2], ch[3], ch[4], ch[5], ch[8], ch[9], "Mouse brain α 1"])
    truncated_tif, truncated_czi = jobs[ch[1]], jobs[ch[2]]
    for j, name in ((truncated_tif, f"{ch[1]}.tif"), (truncated_czi, f"{ch[2]}.czi")):
        assert j.failed_stage == "discovery" and "still incomplete" in j.error and name in j.error, j.error
        assert "the file was cut short" in j.error and "re-export it if it was cut short" in j.error
    bomb = jobs[ch[3]]
    assert bomb.failed_stage == "qc" and bomb.next_attempt_at is None  # permanent: never retried
    assert "gives the IFD #0 image a size of 1000000 x 1000000 px, beyond the limit of 400000 px per side" in bomb.error
    assert "raise qc.max_dimension" in bomb.error
    pids = [e["pid"] for e in svc.log() if e.get("event") == "job started" and e.get("job_id") == bomb.id]
    assert pids and all(p in sampler.peak for p in pids), (pids, sampler.peak)  # the child was seen running
    assert all(sampler.peak[p] < 600 * 2**20 for p in pids), {p: sampler.peak[p] for p in pids}  # nothing allocated
    print(
        f"\nhostile: the 10^6 x 10^6 header's QC child peaked at {max(sampler.peak[p] for p in pids) / 2**20:.0f} MB RSS; "
        f"other QC children {max(sampler.peak.values()) / 2**20:.0f} MB at most"
    )
    assert "has an absolute path or '..'" in jobs[ch[4]].error and "do not unpack it" in jobs[ch[4]].error
    assert "points outside the archive" in jobs[ch[5]].error
    for chip in (ch[4], ch[5]):
        assert jobs[chip].failed_stage == "qc" and jobs[chip].next_attempt_at is None
    # nothing was written outside: no escaped file anywhere it could have landed
    landed = [p for base in (Path("/tmp"), svc.root.parent, svc.root) for p in base.rglob(f"*{token}*")]
    assert not landed, landed
    # links were never followed: no job, scan set or watched member refers to anything outside the roots
    roots = [str(inbox), str(lenient)]
    with svc.store() as s:
        paths = [m["path"] for j in s.list_jobs() for m in s.get_scan_set(j.scan_set_id).members]
        paths += [m["path"] for m in s.discovery_load()[0]]
    assert paths and all(any(p.startswith(r + os.sep) for r in roots) for p in paths), paths
    assert not any("linked" in p or ch[6] in p or "outside" in p for p in paths), paths
    # names that are not serials (strict) were reported once, however many rescans saw them
    log = svc.log()
    for name in ("Mouse brain α 1.tif", f"{ch[7]}_CD31-α_IF.tif"):
        reports = [
            e for e in log if e.get("event", "").startswith("names are not chip serials") and name in e.get("names", [])
        ]
        assert len(reports) == 1, (name, reports)
    accepted = [e for e in log if e.get("event", "").startswith("accepted a name that is not a chip serial")]
    assert [e["path"] for e in accepted] == [str(lenient / "Mouse brain α 1.tif")]
    with svc.store() as s:
        assert s.get_result(jobs["Mouse brain α 1"].id)["verdict"] == "pass"
        assert s.get_result(jobs[ch[8]].id)["verdict"] == "pass"
    verify_exactly_once(
        svc, [ch[8], ch[9], "Mouse brain α 1"], hpc=svc.root / "hpc", ignore=[ch[k] for k in range(1, 6)]
    )
    after = {d.name: tree_hashes(d) for d in (inbox, lenient, outside)}
    after["inbox"].pop(f"{ch[9]}.tif")
    assert after == before  # the microscope's files, byte for byte
