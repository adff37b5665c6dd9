"""SIGKILL at random moments during discovery, QC and upload, restart: nothing is lost or done twice.

Scan sets stream into the inbox (chunked writes, as an export grows) while the
service is killed with SIGKILL several times, at seeded random moments inside
a chosen phase, and started again. A kill lands in a phase by polling the job
database until the phase is under way (a set settling, a job ``running``, a
job ``uploading``), then waiting a random fraction of a second. Uploads go to
an hpc folder and to moto's S3 server, both throttled so transfers are in
flight when the kill comes.

The end check (:func:`~tests.faults.conftest.verify_exactly_once`): one
``done`` job per set, every file once per target with the source's SHA-256,
no partial file, no open multipart upload; the microscope's files unchanged.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass

import psutil
import pytest

from tests.daemon.upload.conftest import new_bucket
from tests.helpers import scaled, wait_until

from .conftest import (
    Service,
    config_text,
    hpc_target,
    s3_target,
    serial,
    sha256_file,
    verify_exactly_once,
    write_slowly,
)

pytestmark = pytest.mark.soak

SEED = 8042
PHASES = ("discovery", "qc", "upload")
MIN_SETS, MAX_SETS = 6, 40


def phases(svc: Service) -> set[str]:
    """What the service is doing now, from its database: sets settling, QC running, uploads in flight."""

    def read(s) -> set[str]:
        jobs = s.list_jobs()
        states = {j.state for j in jobs}
        out = set()
        if "running" in states:
            out.add("qc")
        if "uploading" in states:
            out.add("upload")
        _members, sets = s.discovery_load()
        queued = {j.chip for j in jobs}
        if any(row["chip"] not in queued for row in sets):
            out.add("discovery")
        return out

    return svc.read(read) or set()


@dataclass
class Kill:
    wanted: str
    hit: set[str]
    orphans: int
    at_s: float


def test_sigkill_at_random_moments_every_set_ends_done_exactly_once(make_service, chip_images, s3_server):
    rng = random.Random(SEED)
    bucket = new_bucket(s3_server)
    svc = make_service(
        config_text(
            uploads=[
                hpc_target(bandwidth_limit="4MB/s", concurrency=2),
                s3_target(s3_server.endpoint, bucket, bandwidth_limit="4MB/s", concurrency=2),
            ]
        )
    )
    inbox = svc.root / "inbox"
    written: dict[str, bytes] = {}
    stop = threading.Event()
    writer_rng = random.Random(SEED + 1)

    def writer() -> None:  # streams sets in until the kills are over (at least MIN_SETS), so there is always work
        for i in range(MAX_SETS):
            if stop.is_set() and i >= MIN_SETS:
                return
            chip, data = serial(100 + i), chip_images[i % len(chip_images)]
            written[chip] = data
            write_slowly(inbox / f"{chip}.tif", data, chunk=64 * 1024, pause=0.02)
            stop.wait(writer_rng.uniform(0.3, 1.5))

    plan = [*PHASES, *(rng.choice(PHASES) for _ in range(2))]
    rng.shuffle(plan)
    t0 = time.monotonic()
    thread = threading.Thread(target=writer, name="export-writer", daemon=True)
    svc.start()
    thread.start()
    kills: list[Kill] = []
    term_hit: set[str] = set()
    try:
        for wanted in plan:
            svc.wait_running()
            svc.wait_for(lambda w=wanted: w in phases(svc), 90, f"a moment during {wanted}", every=0.02)
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment in the phase (the test's seed), not a wait
            hit = phases(svc)
            orphans = svc.kill()
            kills.append(Kill(wanted, hit, len(orphans), round(time.monotonic() - t0, 1)))
            # a QC child of the killed service notices its parent is gone and exits by itself
            wait_until(
                lambda o=orphans: not any(_running(p) for p in o),
                "the QC children of the killed service to exit by themselves",
                timeout=30,
                every=0.1,
                seen=lambda o=orphans: [p for p in o if _running(p)],
            )
            time.sleep(rng.uniform(0.0, 1.0))  # down for a random moment while files keep arriving, not a wait
            svc.start()
        # and one clean stop (SIGTERM) while work is under way: running QC goes back to the queue,
        # transfers save their state; exit code 0
        svc.wait_running()
        svc.wait_for(lambda: phases(svc) & {"qc", "upload"}, 90, "QC or an upload under way", every=0.02)
        term_hit = phases(svc)
        assert svc.stop() == 0
        svc.start()
        stop.set()
        thread.join(scaled(120))
        assert not thread.is_alive()
        chips = sorted(written)
        svc.wait_running()
        svc.wait_for(
            lambda: sum(j.state == "done" for j in svc.jobs()) >= len(chips), 180, f"all {len(chips)} sets done"
        )
        assert svc.stop() == 0
    finally:
        stop.set()
    report = "\n".join(
        f"  kill {n + 1} at {k.at_s:5.1f} s: wanted {k.wanted:9s} hit {sorted(k.hit)} ({k.orphans} QC child(ren) left)"
        for n, k in enumerate(kills)
    )
    report += f"\n  SIGTERM during {sorted(term_hit)}: exit 0"
    print(f"\nSIGKILL matrix (seed {SEED}):\n{report}")
    hits = set().union(*(k.hit for k in kills))
    assert {"qc", "upload", "discovery"} <= hits, f"phases hit: {sorted(hits)}\n{report}"
    v = verify_exactly_once(svc, chips, hpc=svc.root / "hpc", s3=(s3_server.client(), bucket))
    print(f"  {len(chips)} sets, {v.jobs} jobs, files verified {v.files}, {v.present} already present after a kill")
    assert v.files["hpc"] == v.files["s3"] == 3 * len(chips)  # image, archive, report.json per set and target
    for chip, data in written.items():  # the microscope's files are untouched
        assert sha256_file(inbox / f"{chip}.tif") == _sha(data)
    events = [e["event"] for e in svc.log()]
    assert "recovered jobs left by a previous run" in events
    # QC children killed mid-write leave hidden partial outputs; the restarted service removes them
    hidden = sorted(p.name for p in (svc.root / "state" / "outputs").iterdir() if p.name.startswith("."))
    assert hidden == [], f"half-written outputs left behind: {hidden}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
