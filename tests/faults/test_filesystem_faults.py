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
import os
import sys
import threading
from pathlib import Path

import pytest

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
    svc.wait_for(lambda: svc.read(lambda s: s.get_status()["service"][0]["components"]["discovery"]["roots"][0]["last_rescan"]),
                 60, "a rescan after the restart")
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
        "open_regular": lambda: open_regular(fifo), "detect_format": lambda: detect_format(fifo),
        "open_image": lambda: open_image(fifo), "check_tiff_whole": lambda: check_tiff_whole(fifo),
        "check_czi_whole": lambda: check_czi_whole(czi),
    }
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        for name, call in calls.items():
            try:
                call()
                outcome[name] = None
            except BaseException as e:  # noqa: BLE001 - recorded for the assertions below
                outcome[name] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():
        for f in (fifo, czi):  # a writer's open lets a blocked reader go, so the test process can end
            with contextlib.suppress(OSError):
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"a reader blocked opening the FIFO; finished: {sorted(outcome)}")
    for name in calls:
        e = outcome[name]
        assert isinstance(e, NotRegularFileError), (name, e)
        assert "not a regular file (a FIFO (named pipe))" in str(e) and "Only regular files are read" in str(e), str(e)
    assert _nobody_reads(fifo) and _nobody_reads(czi)


# -- case 10: names that are not valid UTF-8 --------------------------------------------------


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the file system must accept any bytes in a name (Linux)")
def test_a_folder_named_in_another_encoding_is_qcd_uploaded_and_shown_escaped(make_service, chip_images):
    svc = make_service(config_text(uploads=[hpc_target()]))
    folder = Path(os.fsdecode(os.fsencode(svc.root / "inbox") + b"/Lauf \xff 2024"))  # Latin-1 'y' from another code page
    folder.mkdir()
    (folder / f"{serial(2)}.tif").write_bytes(chip_images[0])
    svc.start()
    svc.wait_running()
    (svc.root / "inbox" / f"{serial(3)}.tif").write_bytes(chip_images[1])  # and an ordinary set after it
    svc.wait_for(lambda: sorted(j.chip for j in svc.jobs() if j.state == "done") == [serial(2), serial(3)], 180, "both sets done")
    verify_exactly_once(svc, [serial(2), serial(3)], hpc=svc.root / "hpc")
    log = svc.log()
    assert not [e for e in log if e.get("level") in ("error", "critical")], [e for e in log if e.get("level") == "error"][:3]
    found = [e for e in log if e.get("event") == "scan set found" and e.get("chip") == serial(2)]
    assert found and found[0]["folder"].endswith("/inbox/Lauf \\xff 2024"), found  # escaped, readable
    with svc.store() as s:
        (member,) = s.get_scan_set(svc.jobs()[0].scan_set_id).members
        assert member["path"] == str(folder / f"{serial(2)}.tif")  # stored losslessly: the path opens
    st = svc.cli("status")
    assert st.returncode == 0 and serial(2) in st.stdout, st.stdout + st.stderr
    show = svc.cli("show", str(svc.jobs()[0].id))
    assert show.returncode == 0 and f"Lauf \\xff 2024/{serial(2)}.tif" in show.stdout, show.stdout + show.stderr
    assert svc.stop() == 0
    svc.start()  # the discovery state saved with that name loads again
    svc.wait_running()
    svc.wait_for(lambda: svc.read(lambda s: s.get_status()["service"][0]["components"]["discovery"]["roots"][0]["last_rescan"]),
                 60, "a rescan after the restart")
    assert sorted(j.chip for j in svc.jobs()) == [serial(2), serial(3)]
    assert not [e for e in svc.log() if e.get("level") in ("error", "critical")]
    assert svc.stop() == 0


def test_upload_keys_carry_bytes_that_are_not_utf8_as_percent_escapes():
    from daemon.upload.policy import render_key

    name = os.fsdecode(b"img_0000_0001_\xe4.tif")  # a tile named in Latin-1 inside a tile folder
    assert render_key("{prefix}/{chip}/{name}", prefix="p", chip="A02677B5", name=f"A02677B5/{name}") == (
        "p/A02677B5/A02677B5/img_0000_0001_%E4.tif"
    )
