"""Soak: scan sets streamed in over time, QC'd and uploaded; all done exactly once, the service's memory flat.

A writer thread exports small generated chips one after another under new
chip serials (chunked writes, as a microscope export grows), at about the
rate the service can QC them; the service runs QC in worker children and
uploads every set to an hpc folder.

Memory criterion (the service process itself; QC children come and go):
after a warm-up (the first 10 % of the sets done), the samples are split in
quarters by time; the median RSS of the last quarter must be within +30 % of
the first quarter's median, and the thread and open-file counts of the last
quarter may not exceed the first quarter's largest by more than a few (a
leak of one per job would).

``IMAGEQC_SOAK_SETS`` sets the number of scan sets: the default is 100 (the
stream of issue #20; about 50 s on 2 cores, paced by the writer: the warm QC
worker runs job after job without a process start); the recorded run in
FAULT_MATRIX.md used 200; a smaller number makes a quick local run::

    IMAGEQC_SOAK_SETS=50 python -m pytest tests/faults/test_soak.py -s
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass

import psutil
import pytest

from tests.helpers import scaled

from .conftest import config_text, hpc_target, serial, verify_exactly_once, write_slowly

pytestmark = pytest.mark.soak

SETS = int(os.environ.get("IMAGEQC_SOAK_SETS", "100"))


@dataclass(frozen=True)
class Sample:
    t: float
    done: int
    rss: int
    threads: int
    fds: int


@pytest.mark.timeout(120 + 4 * SETS)
def test_sets_streamed_in_over_time_are_all_done_once_and_memory_stays_flat(make_service, chip_images):
    svc = make_service(config_text(uploads=[hpc_target()]))
    inbox = svc.root / "inbox"
    chips = [serial(1000 + i) for i in range(SETS)]
    images = chip_images[:3]  # the 1200 px ones: a different serial makes a different fingerprint
    samples: list[Sample] = []
    stop = threading.Event()
    done = [0]

    def writer() -> None:
        for i, chip in enumerate(chips):
            write_slowly(inbox / f"{chip}.tif", images[i % len(images)], chunk=256 * 1024, pause=0.01, stop=stop)
            if stop.wait(0.4):
                return

    def sampler() -> None:
        proc = psutil.Process(svc.pid)
        while not stop.wait(0.5):
            try:
                samples.append(
                    Sample(time.monotonic(), done[0], proc.memory_info().rss, proc.num_threads(), proc.num_fds())
                )
            except psutil.Error:
                return

    svc.start()
    svc.wait_running()
    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for t in threads:
        t.start()
    try:

        def all_done() -> bool:
            done[0] = svc.read(lambda s: s.counts()["done"]) or 0
            return done[0] >= SETS

        svc.wait_for(all_done, 60 + 4 * SETS, f"all {SETS} sets done", every=0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(scaled(30))
    assert svc.stop() == 0
    verify_exactly_once(svc, chips, hpc=svc.root / "hpc")

    warm = [s for s in samples if s.done >= max(3, SETS // 10)]
    assert len(warm) >= 8, f"too few samples after warm-up: {len(warm)} of {len(samples)}"
    q = len(warm) // 4
    first, last = warm[:q], warm[-q:]
    med_first, med_last = statistics.median(s.rss for s in first), statistics.median(s.rss for s in last)
    summary = (
        f"{SETS} sets in {samples[-1].t - samples[0].t:.0f} s; service RSS median {med_first / 2**20:.0f} MB (first quarter) -> "
        f"{med_last / 2**20:.0f} MB (last quarter), peak {max(s.rss for s in samples) / 2**20:.0f} MB; threads "
        f"{max(s.threads for s in first)} -> {max(s.threads for s in last)}; fds {max(s.fds for s in first)} -> {max(s.fds for s in last)}"
    )
    print("\nsoak:", summary)
    (svc.root / "soak-samples.csv").write_text(
        "t_s,done,rss_bytes,threads,fds\n"
        + "".join(f"{s.t - samples[0].t:.1f},{s.done},{s.rss},{s.threads},{s.fds}\n" for s in samples)
    )
    assert med_last <= 1.3 * med_first, summary
    assert max(s.threads for s in last) <= max(s.threads for s in first) + 4, summary
    assert max(s.fds for s in last) <= max(s.fds for s in first) + 8, summary
