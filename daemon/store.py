"""The SQLite job store: schema, migrations, the job state machine, leases.

One connection per :class:`Store` (one per process), guarded by a lock for the
service's threads. Every write runs in ``BEGIN IMMEDIATE`` so two processes
never interleave a read-modify-write; claims are one ``UPDATE ... RETURNING``.
WAL is used on local disks and a rollback journal on network file systems,
where WAL's shared memory does not work.

Time is passed in (``now``, seconds since the epoch) so tests need no clock
patching; it defaults to :func:`time.time`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from daemon.errors import DatabaseUnavailable, IllegalTransition, JobNotFound, StoreError
from daemon.fsinfo import is_network_path
from daemon.naming import loaded_name, shown_name, stored_name

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TERMINAL",
    "TRANSITIONS",
    "Event",
    "Job",
    "JobState",
    "OutboxRow",
    "OutboxState",
    "ScanSetRow",
    "Store",
    "UploadRow",
    "UploadState",
]


class JobState(str, Enum):
    """The job states of ARCHITECTURE.md."""

    SETTLING = "settling"
    QUEUED = "queued"
    RUNNING = "running"
    QC_DONE = "qc_done"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    SUPERSEDED = "superseded"

    def __str__(self) -> str:
        return self.value


class UploadState(str, Enum):
    """States of one upload record (a file for a target)."""

    PENDING = "pending"  # planned, or interrupted with its resumable state saved
    ACTIVE = "active"  # being sent
    DONE = "done"  # uploaded and verified
    PRESENT = "present"  # the same object was already stored; nothing sent
    RETRY = "retry"  # a transient error; retried with the job
    FAILED = "failed"  # a permanent error; retried only by hand
    CHANGED = "changed"  # the input changed since QC; never sent

    def __str__(self) -> str:
        return self.value


#: Upload records that need no more work.
UPLOAD_FINISHED = frozenset({UploadState.DONE, UploadState.PRESENT})

S = JobState
#: Legal moves. ``failed`` goes back to where the work stopped: ``queued`` for
#: discovery/QC failures, ``qc_done`` for upload failures.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.SETTLING: frozenset({S.QUEUED, S.FAILED, S.SUPERSEDED}),
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.SUPERSEDED}),
    S.RUNNING: frozenset({S.QC_DONE, S.QUEUED, S.FAILED, S.SUPERSEDED}),
    S.QC_DONE: frozenset({S.UPLOADING, S.DONE, S.SKIPPED, S.FAILED, S.SUPERSEDED, S.QUEUED}),
    S.UPLOADING: frozenset({S.DONE, S.QC_DONE, S.FAILED, S.SUPERSEDED, S.QUEUED}),
    S.FAILED: frozenset({S.QUEUED, S.QC_DONE, S.SUPERSEDED}),
    S.SKIPPED: frozenset({S.QC_DONE, S.QUEUED, S.SUPERSEDED}),
    S.DONE: frozenset(),
    S.SUPERSEDED: frozenset(),
}
#: States a job never leaves on its own.
TERMINAL = frozenset({S.DONE, S.SKIPPED, S.SUPERSEDED})
#: States that hold a lease.
LEASED = frozenset({S.RUNNING, S.UPLOADING})


# ---------------------------------------------------------------------------
# Schema. Append migrations; never edit one that has shipped.
# ---------------------------------------------------------------------------

MIGRATIONS: tuple[str, ...] = (
    # 1: scan sets, jobs, their history and QC results
    """
    CREATE TABLE IF NOT EXISTS scan_sets (
        id          INTEGER PRIMARY KEY,
        chip        TEXT NOT NULL,
        root        TEXT NOT NULL,
        fingerprint TEXT NOT NULL UNIQUE,
        members     TEXT NOT NULL,
        first_seen  REAL NOT NULL,
        last_seen   REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS scan_sets_chip ON scan_sets(chip);
    CREATE TABLE IF NOT EXISTS jobs (
        id              INTEGER PRIMARY KEY,
        scan_set_id     INTEGER NOT NULL REFERENCES scan_sets(id),
        chip            TEXT NOT NULL,
        fingerprint     TEXT NOT NULL UNIQUE,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        lease_owner     TEXT,
        lease_expires   REAL,
        error           TEXT,
        failed_stage    TEXT,
        stage           TEXT,
        progress        REAL,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        queued_at       REAL,
        started_at      REAL,
        finished_at     REAL
    );
    CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
    CREATE INDEX IF NOT EXISTS jobs_chip ON jobs(chip);
    CREATE TABLE IF NOT EXISTS events (
        id         INTEGER PRIMARY KEY,
        job_id     INTEGER REFERENCES jobs(id),
        at         REAL NOT NULL,
        kind       TEXT NOT NULL,
        from_state TEXT,
        to_state   TEXT,
        message    TEXT,
        data       TEXT
    );
    CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
    CREATE TABLE IF NOT EXISTS qc_results (
        job_id     INTEGER PRIMARY KEY REFERENCES jobs(id),
        verdict    TEXT NOT NULL,
        report     TEXT NOT NULL,
        output_dir TEXT,
        archive    TEXT,
        created_at REAL NOT NULL
    );
    """,
    # 2: upload records, the key-value table (FOV-pair cache) and service status
    """
    CREATE TABLE IF NOT EXISTS uploads (
        id          INTEGER PRIMARY KEY,
        job_id      INTEGER NOT NULL REFERENCES jobs(id),
        target      TEXT NOT NULL,
        kind        TEXT NOT NULL,
        local_path  TEXT NOT NULL,
        remote_key  TEXT NOT NULL,
        size        INTEGER,
        mtime_ns    INTEGER,
        sha256      TEXT,
        state       TEXT NOT NULL DEFAULT 'pending',
        bytes_done  INTEGER NOT NULL DEFAULT 0,
        upload_id   TEXT,
        parts       TEXT,
        checksum    TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        error       TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        UNIQUE (job_id, target, local_path)
    );
    CREATE INDEX IF NOT EXISTS uploads_state ON uploads(target, state);
    CREATE TABLE IF NOT EXISTS kv (
        namespace  TEXT NOT NULL,
        key        TEXT NOT NULL,
        value      BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS service_status (
        key        TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 3: discovery state (members being watched, their scan sets, names reported once)
    """
    CREATE TABLE IF NOT EXISTS discovery_members (
        path        TEXT PRIMARY KEY,
        root        TEXT NOT NULL,
        set_key     TEXT NOT NULL,
        name        TEXT NOT NULL,
        chip        TEXT NOT NULL,
        format      TEXT NOT NULL,
        role        TEXT NOT NULL,
        stain       TEXT,
        size        INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        files       INTEGER NOT NULL,
        sig         TEXT NOT NULL,
        first_seen  REAL NOT NULL,
        last_change REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS discovery_members_set ON discovery_members(set_key);
    CREATE TABLE IF NOT EXISTS discovery_sets (
        set_key        TEXT PRIMARY KEY,
        root           TEXT NOT NULL,
        chip           TEXT NOT NULL,
        folder         TEXT NOT NULL,
        first_seen     REAL NOT NULL,
        last_change    REAL NOT NULL,
        settling_since REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS discovery_notes (
        key  TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        at   REAL NOT NULL
    );
    """,
    # 4: the notification outbox (daemon/notify.py): one row per (event, key), key 'job:<id>...' for job events
    """
    CREATE TABLE IF NOT EXISTS outbox (
        id              INTEGER PRIMARY KEY,
        event           TEXT NOT NULL,
        key             TEXT NOT NULL,
        job_id          INTEGER REFERENCES jobs(id),
        title           TEXT NOT NULL,
        body            TEXT NOT NULL,
        attach          TEXT,
        state           TEXT NOT NULL DEFAULT 'pending',
        delivered       TEXT NOT NULL DEFAULT '[]',
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        error           TEXT,
        error_at        REAL,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        sent_at         REAL,
        UNIQUE (event, key)
    );
    CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
    """,
    # 5: what QC read: path -> {size, mtime_ns, sha256} of every input (JSON), re-verified before upload
    """
    ALTER TABLE qc_results ADD COLUMN inputs TEXT;
    """,
    # 6: the newest verdicts (status, follow, the status page) without sorting every result
    """
    CREATE INDEX IF NOT EXISTS qc_results_created ON qc_results(created_at);
    """,
    # 7: since when a job's verdict stands: QC run again on the same inputs with the same verdict (say, after its
    # archive failed) keeps it, so `follow` and the status do not show it as new
    """
    ALTER TABLE qc_results ADD COLUMN verdict_at REAL;
    UPDATE qc_results SET verdict_at = created_at;
    CREATE INDEX IF NOT EXISTS qc_results_verdict_at ON qc_results(verdict_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


# ---------------------------------------------------------------------------
# Row types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    id: int
    scan_set_id: int
    chip: str
    fingerprint: str
    state: str
    attempts: int
    next_attempt_at: float | None
    lease_owner: str | None
    lease_expires: float | None
    error: str | None
    failed_stage: str | None
    stage: str | None
    progress: float | None
    created_at: float
    updated_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Event:
    id: int
    job_id: int | None
    at: float
    kind: str
    from_state: str | None
    to_state: str | None
    message: str | None
    data: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ScanSetRow:
    id: int
    chip: str
    root: str
    fingerprint: str
    members: list[dict[str, Any]]
    first_seen: float
    last_seen: float


class OutboxState(str, Enum):
    """States of one notification in the outbox."""

    PENDING = "pending"  # not yet delivered to every endpoint of the rules that take it
    SENT = "sent"  # delivered everywhere
    EXPIRED = "expired"  # given up after notify.expire_after_s

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class OutboxRow:
    """One notification; ``delivered`` lists the endpoints (``rule[i]``) that have it already."""

    id: int
    event: str
    key: str
    job_id: int | None
    title: str
    body: str
    attach: str | None
    state: str
    delivered: list[str]
    attempts: int
    next_attempt_at: float | None
    error: str | None
    error_at: float | None
    created_at: float
    updated_at: float
    sent_at: float | None


def _outbox(row: sqlite3.Row) -> OutboxRow:
    d = dict(row)
    d["delivered"] = json.loads(d["delivered"] or "[]")
    return OutboxRow(**d)


@dataclass(frozen=True)
class UploadRow:
    """One file for one target; ``parts`` is the uploader's resumable state and the file's digests."""

    id: int
    job_id: int
    target: str
    kind: str
    local_path: str
    remote_key: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    state: str
    bytes_done: int
    upload_id: str | None
    parts: dict[str, Any] | None
    checksum: str | None
    attempts: int
    error: str | None
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _upload(row: sqlite3.Row) -> UploadRow:
    d = dict(row)
    d["local_path"] = loaded_name(d["local_path"])
    d["parts"] = json.loads(d["parts"]) if d["parts"] else None
    return UploadRow(**d)


_UPLOAD_COLUMNS = frozenset(
    {"state", "bytes_done", "upload_id", "parts", "checksum", "attempts", "error", "sha256", "size", "mtime_ns"}
)


#: Words of SQLite errors that mean the database itself is unusable (damaged, locked, full), not a bad query.
_UNAVAILABLE_WORDS = ("malformed", "not a database", "corrupt", "locked", "busy", "full", "disk i/o")


def _job(row: sqlite3.Row | None) -> Job | None:
    if row is None:
        return None
    names = row.keys()  # a sqlite3.Row iterates over its values, not its names
    fields: dict[str, Any] = {k: loaded_name(row[k]) if k == "chip" else row[k] for k in names}
    return Job(**fields)


def _stored(name: str | None) -> str | bytes | None:
    return None if name is None else stored_name(name)


def _shown(text: str | None) -> str | None:
    """Messages and errors are for people: a name that is not UTF-8 appears escaped (``\\xNN``)."""
    return None if text is None else shown_name(text)


def _now(now: float | None) -> float:
    """``now``, or the wall clock; a time that is not a finite number is refused (it would be stored for good)."""
    if now is None:
        return time.time()
    if not math.isfinite(now):
        msg = f"a job database time must be a finite number of seconds, not {now!r}"
        raise ValueError(msg)
    return now


def _first_reason(report_json: str) -> str:
    """The first reason of a stored QC report ('' when it has none)."""
    reasons = json.loads(report_json).get("reasons") or [""]
    return str(reasons[0])


_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_database_file(path: Path) -> None:
    """Refuse a job database that is not SQLite before SQLite opens it.

    A stale ``-wal`` file beside a ruined database would otherwise be read in
    its place (and checkpointed into it). Call this only where no connection
    to ``path`` is open in this process (service start): on POSIX, closing any
    descriptor of a file drops the process's locks on it.

    Raises
    ------
    DatabaseUnavailable
        With the 'damaged' advice.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError:
        return  # missing (SQLite creates it) or unreadable (SQLite says why)
    if head and head != _SQLITE_MAGIC:
        msg = (
            f"the job database {path} is damaged (file is not a database); imageqc will not run on it, to avoid "
            "losing state. Move it aside (keep it for inspection) and start again: scan sets are rediscovered"
        )
        raise DatabaseUnavailable(msg)


class Store:
    """The job database.

    Parameters
    ----------
    path : path-like
        The SQLite file; its folder is created.
    journal : {"auto", "wal", "delete"}
        ``auto`` uses WAL unless the file sits on a network file system.
    busy_timeout_s : float
        How long a write waits for another process's transaction.
    readonly : bool
        Open for reading only (``imageqc status``): nothing is created, migrated or locked.
    create : bool
        Create the file (and its folder) when missing. Only the service does; QC children and
        commands pass False, so a database deleted under the service is never replaced by an empty one.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        journal: str = "auto",
        busy_timeout_s: float = 10.0,
        readonly: bool = False,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self.readonly = readonly
        if readonly:
            self._open_readonly(busy_timeout_s)
            return
        if create:
            self._refuse_beside_a_saved_copy()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                msg = f"cannot create the state folder {self.path.parent}: {e}; check the path and permissions of state_dir"
                raise DatabaseUnavailable(msg) from None
        elif not self.path.is_file():
            raise DatabaseUnavailable(self._missing())
        if journal == "auto":
            journal = "delete" if is_network_path(self.path.parent) else "wal"
        self.journal = journal
        try:
            # without create, SQLite's mode=rw: a file deleted after the check above is an error, not a new file
            target, uri = (str(self.path), False) if create else (f"{self.path.resolve().as_uri()}?mode=rw", True)
            self._conn = sqlite3.connect(
                target, uri=uri, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = self._conn.execute(f"PRAGMA journal_mode = {journal}").fetchone()[0]
            self.journal = str(mode).lower()
            self._conn.execute("PRAGMA synchronous = NORMAL" if self.journal == "wal" else "PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            if not create and not self.path.exists():
                raise DatabaseUnavailable(self._missing()) from None
            self._raise_unavailable(e)

    def _refuse_beside_a_saved_copy(self) -> None:
        """A missing database with a copy the service saved when it was deleted: only the service's start
        puts the copy back; a new, empty database here would hide it."""
        if self.path.exists():
            return
        from daemon.stateguard import saved_copies

        copies = saved_copies(self.path)
        if copies:
            msg = (
                f"the job database {self.path} is missing; the service saved what it held as {copies[-1]} when it "
                "was deleted: start the service (`imageqc run`) to resume from that copy"
            )
            raise DatabaseUnavailable(msg)

    def _missing(self) -> str:
        return (
            f"the job database {self.path} is missing (deleted or moved?); it is not created here, only the "
            "service creates it: start the service (`imageqc run`), which resumes from a copy it saved if any"
        )

    def _open_readonly(self, busy_timeout_s: float) -> None:
        """For `imageqc status` and friends: never creates, migrates or locks anything."""
        if not self.path.exists():
            self._refuse_beside_a_saved_copy()
            msg = f"never run with this state folder (no {self.path.name} in {self.path.parent})"
            raise DatabaseUnavailable(msg)
        try:
            self._conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            self._raise_unavailable(e)
        self.journal = "readonly"
        if version != SCHEMA_VERSION:
            msg = (
                f"the job database {self.path} has schema version {version}, this imageqc expects {SCHEMA_VERSION}; "
                "start the service once (it migrates the database) or use the matching imageqc version"
            )
            raise DatabaseUnavailable(msg)

    # -- plumbing ---------------------------------------------------------

    def _raise_unavailable(self, e: sqlite3.Error) -> None:
        text = str(e)
        if "locked" in text or "busy" in text:
            msg = (
                f"the job database {self.path} is locked by another program ({text}); "
                "stop the other imageqc instance or the program holding it, then start again"
            )
        elif "full" in text:
            msg = (
                f"the disk holding the job database {self.path} is full ({text}); the last change was rolled back. "
                f"Free space in {self.path.parent}, then start imageqc again: it resumes where it stopped"
            )
        elif "not a database" in text or "malformed" in text or "corrupt" in text:
            msg = (
                f"the job database {self.path} is damaged ({text}); imageqc will not run on it, to avoid losing "
                "state. Move it aside (keep it for inspection) and start again: scan sets are rediscovered"
            )
        else:
            msg = f"the job database {self.path} failed: {text}; check the disk and the state folder"
        raise DatabaseUnavailable(msg) from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def save_copy(self, dest: Path) -> None:
        """Write a consistent copy of the database as this connection sees it to ``dest`` (SQLite's
        backup API): what the service still holds of a database file deleted under it."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        with self._lock:
            out = sqlite3.connect(str(partial))
            try:
                self._conn.backup(out)
            finally:
                out.close()
        partial.replace(dest)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def db(self, commit: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction: ``BEGIN IMMEDIATE`` for writes, plain reads otherwise."""
        with self._lock:
            conn = self._conn
            if not commit:
                try:
                    yield conn
                except sqlite3.DatabaseError as e:
                    if isinstance(e, sqlite3.IntegrityError) or not any(
                        w in str(e).lower() for w in _UNAVAILABLE_WORDS
                    ):
                        raise
                    self._raise_unavailable(e)  # a damaged, locked or full database, met while reading
                return
            if self.readonly:
                raise StoreError(f"{self.path} is open read-only")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                self._raise_unavailable(e)
            try:
                yield conn
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error) and not isinstance(e, sqlite3.IntegrityError):
                    self._raise_unavailable(e)
                raise
            else:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as e:
                    self._raise_unavailable(e)

    def _migrate(self) -> None:
        with self.db() as c:
            current = c.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                msg = (
                    f"the job database {self.path} has schema version {current}, newer than this imageqc "
                    f"understands ({SCHEMA_VERSION}); upgrade imageqc"
                )
                raise StoreError(msg)
            for version in range(current, SCHEMA_VERSION):
                for stmt in _statements(MIGRATIONS[version]):
                    c.execute(stmt)
                c.execute(f"PRAGMA user_version = {version + 1}")

    @property
    def schema_version(self) -> int:
        with self.db(commit=False) as c:
            return int(c.execute("PRAGMA user_version").fetchone()[0])

    def integrity_check(self) -> str:
        """``'ok'`` or SQLite's description of the damage."""
        with self.db(commit=False) as c:
            try:
                return str(c.execute("PRAGMA quick_check").fetchone()[0])
            except sqlite3.DatabaseError as e:
                return str(e)

    # -- scan sets and job creation ---------------------------------------

    def add_scan_set(
        self, *, chip: str, root: str, fingerprint: str, members: Sequence[dict[str, Any]], now: float | None = None
    ) -> tuple[int, bool]:
        """Record a scan set; returns ``(id, created)``. Same fingerprint -> same row."""
        now = _now(now)
        with self.db() as c:
            row = c.execute("SELECT id FROM scan_sets WHERE fingerprint = ?", (fingerprint,)).fetchone()
            if row:
                c.execute("UPDATE scan_sets SET last_seen = ? WHERE id = ?", (now, row["id"]))
                return int(row["id"]), False
            cur = c.execute(
                "INSERT INTO scan_sets (chip, root, fingerprint, members, first_seen, last_seen) VALUES (?,?,?,?,?,?)",
                (stored_name(chip), stored_name(root), fingerprint, json.dumps(list(members)), now, now),
            )
            return int(cur.lastrowid), True  # type: ignore[arg-type]

    def get_scan_set(self, scan_set_id: int) -> ScanSetRow:
        with self.db(commit=False) as c:
            row = c.execute("SELECT * FROM scan_sets WHERE id = ?", (scan_set_id,)).fetchone()
        if row is None:
            raise StoreError(f"no scan set {scan_set_id}")
        d = dict(row)
        d["members"] = json.loads(d["members"])  # JSON escapes undecodable bytes (surrogates) losslessly
        d["chip"], d["root"] = loaded_name(d["chip"]), loaded_name(d["root"])
        return ScanSetRow(**d)

    def create_job(
        self,
        scan_set_id: int,
        *,
        state: JobState | str = JobState.QUEUED,
        now: float | None = None,
        message: str = "",
    ) -> int | None:
        """Create the job of a scan set; ``None`` when its fingerprint already has one.

        The same fingerprint is processed once, ever: this is the only place
        jobs are made and the fingerprint column is unique.
        """
        now = _now(now)
        state = JobState(state)
        if state not in (S.SETTLING, S.QUEUED):
            raise StoreError(f"a job starts settling or queued, not {state}")
        with self.db() as c:
            ss = c.execute("SELECT chip, fingerprint FROM scan_sets WHERE id = ?", (scan_set_id,)).fetchone()
            if ss is None:
                raise StoreError(f"no scan set {scan_set_id}")
            try:
                cur = c.execute(
                    "INSERT INTO jobs (scan_set_id, chip, fingerprint, state, created_at, updated_at, queued_at)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (
                        scan_set_id,
                        ss["chip"],
                        ss["fingerprint"],
                        state.value,
                        now,
                        now,
                        now if state is S.QUEUED else None,
                    ),
                )
            except sqlite3.IntegrityError:
                return None
            job_id = int(cur.lastrowid)  # type: ignore[arg-type]
            self._event(
                c,
                job_id,
                "created",
                None,
                state.value,
                message or f"{loaded_name(ss['chip'])} {state.value}",
                None,
                now,
            )
            return job_id

    # -- reading ------------------------------------------------------------

    def get_job(self, job_id: int) -> Job:
        with self.db(commit=False) as c:
            job = _job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        if job is None:
            raise JobNotFound(job_id)
        return job

    def find_job(self, fingerprint: str) -> Job | None:
        with self.db(commit=False) as c:
            return _job(c.execute("SELECT * FROM jobs WHERE fingerprint = ?", (fingerprint,)).fetchone())

    def list_jobs(
        self,
        *,
        states: Iterable[str] | None = None,
        chip: str | None = None,
        limit: int | None = None,
        newest_first: bool = True,
    ) -> list[Job]:
        sql = "SELECT * FROM jobs"
        where: list[str] = []
        args: list[Any] = []
        if states:
            st = [JobState(s).value for s in states]
            where.append(f"state IN ({','.join('?' * len(st))})")
            args += st
        if chip:
            where.append("chip = ?")
            args.append(stored_name(chip))
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id " + ("DESC" if newest_first else "ASC")
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self.db(commit=False) as c:
            return [j for j in map(_job, c.execute(sql, args).fetchall()) if j is not None]

    def counts(self) -> dict[str, int]:
        """Jobs per state, every state present (zeros included)."""
        out = {s.value: 0 for s in JobState}
        with self.db(commit=False) as c:
            for row in c.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                out[row["state"]] = int(row["n"])
        return out

    def events(self, job_id: int | None = None, *, limit: int | None = None, kinds: Sequence[str] = ()) -> list[Event]:
        sql = "SELECT * FROM events"
        where: list[str] = []
        args: list[object] = []
        if job_id is not None:
            where.append("job_id = ?")
            args.append(job_id)
        if kinds:
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            args += list(kinds)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC" if limit else " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self.db(commit=False) as c:
            rows = c.execute(sql, args).fetchall()
        evs = [Event(**{**dict(r), "data": json.loads(r["data"]) if r["data"] else None}) for r in rows]
        return list(reversed(evs)) if limit else evs

    def add_event(
        self,
        job_id: int | None,
        kind: str,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        with self.db() as c:
            self._event(c, job_id, kind, None, None, message, data, _now(now))

    @staticmethod
    def _event(
        c: sqlite3.Connection,
        job_id: int | None,
        kind: str,
        from_state: str | None,
        to_state: str | None,
        message: str | None,
        data: dict[str, Any] | None,
        now: float,
    ) -> None:
        c.execute(
            "INSERT INTO events (job_id, at, kind, from_state, to_state, message, data) VALUES (?,?,?,?,?,?,?)",
            (job_id, now, kind, from_state, to_state, _shown(message), json.dumps(data) if data else None),
        )

    # -- the state machine --------------------------------------------------

    def transition(
        self,
        job_id: int,
        to_state: JobState | str,
        *,
        now: float | None = None,
        owner: str | None = None,
        message: str = "",
        error: str | None = None,
        failed_stage: str | None = None,
        next_attempt_at: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> Job:
        """Move a job to ``to_state``; raises :class:`IllegalTransition` otherwise.

        With ``owner``, the job must be leased by that owner (a worker whose
        lease was recovered or whose job was cancelled cannot overwrite it).
        """
        now = _now(now)
        target = JobState(to_state)
        with self.db() as c:
            job = _job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            if job is None:
                raise JobNotFound(job_id)
            self._check(job, target, owner)
            self._apply(c, job, target, now, message, error, failed_stage, next_attempt_at, data)
            updated = _job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            assert updated is not None  # updated in this transaction
            return updated

    @staticmethod
    def _check(job: Job, target: JobState, owner: str | None) -> None:
        current = JobState(job.state)
        if target not in TRANSITIONS[current]:
            raise IllegalTransition(job.id, current.value, target.value)
        if owner is not None and (current not in LEASED or job.lease_owner != owner):
            raise IllegalTransition(job.id, f"{current.value} (not leased by {owner})", target.value)

    def _apply(
        self,
        c: sqlite3.Connection,
        job: Job,
        target: JobState,
        now: float,
        message: str,
        error: str | None,
        failed_stage: str | None,
        next_attempt_at: float | None,
        data: dict[str, Any] | None,
    ) -> None:
        sets: dict[str, object] = {"state": target.value, "updated_at": now}
        if target not in LEASED:
            sets.update(lease_owner=None, lease_expires=None)
        if target is S.FAILED:
            sets.update(
                error=_shown(error or message or "failed"), failed_stage=failed_stage, next_attempt_at=next_attempt_at
            )
        elif target in (S.QUEUED, S.QC_DONE) and JobState(job.state) is S.FAILED:
            # back to work: the failure is history (its events), not what the job shows while it runs again
            sets.update(next_attempt_at=None, error=None, failed_stage=None)
        if target is S.QUEUED:
            sets.update(queued_at=now, stage=None, progress=None)
        if target in (S.DONE, S.SKIPPED, S.SUPERSEDED, S.FAILED):
            sets.update(finished_at=now)
        if target in (S.DONE, S.SKIPPED):
            sets.update(error=None, failed_stage=None)
        cols = ", ".join(f"{k} = ?" for k in sets)
        c.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*sets.values(), job.id))
        text = message or (error or "")
        self._event(c, job.id, "state", job.state, target.value, text, data, now)

    def claim(
        self,
        owner: str,
        *,
        now: float | None = None,
        lease_s: float = 120.0,
        from_state: JobState | str = JobState.QUEUED,
        to_state: JobState | str = JobState.RUNNING,
    ) -> Job | None:
        """Atomically take the oldest due job in ``from_state`` and lease it to ``owner``."""
        now = _now(now)
        src, dst = JobState(from_state), JobState(to_state)
        if dst not in TRANSITIONS[src] or dst not in LEASED:
            raise IllegalTransition(0, src.value, dst.value)
        with self.db() as c:
            row = c.execute(
                "UPDATE jobs SET state = ?, lease_owner = ?, lease_expires = ?, updated_at = ?,"
                " attempts = attempts + ?, started_at = COALESCE(started_at, ?), stage = NULL, progress = NULL"
                " WHERE id = (SELECT id FROM jobs WHERE state = ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
                "             ORDER BY COALESCE(queued_at, created_at), id LIMIT 1)"
                " RETURNING *",
                (dst.value, owner, now + lease_s, now, 1 if dst is S.RUNNING else 0, now, src.value, now),
            ).fetchone()
            job = _job(row)
            if job is not None:
                self._event(c, job.id, "state", src.value, dst.value, f"claimed by {owner}", None, now)
            return job

    def renew_lease(self, job_id: int, owner: str, *, now: float | None = None, lease_s: float = 120.0) -> bool:
        """Extend a lease; False when the job is no longer leased by ``owner``."""
        now = _now(now)
        with self.db() as c:
            cur = c.execute(
                "UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_owner = ? AND state IN (?, ?)",
                (now + lease_s, job_id, owner, S.RUNNING.value, S.UPLOADING.value),
            )
            return cur.rowcount == 1

    def set_progress(
        self, job_id: int, owner: str, stage: str, progress: float | None, *, now: float | None = None
    ) -> bool:
        now = _now(now)
        with self.db() as c:
            cur = c.execute(
                "UPDATE jobs SET stage = ?, progress = ?, updated_at = ? WHERE id = ? AND lease_owner = ?",
                (stage, progress, now, job_id, owner),
            )
            return cur.rowcount == 1

    def recover_expired(
        self, *, now: float | None = None, orphans: bool = False, spare_owner: str | None = None
    ) -> list[int]:
        """Take back leased jobs: running -> queued, uploading -> qc_done.

        By default only leases that ran out (crash, kill -9, power loss). With ``orphans``, every
        leased job whatever its lease: the caller knows no holder is alive (the service at start,
        holding the state folder's lock). Leases of ``spare_owner`` and its parts (``<owner>/...``)
        are left alone: that owner watches them itself, on the monotonic clock, so a step of the wall
        clock cannot take a job away from a live service.
        """
        now = _now(now)
        back = {S.RUNNING: S.QUEUED, S.UPLOADING: S.QC_DONE}
        recovered = []
        with self.db() as c:
            sql = "SELECT * FROM jobs WHERE state IN (?, ?)" + ("" if orphans else " AND lease_expires < ?")
            rows = c.execute(sql, (S.RUNNING.value, S.UPLOADING.value, *(() if orphans else (now,)))).fetchall()
            for row in rows:
                job = _job(row)
                assert job is not None
                owner = job.lease_owner or ""
                if spare_owner and (owner == spare_owner or owner.startswith(spare_owner + "/")):
                    continue
                if orphans:
                    msg = f"{job.lease_owner} is gone (the service restarted); job returned to the queue"
                else:
                    msg = f"lease of {job.lease_owner} expired; job returned to the queue"
                self._apply(c, job, back[JobState(job.state)], now, msg, None, None, None, None)
                recovered.append(job.id)
        return recovered

    def repair_infinite_times(self, *, now: float | None = None) -> int:
        """Replace the infinite times older versions stamped at start-up recovery; returns the rows fixed.

        A job's optional times become NULL (its place in the queue falls back to its creation time),
        its ``updated_at`` becomes ``now``; events keep theirs (shown as ``-``: when is not known).
        """
        now = _now(now)
        inf = (math.inf, -math.inf)
        fixed = 0
        with self.db() as c:
            for col in ("queued_at", "started_at", "finished_at", "next_attempt_at", "lease_expires"):
                fixed += c.execute(f"UPDATE jobs SET {col} = NULL WHERE {col} IN (?, ?)", inf).rowcount
            fixed += c.execute("UPDATE jobs SET updated_at = ? WHERE updated_at IN (?, ?)", (now, *inf)).rowcount
        return fixed

    def requeue_due(self, *, now: float | None = None, max_attempts: int | None = None) -> list[int]:
        """Failed jobs whose retry time has come go back to where they stopped.

        ``max_attempts`` caps a job's QC runs (``attempts``). Upload failures are not capped here: a
        job's attempts do not count its uploads, whose attempts are counted per file by the uploads
        component, which leaves no retry time when it gives up.
        """
        now = _now(now)
        moved = []
        with self.db() as c:
            rows = c.execute(
                "SELECT * FROM jobs WHERE state = ? AND next_attempt_at IS NOT NULL AND next_attempt_at <= ?",
                (S.FAILED.value, now),
            ).fetchall()
            for row in rows:
                job = _job(row)
                assert job is not None
                if max_attempts is not None and job.failed_stage != "upload" and job.attempts >= max_attempts:
                    c.execute("UPDATE jobs SET next_attempt_at = NULL WHERE id = ?", (job.id,))
                    msg = f"no retry: {job.attempts} attempt(s) made, service.max_attempts = {max_attempts}"
                    self._event(c, job.id, "gave_up", None, None, msg, None, now)
                    continue
                target = S.QC_DONE if job.failed_stage == "upload" else S.QUEUED
                self._apply(c, job, target, now, f"retry {job.attempts + 1} after: {job.error}", None, None, None, None)
                moved.append(job.id)
        return moved

    def retry(self, job_id: int, *, qc: bool = False, now: float | None = None) -> Job:
        """By hand: a failed or skipped job goes back to where it stopped, now.

        ``qc``: QC runs again whatever stopped the job (a new verdict replaces the
        old one), e.g. after the thresholds or the model changed.
        """
        job = self.get_job(job_id)
        state = JobState(job.state)
        if state not in (S.FAILED, S.SKIPPED):
            raise IllegalTransition(job_id, state.value, "retry (only failed or skipped jobs are retried)")
        if qc:
            target = S.QUEUED
        elif state is S.FAILED:
            target = S.QC_DONE if job.failed_stage == "upload" else S.QUEUED
        else:
            target = S.QC_DONE
        return self.transition(job_id, target, now=now, message="retry requested" + (", QC runs again" if qc else ""))

    def cancel(self, job_id: int, *, now: float | None = None, reason: str = "cancelled by operator") -> Job:
        """Stop a job: it ends ``failed`` with the reason and is not retried automatically.

        A running job's worker sees its lease gone at the next renewal and stops.
        """
        job = self.get_job(job_id)
        if JobState(job.state) in TERMINAL or (JobState(job.state) is S.FAILED and job.failed_stage == "cancelled"):
            raise IllegalTransition(job_id, job.state, "cancel (the job has already ended)")
        return self.transition(job_id, S.FAILED, now=now, error=reason, failed_stage="cancelled")

    def supersede_older(self, chip: str, keep_job_id: int, *, now: float | None = None) -> list[int]:
        """Mark every unfinished older job of ``chip`` superseded by ``keep_job_id``."""
        now = _now(now)
        done = []
        with self.db() as c:
            rows = c.execute(
                "SELECT * FROM jobs WHERE chip = ? AND id < ? AND state NOT IN (?, ?, ?)",
                (stored_name(chip), keep_job_id, S.DONE.value, S.SKIPPED.value, S.SUPERSEDED.value),
            ).fetchall()
            for row in rows:
                job = _job(row)
                assert job is not None
                self._apply(c, job, S.SUPERSEDED, now, f"superseded by job {keep_job_id}", None, None, None, None)
                done.append(job.id)
        return done

    def send_back_to_qc(self, job_id: int, *, reason: str, owner: str | None = None, now: float | None = None) -> Job:
        """A QC'd job whose inputs are no longer what QC read goes back to the queue: QC runs again.

        From ``qc_done``, ``failed`` or ``uploading`` (with ``owner``: only while
        that owner holds it). In the same transaction the job's upload records
        of inputs, and of outputs never sent, are dropped: the new QC run plans
        its own (its run id is in the keys) and each input is checked and sent
        again. Inputs already stored for the old run are named in the event
        (``reason`` plus where they are); they are not deleted from the target.
        """
        now = _now(now)
        with self.db() as c:
            job = _job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            if job is None:
                raise JobNotFound(job_id)
            if JobState(job.state) not in (S.QC_DONE, S.UPLOADING, S.FAILED):
                raise IllegalTransition(job_id, job.state, f"{S.QUEUED.value} (only QC'd jobs are sent back to QC)")
            self._check(job, S.QUEUED, owner)
            stored = c.execute(
                "SELECT target, remote_key FROM uploads WHERE job_id = ? AND kind = 'inputs' AND state = ? ORDER BY id",
                (job_id, UploadState.DONE.value),
            ).fetchall()
            finished = [x.value for x in UPLOAD_FINISHED]
            c.execute(
                f"DELETE FROM uploads WHERE job_id = ? AND (kind = 'inputs' OR state NOT IN ({','.join('?' * len(finished))}))",
                (job_id, *finished),
            )
            message = reason
            if stored:
                keys = ", ".join(f"{r['target']}:{r['remote_key']}" for r in stored[:3]) + (
                    " ..." if len(stored) > 3 else ""
                )
                message += f" ({len(stored)} input file(s) already stored for the old QC run stay there: {keys})"
            data = {"stored_for_old_run": [[r["target"], r["remote_key"]] for r in stored]} if stored else None
            self._apply(c, job, S.QUEUED, now, message, None, None, None, data)
            c.execute("UPDATE jobs SET next_attempt_at = NULL WHERE id = ?", (job_id,))
            updated = _job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            assert updated is not None  # updated in this transaction
            return updated

    # -- QC results -------------------------------------------------------------

    def save_result(
        self,
        job_id: int,
        *,
        verdict: str,
        report: dict[str, Any] | str,
        output_dir: str | None = None,
        archive: str | None = None,
        now: float | None = None,
        owner: str | None = None,
        inputs: dict[str, dict[str, Any]] | None = None,
        announce: bool = False,
    ) -> None:
        """Store a job's QC report. With ``owner``, only while that owner holds the job running
        (a QC child orphaned by a killed service cannot overwrite a newer run's result).

        ``inputs``: what QC read, ``path -> {size, mtime_ns, sha256}``; the uploads check each
        input's content against it. ``announce``: also record a ``verdict`` event in the same
        transaction, so the verdict reaches people (:meth:`finished_since`) while the job still runs
        (writing what SAW needs, :meth:`set_archive`).

        A job's QC run again on the same inputs (``inputs`` equal, or either not recorded) with the
        verdict it already has (say, after its archive could not be written) replaces the result but
        keeps ``verdict_at``, the time that verdict was first stored, and records no second
        ``verdict`` event: it was announced already.
        """
        text = report if isinstance(report, str) else json.dumps(report)
        at = _now(now)
        with self.db() as c:
            if owner is not None:
                self._check_owner(c, job_id, owner, "save QC result")
            before = c.execute(
                "SELECT verdict, verdict_at, inputs FROM qc_results WHERE job_id = ?", (job_id,)
            ).fetchone()
            same = (
                before is not None
                and before["verdict"] == verdict
                and before["verdict_at"] is not None
                and (before["inputs"] is None or inputs is None or json.loads(before["inputs"]) == inputs)
            )
            if announce and not same:
                first = _first_reason(text)
                self._event(
                    c, job_id, "verdict", None, None, f"QC {verdict}" + (f": {first}" if first else ""), None, at
                )
            c.execute(
                "INSERT INTO qc_results (job_id, verdict, report, output_dir, archive, created_at, inputs, verdict_at)"
                " VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT(job_id) DO UPDATE SET verdict=excluded.verdict, report=excluded.report,"
                " output_dir=excluded.output_dir, archive=excluded.archive, created_at=excluded.created_at,"
                " inputs=excluded.inputs, verdict_at=excluded.verdict_at",
                (
                    job_id,
                    verdict,
                    text,
                    _stored(output_dir),
                    _stored(archive),
                    at,
                    None if inputs is None else json.dumps(inputs),
                    before["verdict_at"] if same else at,
                ),
            )

    def set_archive(self, job_id: int, archive: str | None, *, owner: str | None = None) -> None:
        """Record the archive of a job's stored result, written after its verdict (same ``owner`` rule as
        :meth:`save_result`)."""
        with self.db() as c:
            if owner is not None:
                self._check_owner(c, job_id, owner, "record the archive")
            c.execute("UPDATE qc_results SET archive = ? WHERE job_id = ?", (_stored(archive), job_id))

    @staticmethod
    def _check_owner(c: sqlite3.Connection, job_id: int, owner: str, what: str) -> None:
        row = c.execute("SELECT state, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        if row["state"] != S.RUNNING.value or row["lease_owner"] != owner:
            raise IllegalTransition(job_id, f"{row['state']} (not leased by {owner})", what)

    def get_result(self, job_id: int) -> dict[str, Any] | None:
        with self.db(commit=False) as c:
            row = c.execute("SELECT * FROM qc_results WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["report"] = json.loads(d["report"])
        d["inputs"] = json.loads(d["inputs"]) if d.get("inputs") else None
        d["output_dir"], d["archive"] = loaded_name(d["output_dir"]), loaded_name(d["archive"])
        return d

    def verdicts(self, job_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """The QC verdict and its first reason ('' if none) of each job that has a result."""
        ids = list(job_ids)
        out: dict[int, tuple[str, str]] = {}
        with self.db(commit=False) as c:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = c.execute(
                    f"SELECT job_id, verdict, report FROM qc_results WHERE job_id IN ({marks})", chunk
                ).fetchall()
                out.update({int(r["job_id"]): (r["verdict"], _first_reason(r["report"])) for r in rows})
        return out

    def recent_verdicts(self, limit: int = 5) -> list[dict[str, Any]]:
        """The newest QC verdicts: ``job_id``, ``chip``, ``verdict``, ``reason`` (the first, or ''), ``at`` (since
        when the verdict stands: a rerun with the same verdict keeps it, :meth:`save_result`)."""
        with self.db(commit=False) as c:
            rows = c.execute(
                "SELECT r.job_id, j.chip, r.verdict, r.report, r.verdict_at FROM qc_results r"
                " JOIN jobs j ON j.id = r.job_id ORDER BY r.verdict_at DESC, r.job_id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {
                "job_id": r["job_id"],
                "chip": loaded_name(r["chip"]),
                "verdict": r["verdict"],
                "reason": _first_reason(r["report"]),
                "at": r["verdict_at"],
            }
            for r in rows
        ]

    # -- upload records -----------------------------------------------------------

    def plan_uploads(self, job_id: int, rows: Iterable[dict[str, Any]], *, now: float | None = None) -> int:
        """Add upload records (target, kind, local_path, remote_key, size, mtime_ns); existing ones are kept.

        Returns how many were new.
        """
        now = _now(now)
        with self.db() as c:
            before = c.total_changes
            c.executemany(
                "INSERT OR IGNORE INTO uploads (job_id, target, kind, local_path, remote_key, size, mtime_ns, state,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        job_id,
                        r["target"],
                        r["kind"],
                        stored_name(r["local_path"]),
                        r["remote_key"],
                        r.get("size"),
                        r.get("mtime_ns"),
                        UploadState.PENDING.value,
                        now,
                        now,
                    )
                    for r in rows
                ],
            )
            return c.total_changes - before

    def uploads(
        self,
        job_id: int | None = None,
        *,
        target: str | None = None,
        states: Iterable[str] | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[UploadRow]:
        """Upload records, filtered; oldest first unless ``newest_first``."""
        where: list[str] = []
        args: list[object] = []
        if job_id is not None:
            where.append("job_id = ?")
            args.append(job_id)
        if target is not None:
            where.append("target = ?")
            args.append(target)
        if states:
            st = [UploadState(x).value for x in states]
            where.append(f"state IN ({','.join('?' * len(st))})")
            args += st
        sql = "SELECT * FROM uploads" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id " + ("DESC" if newest_first else "ASC")
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self.db(commit=False) as c:
            return [_upload(r) for r in c.execute(sql, args).fetchall()]

    def update_upload(self, row_id: int, /, *, now: float | None = None, **changes: Any) -> None:
        """Set columns of one upload record (state, bytes_done, upload_id, parts, checksum, attempts, error, ...)."""
        bad = set(changes) - _UPLOAD_COLUMNS
        if bad:
            raise StoreError(f"unknown upload column(s) {sorted(bad)}")
        if "state" in changes:
            changes["state"] = UploadState(changes["state"]).value
        if "parts" in changes and changes["parts"] is not None and not isinstance(changes["parts"], str):
            changes["parts"] = json.dumps(changes["parts"])
        changes["updated_at"] = _now(now)
        cols = ", ".join(f"{k} = ?" for k in changes)
        with self.db() as c:
            cur = c.execute(f"UPDATE uploads SET {cols} WHERE id = ?", (*changes.values(), row_id))
            if cur.rowcount != 1:
                raise StoreError(f"no upload record {row_id}")

    def upload_backlog(self) -> dict[str, dict[str, int]]:
        """Per target: files still to upload and their bytes still to send, for jobs not finished.

        Uploaded (done/present) files and inputs that changed since QC (never sent) are not counted.
        """
        done = [x.value for x in (*UPLOAD_FINISHED, UploadState.CHANGED)]
        with self.db(commit=False) as c:
            rows = c.execute(
                "SELECT u.target, COUNT(*) AS files, COALESCE(SUM(MAX(COALESCE(u.size, 0) - u.bytes_done, 0)), 0) AS bytes"
                " FROM uploads u JOIN jobs j ON j.id = u.job_id"
                f" WHERE u.state NOT IN ({','.join('?' * len(done))}) AND j.state IN (?, ?, ?)"
                " GROUP BY u.target",
                (*done, S.QC_DONE.value, S.UPLOADING.value, S.FAILED.value),
            ).fetchall()
        return {r["target"]: {"files": int(r["files"]), "bytes": int(r["bytes"])} for r in rows}

    def jobs_without_uploads(self, *, limit: int = 50) -> list[Job]:
        """Jobs waiting in ``qc_done`` that have no upload records yet (oldest first)."""
        with self.db(commit=False) as c:
            rows = c.execute(
                "SELECT * FROM jobs WHERE state = ? AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.job_id = jobs.id)"
                " ORDER BY id LIMIT ?",
                (S.QC_DONE.value, int(limit)),
            ).fetchall()
        return [j for j in map(_job, rows) if j is not None]

    def defer(self, job_id: int, *, owner: str, until: float, message: str, now: float | None = None) -> Job:
        """An uploading job goes back to ``qc_done`` and is not claimed again before ``until``."""
        now = _now(now)
        with self.db() as c:
            job = _job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            if job is None:
                raise JobNotFound(job_id)
            self._check(job, S.QC_DONE, owner)
            self._apply(c, job, S.QC_DONE, now, message, None, None, None, {"until": until})
            c.execute("UPDATE jobs SET next_attempt_at = ? WHERE id = ?", (until, job_id))
            updated = _job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
            assert updated is not None  # updated in this transaction
            return updated

    # -- key-value (FOV-pair cache) -----------------------------------------

    def kv_get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        with self.db(commit=False) as c:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                q = f"SELECT key, value FROM kv WHERE namespace = ? AND key IN ({','.join('?' * len(chunk))})"
                for row in c.execute(q, (namespace, *chunk)):
                    out[row["key"]] = bytes(row["value"])
        return out

    def kv_get(self, namespace: str, key: str) -> bytes | None:
        return self.kv_get_many(namespace, [key]).get(key)

    def kv_put_many(self, namespace: str, items: Iterable[tuple[str, bytes]], *, now: float | None = None) -> None:
        now = _now(now)
        with self.db() as c:
            c.executemany(
                "INSERT INTO kv (namespace, key, value, updated_at) VALUES (?,?,?,?)"
                " ON CONFLICT(namespace, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                [(namespace, k, v, now) for k, v in items],
            )

    def kv_put(self, namespace: str, key: str, value: bytes, *, now: float | None = None) -> None:
        self.kv_put_many(namespace, [(key, value)], now=now)

    def kv_items(self, namespace: str) -> dict[str, bytes]:
        """Every key and value of a namespace."""
        with self.db(commit=False) as c:
            return {
                r["key"]: bytes(r["value"])
                for r in c.execute("SELECT key, value FROM kv WHERE namespace = ?", (namespace,))
            }

    def kv_delete(self, namespace: str, keys: Iterable[str]) -> None:
        with self.db() as c:
            c.executemany("DELETE FROM kv WHERE namespace = ? AND key = ?", [(namespace, k) for k in keys])

    def kv_count(self, namespace: str) -> int:
        with self.db(commit=False) as c:
            return int(c.execute("SELECT COUNT(*) FROM kv WHERE namespace = ?", (namespace,)).fetchone()[0])

    # -- discovery state (daemon/discovery.py) --------------------------------

    #: Columns of ``discovery_members`` and ``discovery_sets``, in order.
    MEMBER_COLUMNS = (
        "path",
        "root",
        "set_key",
        "name",
        "chip",
        "format",
        "role",
        "stain",
        "size",
        "mtime_ns",
        "files",
        "sig",
        "first_seen",
        "last_change",
    )
    SET_COLUMNS = ("set_key", "root", "chip", "folder", "first_seen", "last_change", "settling_since")

    #: Columns holding file and folder names: kept losslessly whatever their bytes (:func:`daemon.naming.stored_name`).
    NAME_COLUMNS = frozenset({"path", "root", "set_key", "name", "chip", "folder"})

    def discovery_load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every watched member and scan set, as dicts keyed by column name."""
        names = self.NAME_COLUMNS
        with self.db(commit=False) as c:
            rows = [
                [{k: loaded_name(v) if k in names else v for k, v in dict(r).items()} for r in c.execute(sql)]
                for sql in ("SELECT * FROM discovery_members", "SELECT * FROM discovery_sets")
            ]
        members, sets = rows
        return sorted(members, key=lambda m: m["path"]), sorted(sets, key=lambda s: s["set_key"])

    def discovery_save(
        self,
        *,
        members: Sequence[dict[str, Any]] = (),
        drop_members: Sequence[str] = (),
        sets: Sequence[dict[str, Any]] = (),
        drop_sets: Sequence[str] = (),
    ) -> None:
        """Upsert and delete members and sets in one transaction."""
        if not (members or drop_members or sets or drop_sets):
            return
        mcols, scols, names = self.MEMBER_COLUMNS, self.SET_COLUMNS, self.NAME_COLUMNS
        with self.db() as c:
            c.executemany("DELETE FROM discovery_members WHERE path = ?", [(stored_name(p),) for p in drop_members])
            c.executemany("DELETE FROM discovery_sets WHERE set_key = ?", [(stored_name(k),) for k in drop_sets])
            c.executemany(
                f"INSERT OR REPLACE INTO discovery_members ({','.join(mcols)}) VALUES ({','.join('?' * len(mcols))})",
                [tuple(_stored(m[k]) if k in names else m[k] for k in mcols) for m in members],
            )
            c.executemany(
                f"INSERT OR REPLACE INTO discovery_sets ({','.join(scols)}) VALUES ({','.join('?' * len(scols))})",
                [tuple(_stored(s[k]) if k in names else s[k] for k in scols) for s in sets],
            )

    def note_once(self, key: str, kind: str, *, now: float | None = None) -> bool:
        """Remember ``key``; True only the first time (for things reported once, ever)."""
        with self.db() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO discovery_notes (key, kind, at) VALUES (?,?,?)",
                (stored_name(key), kind, _now(now)),
            )
            return cur.rowcount == 1

    # -- notification outbox (daemon/notify.py) -------------------------------

    def finished_since(self, cursor: int, *, limit: int = 500) -> list[dict[str, Any]]:
        """Jobs that reached ``qc_done`` or ``failed`` (or gave up retrying), or whose verdict was announced
        (kind ``verdict``, :meth:`save_result`), in events after id ``cursor``.

        Each: ``event_id``, ``at``, ``kind``, ``to_state`` and the job's ``job_id``, ``chip``, ``state``,
        ``next_attempt_at``, ``error``, ``failed_stage``, ``attempts``, ``finished_at``, and its QC
        ``verdict``, ``verdict_at``, ``report`` and ``output_dir`` (None without a result). Oldest first.
        """
        with self.db(commit=False) as c:
            rows = c.execute(
                "SELECT e.id AS event_id, e.at, e.kind, e.to_state, j.id AS job_id, j.chip, j.state, j.next_attempt_at,"
                " j.error, j.failed_stage, j.attempts, j.finished_at, r.verdict, r.verdict_at, r.report, r.output_dir"
                " FROM events e JOIN jobs j ON j.id = e.job_id LEFT JOIN qc_results r ON r.job_id = j.id"
                " WHERE e.id > ? AND ((e.kind = 'state' AND e.to_state IN (?, ?)) OR e.kind IN ('gave_up', 'verdict'))"
                " ORDER BY e.id LIMIT ?",
                (cursor, S.QC_DONE.value, S.FAILED.value, int(limit)),
            ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["report"] = json.loads(d["report"]) if d["report"] else None
            d["chip"], d["output_dir"] = loaded_name(d["chip"]), loaded_name(d["output_dir"])
            out.append(d)
        return out

    def last_event_id(self) -> int:
        with self.db(commit=False) as c:
            return int(c.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])

    def outbox_add(
        self, rows: Iterable[dict[str, Any]], *, cursor: tuple[str, int] | None = None, now: float | None = None
    ) -> int:
        """Queue notifications (``event``, ``key``, ``title``, ``body``, optional ``job_id``, ``attach``).

        A row whose (event, key) is already queued is ignored, so enqueueing twice, or again after a
        restart, sends once. With ``cursor`` (name, value), that kv entry (namespace ``notify``) is
        set in the same transaction. Returns how many rows were new.
        """
        now = _now(now)
        with self.db() as c:
            before = c.total_changes
            c.executemany(
                "INSERT OR IGNORE INTO outbox (event, key, job_id, title, body, attach, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                [
                    (r["event"], r["key"], r.get("job_id"), r["title"], r["body"], r.get("attach"), now, now)
                    for r in rows
                ],
            )
            added = c.total_changes - before
            if cursor is not None:
                c.execute(
                    "INSERT INTO kv (namespace, key, value, updated_at) VALUES ('notify', ?, ?, ?)"
                    " ON CONFLICT(namespace, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (cursor[0], str(cursor[1]).encode(), now),
                )
            return added

    def outbox_exists(self, event: str, key: str) -> bool:
        with self.db(commit=False) as c:
            return c.execute("SELECT 1 FROM outbox WHERE event = ? AND key = ?", (event, key)).fetchone() is not None

    def outbox(
        self, *, states: Iterable[str] | None = None, due: float | None = None, limit: int | None = None
    ) -> list[OutboxRow]:
        """Outbox rows, oldest first; with ``due``, only pending rows whose next attempt is due by then."""
        where: list[str] = []
        args: list[object] = []
        if states:
            st = [OutboxState(x).value for x in states]
            where.append(f"state IN ({','.join('?' * len(st))})")
            args += st
        if due is not None:
            where.append("state = ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?)")
            args += [OutboxState.PENDING.value, due]
        sql = "SELECT * FROM outbox" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self.db(commit=False) as c:
            return [_outbox(r) for r in c.execute(sql, args).fetchall()]

    def outbox_update(
        self,
        row_id: int,
        /,
        *,
        now: float | None = None,
        state: OutboxState | str | None = None,
        delivered: Sequence[str] | None = None,
        attempted: bool = False,
        next_attempt_at: float | None = None,
        error: str | None = None,
    ) -> None:
        """Record a delivery round of one row: endpoints that have it, the next attempt, the last error.

        ``attempted`` counts an attempt; ``error`` (with its time) is kept until the row is sent.
        """
        now = _now(now)
        sets: dict[str, Any] = {"updated_at": now, "next_attempt_at": next_attempt_at}
        if state is not None:
            sets["state"] = OutboxState(state).value
            if sets["state"] == OutboxState.SENT.value:
                sets["sent_at"] = now
        if delivered is not None:
            sets["delivered"] = json.dumps(sorted(set(delivered)))
        if error is not None:
            sets.update(error=error, error_at=now)
        cols = ", ".join(f"{k} = ?" for k in sets) + (", attempts = attempts + 1" if attempted else "")
        with self.db() as c:
            cur = c.execute(f"UPDATE outbox SET {cols} WHERE id = ?", (*sets.values(), row_id))
            if cur.rowcount != 1:
                raise StoreError(f"no outbox row {row_id}")

    def outbox_summary(self) -> dict[str, Any]:
        """For `imageqc status`: rows ``waiting``, ``expired``, the newest error of a waiting row and when, last sent."""
        with self.db(commit=False) as c:
            counts = {
                r["state"]: int(r["n"]) for r in c.execute("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
            }
            err = c.execute(
                "SELECT error, error_at FROM outbox WHERE state = ? AND error IS NOT NULL ORDER BY error_at DESC LIMIT 1",
                (OutboxState.PENDING.value,),
            ).fetchone()
            sent = c.execute("SELECT MAX(sent_at) FROM outbox").fetchone()[0]
        return {
            "waiting": counts.get(OutboxState.PENDING.value, 0),
            "expired": counts.get(OutboxState.EXPIRED.value, 0),
            "sent": counts.get(OutboxState.SENT.value, 0),
            "last_error": err["error"] if err else None,
            "last_error_at": err["error_at"] if err else None,
            "last_sent_at": sent,
        }

    def activity_since(self, since: float) -> dict[str, Any]:
        """For the daily digest: QC verdicts, jobs failed for good and jobs created since ``since``."""
        with self.db(commit=False) as c:
            verdicts = {
                r["verdict"]: int(r["n"])
                for r in c.execute(
                    "SELECT verdict, COUNT(*) AS n FROM qc_results WHERE created_at >= ? GROUP BY verdict", (since,)
                )
            }
            failed = [
                {**dict(r), "chip": loaded_name(r["chip"])}
                for r in c.execute(
                    "SELECT id, chip, error FROM jobs WHERE state = ? AND next_attempt_at IS NULL AND finished_at >= ? ORDER BY id",
                    (S.FAILED.value, since),
                )
            ]
            fails = [
                loaded_name(r["chip"])
                for r in c.execute(
                    "SELECT j.chip FROM qc_results r JOIN jobs j ON j.id = r.job_id WHERE r.created_at >= ? AND r.verdict = 'fail'"
                    " ORDER BY r.job_id",
                    (since,),
                )
            ]
            created = int(c.execute("SELECT COUNT(*) FROM jobs WHERE created_at >= ?", (since,)).fetchone()[0])
        return {"verdicts": verdicts, "qc_fail_chips": fails, "failed_jobs": failed, "jobs_created": created}

    # -- service status (read by `imageqc status` from another process) -------

    def set_status(self, key: str, value: Any, *, now: float | None = None) -> None:
        with self.db() as c:
            c.execute(
                "INSERT INTO service_status (key, value, updated_at) VALUES (?,?,?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, json.dumps(value), _now(now)),
            )

    def get_status(self) -> dict[str, tuple[Any, float]]:
        with self.db(commit=False) as c:
            return {
                r["key"]: (json.loads(r["value"]), r["updated_at"]) for r in c.execute("SELECT * FROM service_status")
            }


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
