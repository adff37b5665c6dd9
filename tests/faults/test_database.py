"""A locked or corrupt job database: ``imageqc run`` refuses to run, exit 1, one clear line, nothing touched.

End to end through the command a service manager starts. The state folder
is a real one (the service ran and stopped cleanly); then another program
holds an exclusive transaction on the database, or the file is damaged. After
the lock is released the same state folder runs again.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from tests.daemon.test_store import damage_pages
from tests.helpers import scaled, wait_until

from .conftest import config_text, sha256_file

pytestmark = pytest.mark.soak

LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
conn.execute("ROLLBACK")
"""


def _state_folder(make_service):
    svc = make_service(config_text())
    svc.start()
    svc.wait_running()
    assert svc.stop() == 0
    # an `imageqc status` reading while the service closed keeps SQLite's -wal file from being
    # removed; the last connection to close folds it in, so the damage below hits the whole database
    wal = svc.db.with_name(svc.db.name + "-wal")

    def folded() -> bool:  # a QC child or reader still exiting keeps it a little longer on a busy machine
        conn = sqlite3.connect(svc.db, timeout=scaled(5))
        try:  # fold every page into the database and empty the WAL (an empty -wal file is ignored by SQLite)
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
        return busy == 0 and (not wal.exists() or wal.stat().st_size == 0)

    wait_until(folded, f"{wal} to be folded into the database after the service stopped", timeout=120, every=0.5)
    return svc


def _refused(svc) -> str:
    svc.start()
    assert svc.wait_exit(180, "the service to refuse the database and exit") == 1, svc.doing()
    out = svc.output()
    assert "Traceback" not in out, out
    return out


def test_a_database_locked_by_another_program_is_refused_and_left_as_it_was(make_service):
    svc = _state_folder(make_service)
    before = sha256_file(svc.db)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(svc.db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        out = _refused(svc)  # waits out the store's busy timeout, then gives up
        assert f"imageqc: the job database {svc.db} is locked by another program" in out, out
        assert "stop the other imageqc instance or the program holding it, then start again" in out
        assert sha256_file(svc.db) == before
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(scaled(30))
    svc.start()  # the other program let go: the same state runs again
    svc.wait_running()
    assert svc.stop() == 0


@pytest.mark.parametrize("damage", ["not a database", "damaged pages"])
def test_a_corrupt_database_is_refused_and_never_modified(make_service, damage):
    svc = _state_folder(make_service)
    if damage == "not a database":
        svc.db.write_bytes(b"imageqc fault test: this is not SQLite\n" * 500)
    else:
        damage_pages(svc.db)  # the header still reads; the tables do not
    before = svc.db.read_bytes()
    out = _refused(svc)
    assert "imageqc: the job database" in out and "imageqc will not run on it, to avoid losing state" in out, out
    assert "Move it aside" in out
    assert svc.db.read_bytes() == before
    st = svc.status()  # `imageqc status` says why, instead of crashing
    assert st["service"]["running"] is False and str(svc.db) in st["service"]["reason"]
    jobs = svc.cli("jobs")
    assert (
        jobs.returncode == 1 and jobs.stderr.startswith("imageqc: the job database") and "Traceback" not in jobs.stderr
    )
    assert svc.db.read_bytes() == before


def test_a_ruined_database_beside_a_stale_wal_is_refused_not_rebuilt_from_the_wal(make_service):
    """After a kill -9 the -wal file stays; SQLite would read it in place of a ruined database file."""
    svc = make_service(config_text())
    svc.start()
    svc.wait_running()
    svc.kill()
    assert svc.db.with_name(svc.db.name + "-wal").exists()
    svc.db.write_bytes(b"imageqc fault test: this is not SQLite\n" * 500)
    before = svc.db.read_bytes()
    out = _refused(svc)
    assert "is damaged (file is not a database)" in out and "Move it aside" in out, out
    assert svc.db.read_bytes() == before
