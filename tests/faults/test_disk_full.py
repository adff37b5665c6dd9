"""A full disk: the output folder, the upload share, the state folder.

Each case mounts a small tmpfs (Linux, root; skipped with the reason
otherwise) where the service writes, fills it up with a filler file, lets a
scan set arrive, checks the error is clear and the service keeps going (or,
for the job database, stops with the reason rather than lose state), then
frees the space and checks the set ends ``done`` with verified uploads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SLOWDOWN_ENV, scaled

from .conftest import config_text, hpc_target, serial, verify_exactly_once, write_slowly

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mounts a tmpfs: Linux only"),
]


class Tmpfs:
    """A small tmpfs mounted at ``path``; :meth:`fill` leaves ``leave`` bytes free, :meth:`free` undoes it."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.filler = path / "filler.bin"
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=scaled(60),
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {r.stderr.strip() or r.returncode}")

    def available(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        with self.filler.open("ab") as fh:
            want = self.available() - leave
            while want > 0:
                try:
                    fh.write(b"\0" * min(want, 1 << 20))
                    fh.flush()
                except OSError:
                    break
                want = self.available() - leave

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)


@pytest.fixture
def tmpfs() -> Iterator:
    mounted: list[Tmpfs] = []

    def mount(path: Path, size: str) -> Tmpfs:
        t = Tmpfs(path, size)
        mounted.append(t)
        return t

    yield mount
    for t in mounted:
        t.unmount()


#: At most seconds a job that failed on the full output disk waits for its retry (at least half; before the slowdown).
RETRY_HOLD_S = 20.0


def _failed(svc, chip):
    return next((j for j in svc.jobs() if j.chip == chip and j.state == "failed"), None)


def test_a_full_output_disk_fails_qc_transiently_and_the_retry_succeeds_once_space_returns(
    make_service, tmpfs, chip_images
):
    # status lists a job under recent_errors only while it is failed, so the retry waits long enough
    # (RETRY_HOLD_S, scaled) for `imageqc status` to start and read it even on a busy machine
    hold = scaled(RETRY_HOLD_S)
    svc = make_service(
        config_text(
            uploads=[hpc_target()],
            output={"dir": "out", "pictures": True},
            service={"retry_base_s": hold, "retry_max_s": hold},
        )
    )
    out = tmpfs(svc.root / "out", "6m")
    out.fill(leave=64 * 1024)
    svc.start()
    svc.wait_running()
    chip = serial(300)
    write_slowly(svc.root / "inbox" / f"{chip}.tif", chip_images[0])
    job = svc.wait_for(lambda: _failed(svc, chip), 90, "QC to fail on the full disk")
    assert job.failed_stage == "qc" and job.next_attempt_at is not None, job  # transient: retried
    assert "disk full writing " in job.error and "No space left" in job.error and str(out.path) in job.error, job.error
    st = svc.status()  # what a person sees meanwhile
    assert st["service"]["running"] is True
    late = time.time() - job.next_attempt_at
    assert any(e["job_id"] == job.id and "disk full" in e["error"] and e["retry_at"] for e in st["recent_errors"]), (
        f"recent_errors: {st['recent_errors']}"
        + (f"; `imageqc status` ended {late:.1f} s after the retry was due: raise {SLOWDOWN_ENV}" if late > 0 else "")
    )
    assert not _leftovers(out.path), f"half-written outputs left on the full disk: {_leftovers(out.path)}"
    out.free()
    svc.wait_for(lambda: any(j.chip == chip and j.state == "done" for j in svc.jobs()), 90, "the retry to succeed")
    assert svc.stop() == 0
    verify_exactly_once(svc, [chip], hpc=svc.root / "hpc")
    runs = sorted(p.name for p in out.path.iterdir())
    assert (
        len([r for r in runs if r.endswith(".tar.gz")]) == 1
        and len([r for r in runs if not r.endswith(".tar.gz")]) == 1
    ), runs


def test_a_full_share_fails_the_upload_transiently_and_it_resumes_once_space_returns(make_service, tmpfs, chip_images):
    svc = make_service(
        config_text(uploads=[hpc_target("share", max_attempts=2, retry_base_s=0.2, retry_max_s=0.5)]),
        folders=("inbox",),
    )
    share = tmpfs(svc.root / "share", "4m")
    share.fill(leave=256 * 1024)  # room for the archive, not for the 1.4 MB image
    svc.start()
    svc.wait_running()
    chip = serial(301)
    write_slowly(svc.root / "inbox" / f"{chip}.tif", chip_images[0])
    job = svc.wait_for(lambda: _failed(svc, chip), 90, "the upload to fail on the full share")
    assert job.failed_stage == "upload" and job.next_attempt_at is not None, job
    assert f"the share {share.path} is full" in job.error, job.error
    assert svc.status()["service"]["running"] is True
    share.free()
    svc.wait_for(lambda: any(j.chip == chip and j.state == "done" for j in svc.jobs()), 90, "the upload to finish")
    assert svc.stop() == 0
    share.filler.unlink(missing_ok=True)
    verify_exactly_once(svc, [chip], hpc=share.path)


def test_a_full_state_disk_stops_the_service_with_the_reason_and_a_restart_finishes_the_work(
    make_service, tmpfs, chip_images
):
    svc = make_service(config_text(uploads=[hpc_target()], output={"dir": "out"}), folders=("inbox", "hpc", "out"))
    state = tmpfs(svc.root / "state", "8m")
    svc.start()
    svc.wait_running()
    first = serial(302)
    write_slowly(svc.root / "inbox" / f"{first}.tif", chip_images[1])
    svc.wait_for(lambda: any(j.chip == first and j.state == "done" for j in svc.jobs()), 90, "the first set to be done")
    state.fill()
    chip = serial(303)
    write_slowly(svc.root / "inbox" / f"{chip}.tif", chip_images[0])
    svc.wait_for(lambda: not svc.alive(), 90, "the service to stop on the full state disk", may_exit=True)
    assert svc.proc.returncode == 1
    said = svc.output()
    assert "imageqc: the service stopped on an error: the disk holding the job database" in said, said[-2000:]
    assert f"Free space in {state.path}" in said, said[-2000:]
    assert "--- Logging error ---" not in said, said[-2000:]  # the full log disk is said once, not per line
    with svc.store() as s:  # nothing was lost: the first set is still done, the second still waits
        assert [j.state for j in s.list_jobs(newest_first=False)][:1] == ["done"]
    state.free()
    svc.start()
    svc.wait_running()
    svc.wait_for(lambda: sum(j.state == "done" for j in svc.jobs()) == 2, 90, "both sets done after the restart")
    assert svc.stop() == 0
    verify_exactly_once(svc, [first, chip], hpc=svc.root / "hpc")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler.bin")
