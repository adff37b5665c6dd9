"""The state guard's parts on real files: identities, the saved copy and its restore (issue #20 cases 5 and 6)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from daemon.stateguard import (
    DatabaseLost,
    LockLost,
    StateGuard,
    live_service,
    restore_saved_copy,
    saved_copy_name,
)
from daemon.store import Store
from tests.helpers import dead_pid


@pytest.fixture
def state(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    db, lock = folder / "imageqc.sqlite3", folder / "service.lock"
    Store(db).close()
    lock.touch()
    return db, lock


def test_the_guard_passes_while_nothing_changes_and_names_what_was_deleted_or_replaced(state):
    db, lock = state
    guard = StateGuard(db, lock, by_presence_only=False)
    guard.check()
    with lock.open("rb"):  # held open, as the service holds its lock (so its inode number is not reused)
        lock.unlink()
        with pytest.raises(LockLost) as lost:
            guard.check()
        assert (lost.value.path, lost.value.how) == (lock, "deleted")
        lock.write_text("another service's lock")  # a new file at the same path
        with pytest.raises(LockLost) as lost:
            guard.check()
        assert lost.value.how == "replaced"


def test_a_replaced_database_is_seen_by_identity_and_a_deleted_folder_first(state, tmp_path):
    db, lock = state
    guard = StateGuard(db, lock, by_presence_only=False)
    other = tmp_path / "other.sqlite3"
    Store(other).close()
    with db.open("rb"):  # held open, as the service's connection holds it
        os.replace(other, db)
        with pytest.raises(DatabaseLost) as lost:
            guard.check()
    assert (lost.value.path, lost.value.how) == (db, "replaced")
    assert "move the new one aside" in lost.value.explain(db, saved_copy_name(db))
    presence = StateGuard(db, lock, by_presence_only=True)  # network shares: presence only
    presence.check()
    db.parent.rename(tmp_path / "moved")
    with pytest.raises(DatabaseLost) as lost:
        presence.check()
    assert lost.value.path == db.parent and "the state folder" in lost.value.explain(db, None)


def test_the_newest_saved_copy_is_restored_and_files_of_the_deleted_database_are_moved_aside(state):
    db, _lock = state
    with Store(db) as s:
        s.set_status("marker", "kept")
        older, newer = saved_copy_name(db, time.time() - 3600), saved_copy_name(db)
        s.save_copy(older)
        s.set_status("marker", "newest")
        s.save_copy(newer)
    assert restore_saved_copy(db) is None  # a database is there: nothing is touched
    db.unlink()
    stale = db.with_name(db.name + "-wal")
    stale.write_bytes(b"frames of the deleted file")
    assert restore_saved_copy(db) == newer
    assert not stale.exists() and newer.with_name(newer.name + "-wal.stale").exists() and older.exists()
    with Store(db, create=False) as s:
        assert s.get_status()["marker"][0] == "newest"


def test_a_missing_database_is_not_created_without_create(tmp_path):
    from daemon.errors import DatabaseUnavailable

    path = tmp_path / "state" / "imageqc.sqlite3"
    with pytest.raises(DatabaseUnavailable, match=r"is missing .* it is not created here"):
        Store(path, create=False)
    assert not path.parent.exists()


def test_a_heartbeat_names_a_live_service_only_while_it_is_recent_and_its_process_runs():
    now = time.time()
    me = {"state": "running", "host": socket.gethostname(), "pid": os.getpid()}
    assert live_service(me, now - 1, now=now, age_limit=15)
    assert not live_service(me, now - 60, now=now, age_limit=15)
    assert not live_service({**me, "state": "stopped"}, now - 1, now=now, age_limit=15)
    assert not live_service({**me, "pid": dead_pid()}, now - 1, now=now, age_limit=15)
    assert live_service({**me, "host": "another-pc", "pid": dead_pid()}, now - 1, now=now, age_limit=15)
