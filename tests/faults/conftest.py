"""The fault and soak harness: the real service (``python -m daemon.cli run``) in a subprocess.

:class:`Service` writes a config with short settle, tick and lease times into
a temporary folder, starts the service there (``PYTHONPATH`` = the
repository), waits for job states through a read-only :class:`~daemon.store.Store`
(the way ``imageqc status`` reads it), and kills it (SIGKILL), stops it
(SIGTERM) and starts it again. :func:`verify_exactly_once` is the end check
every test shares: one ``done`` job per scan set, every file uploaded once per
target, its copy's SHA-256 equal to the source, no partial files left.

Images are small generated chips (:mod:`qc.testing.chips`, 1200-2400 px at
scale 0.5) so a QC run takes about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from daemon.errors import DaemonError
from daemon.store import Job, Store
from daemon.upload.hpc import PARTIAL_SUFFIX
from tests.helpers import run_child, scaled, tail, wait_changes

REPO = Path(__file__).resolve().parents[2]
S3_ENV = "IMAGEQC_FAULTS"
S3_KEYS = ("AKIAIMAGEQCFAULTS", "faults-secret-5e0c9d")

#: Service settings that make a scan set go from last write to ``done`` in a few seconds.
FAST = {
    "discovery": {"grouping_window_s": 0, "rescan_interval_s": 2, "poll_interval_s": 0.2, "incomplete_timeout_s": 600},
    # normal priority: at "low" (nice 19, idle I/O) a QC child gets almost no CPU beside a CPU hog,
    # and these tests are about faults, not about yielding to the microscope (tests/daemon/test_worker.py is)
    "qc": {"threads": 1, "memory_limit_mb": 1536, "priority": "normal"},
    "output": {"pictures": False},
    "service": {
        "tick_seconds": 0.2,
        "lease_seconds": 5,
        "workers": 2,
        "retry_base_s": 1,
        "retry_max_s": 2,
        "shutdown_timeout_s": 2,
        "max_attempts": 10,
    },
    "logging": {"console": "off", "max_bytes": 200_000_000},
}

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a TOML basic string


def config_text(
    *,
    watch: Iterable[dict[str, Any]] = ({"path": "inbox"},),
    uploads: Iterable[dict[str, Any]] = (),
    **tables: dict[str, Any],
) -> str:
    """TOML for a service under test: :data:`FAST` with ``tables`` merged in (``qc={...}``, ``output={...}``)."""
    merged = {k: dict(v) for k, v in FAST.items()}
    state_dir = tables.pop("state_dir", "state")
    for name, values in tables.items():
        merged.setdefault(name, {}).update(values)
    lines = [f"state_dir = {_toml_value(state_dir)}"]
    for w in watch:
        lines.append("[[watch]]")
        w = {"settle_seconds": 0.5, **w}
        lines += [f"{k} = {_toml_value(v)}" for k, v in w.items()]
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for u in uploads:
        lines.append("[[upload]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in u.items()]
    return "\n".join(lines) + "\n"


def hpc_target(path: str = "hpc", **extra: Any) -> dict[str, Any]:
    return {"name": "hpc", "type": "hpc", "mode": "all", "path": path, **extra}


def s3_target(endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "s3",
        "type": "s3",
        "mode": "all",
        "endpoint": endpoint,
        "bucket": bucket,
        "region": "us-east-1",
        "addressing_style": "path",
        "part_size_mb": 5,
        "credentials": f"env:{S3_ENV}",
        **extra,
    }


# ---------------------------------------------------------------------------
# The service in a subprocess
# ---------------------------------------------------------------------------


class Service:
    """One service installation in a temporary folder; started, killed and restarted by the test."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.config = root / "imageqc.toml"
        self.config.write_text(text, encoding="utf-8")
        self.db = root / "state" / "imageqc.sqlite3"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            f"{S3_ENV}_ACCESS_KEY_ID": S3_KEYS[0],
            f"{S3_ENV}_SECRET_ACCESS_KEY": S3_KEYS[1],
        }
        self.env.pop("IMAGEQC_CONFIG", None)

    # -- process control ---------------------------------------------------

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        out = (self.root / f"service-{self.starts}.out").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config)],
            cwd=self.root,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[psutil.Process]:
        """The service's QC worker children (not the multiprocessing resource tracker)."""
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        out = []
        for k in kids:
            with contextlib.suppress(psutil.Error):
                if "resource_tracker" not in " ".join(k.cmdline()):
                    out.append(k)
        return out

    def kill(self) -> list[int]:
        """SIGKILL the service (no clean-up at all); returns the pids of its QC children then."""
        assert self.proc is not None
        kids = [k.pid for k in self.children()]
        self.proc.send_signal(signal.SIGKILL)
        self.wait_exit(30, "the service to die of SIGKILL")  # reap at once: a zombie still "exists" for its children
        return kids

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (``scaled(timeout)``); returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout, "the service to stop on SIGTERM")

    def wait_exit(self, timeout: float, what: str = "the service to exit") -> int:
        """Wait ``scaled(timeout)`` s for the process to end; on expiry fail with what it was doing."""
        assert self.proc is not None
        try:
            return self.proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            pytest.fail(f"timed out after {scaled(timeout):g} s waiting for {what}\n{self.doing()}")

    def output(self, which: int | None = None) -> str:
        """What a run printed (stdout and stderr); the latest by default."""
        n = which or self.starts
        path = self.root / f"service-{n}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Teardown: stop the service and any QC child it left."""
        if self.proc is None:
            return
        kids = self.children() if self.alive() else []
        if self.alive():
            self.proc.kill()
            self.proc.wait(scaled(30))
        for k in kids:
            with contextlib.suppress(psutil.Error):
                k.kill()

    # -- reading state -------------------------------------------------------

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        with Store(self.db, readonly=True) as s:
            yield s

    def read(self, fn: Callable[[Store], Any]) -> Any:
        """``fn(store)`` on a fresh read-only connection; None while the database does not exist yet."""
        try:
            with self.store() as s:
                return fn(s)
        except DaemonError:
            return None

    def jobs(self) -> list[Job]:
        return self.read(lambda s: s.list_jobs(newest_first=False)) or []

    def wait_for(
        self, pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1, *, may_exit: bool = False
    ) -> Any:
        """Poll ``pred`` until it is truthy, for ``scaled(timeout)`` s; on timeout (or the service exiting,
        unless ``may_exit``) fail with the jobs, the log's tail and what the process printed last."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            value = pred()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None and not may_exit:
                pytest.fail(f"the service exited ({self.proc.returncode}) while waiting for {what}\n{self.doing()}")
            if time.monotonic() >= deadline:
                break
            time.sleep(every)
        pytest.fail(f"timed out after {scaled(timeout):g} s waiting for {what}\n{self.doing()}")

    def doing(self) -> str:
        """What the service was doing: its jobs, its log's tail and what the process printed last."""
        jobs = "\n".join(f"  #{j.id} {j.chip} {j.state}/{j.stage} {j.error or ''}" for j in self.jobs())
        log = "\n".join(json.dumps(e)[:300] for e in self.log()[-15:])
        state = (
            "not started" if self.proc is None else f"exit code {self.proc.poll()}" if not self.alive() else "running"
        )
        return (
            f"service ({state}) jobs:\n{jobs or '  (none)'}\nlog tail:\n{log or '  (empty)'}\n"
            f"printed last:\n{tail(self.output(), 25)}"
        )

    def wait_running(self, timeout: float = 180.0) -> None:
        """Until the service reports running (imports and start-up take long on a busy machine)."""
        started = self.starts

        def up() -> bool:
            st = self.read(lambda s: s.get_status().get("service"))
            return bool(
                st and st[0].get("state") == "running" and st[0].get("pid") == self.pid and started == self.starts
            )

        self.wait_for(up, timeout, "the service to report running")

    def last_rescan(self) -> float | None:
        """When the service's discovery last finished walking the first watch root (its heartbeat says)."""

        def read(s: Store) -> float | None:
            beat = s.get_status().get("service")
            roots = beat[0].get("components", {}).get("discovery", {}).get("roots", []) if beat else []
            return roots[0].get("last_rescan") if roots else None

        return self.read(read)

    def rescans(self, n: int = 2, timeout: float = 60.0) -> None:
        """Until discovery reported ``n`` more rescans: the quiet time before checking nothing new happened."""
        wait_changes(self.last_rescan, n, "the service to finish another rescan", timeout=timeout)

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``imageqc ARGS --config ...`` as a person runs it beside the service (timeout scaled)."""
        return run_child(
            [sys.executable, "-m", "daemon.cli", *args, "--config", str(self.config)],
            timeout=timeout,
            what=f"imageqc {' '.join(args)}",
            cwd=self.root,
            env=self.env,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        """``imageqc status --json``, as a person would run it."""
        r = self.cli("status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def log(self) -> list[dict[str, Any]]:
        path = self.root / "state" / "logs" / "imageqc.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """``make_service(text, name="svc")`` -> a :class:`Service` (not started); all are stopped at teardown."""
    made: list[Service] = []

    def make(text: str, *, name: str = "svc", folders: Iterable[str] = ("inbox", "hpc")) -> Service:
        root = tmp_path / name
        root.mkdir()
        for f in folders:
            (root / f).mkdir(parents=True, exist_ok=True)
        svc = Service(root, text)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


# ---------------------------------------------------------------------------
# Images and slow writers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chip_images(shared_data: Path) -> list[bytes]:
    """Four generated chip TIFFs (bytes): three 1200 px and one 2400 px (over one 5 MiB S3 part)."""
    import tifffile

    from qc.testing.chips import generate_chip

    out = []
    for seed, size in ((21, 1200), (22, 1200), (23, 1200), (24, 2400)):
        chip = generate_chip(data_dir=shared_data, seed=seed, width=size, height=size, scale=(0.5, 0.5), angle_deg=-1.5)
        buf = io.BytesIO()
        tifffile.imwrite(buf, chip.image)
        out.append(buf.getvalue())
    return out


def serial(i: int) -> str:
    """A valid long chip serial, different for each ``i``."""
    return f"SS2000{i:05d}TL_D1"


def write_slowly(
    path: Path, data: bytes, *, chunk: int = 128 * 1024, pause: float = 0.02, stop: threading.Event | None = None
) -> None:
    """Write ``data`` to ``path`` in chunks, as a microscope exporting: the file grows under its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        for start in range(0, len(data), chunk):
            fh.write(data[start : start + chunk])
            fh.flush()
            if stop is not None and stop.is_set():
                pause = 0.0
            time.sleep(pause)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every regular file under ``root`` (links are listed, not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = f"link->{os.readlink(p)}" if p.is_symlink() else sha256_file(p)
    return out


# ---------------------------------------------------------------------------
# The end check
# ---------------------------------------------------------------------------


@dataclass
class Verified:
    """What :func:`verify_exactly_once` checked, for the test's report."""

    jobs: int = 0
    files: dict[str, int] = field(default_factory=dict)  # target -> files verified
    present: int = 0  # records that found their object already stored (after a kill)


def hpc_objects(root: Path) -> tuple[dict[str, str], list[str]]:
    """Key -> SHA-256 of every file under an hpc target folder, and any partial files left."""
    objects, partial = {}, []
    for p in root.rglob("*"):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if p.name.endswith(PARTIAL_SUFFIX):
                partial.append(rel)
            else:
                objects[rel] = sha256_file(p)
    return objects, partial


def s3_objects(client: Any, bucket: str) -> dict[str, str]:
    """Key -> SHA-256 of every object in the bucket (read back in full)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = hashlib.sha256(body).hexdigest()
    return out


def verify_exactly_once(
    svc: Service,
    chips: Iterable[str],
    *,
    hpc: Path | None = None,
    s3: tuple[Any, str] | None = None,
    ignore: Iterable[str] = (),
) -> Verified:
    """Every scan set ends ``done`` exactly once with verified uploads.

    - one job per chip, and it is ``done``; one ``-> done`` event in its history;
    - each upload record once per (job, target, file), ``done`` or ``present``,
      and each remote key once per target;
    - the stored copy of every record (hpc folder, S3 bucket) has the SHA-256 of
      the local file, nothing else is stored (but the fleet status document), no ``.imageqc-partial`` file and
      no unfinished multipart upload is left.

    Jobs of the ``ignore`` chips (failed on purpose; the test checks them) are left out.
    """
    chips = sorted(chips)
    skip = set(ignore)
    v = Verified()
    with svc.store() as s:
        jobs = [j for j in s.list_jobs(newest_first=False) if j.chip not in skip]
        by_chip: dict[str, list[Job]] = {}
        for j in jobs:
            by_chip.setdefault(j.chip, []).append(j)
        assert sorted(by_chip) == chips, f"jobs for chips {sorted(by_chip)}, expected {chips}"
        for chip, js in by_chip.items():
            assert [j.state for j in js] == ["done"], f"{chip}: jobs {[(j.id, j.state, j.error) for j in js]}"
            dones = [e for e in s.events(js[0].id) if e.to_state == "done"]
            assert len(dones) == 1, f"{chip}: {len(dones)} transitions to done"
        v.jobs = len(jobs)
        records = s.uploads()
        for j in jobs:  # a job uploads its own inputs and the outputs of its final QC run, nothing else
            result = s.get_result(j.id)
            assert result is not None and result["archive"], f"{j.chip}: no QC archive recorded"
            outputs = {result["archive"], str(Path(result["output_dir"]) / "report.json")}
            members = [m["path"] for m in s.get_scan_set(j.scan_set_id).members]
            for target in {r.target for r in records if r.job_id == j.id}:
                paths = {r.local_path for r in records if r.job_id == j.id and r.target == target}
                inputs = {p for p in paths if any(p == m or p.startswith(m + os.sep) for m in members)}
                assert paths - inputs == outputs, (
                    f"{j.chip} -> {target}: outputs {sorted(paths - inputs)}, expected {sorted(outputs)}"
                )
                assert all(any(p == m or p.startswith(m + os.sep) for p in inputs) for m in members), (
                    j.chip,
                    target,
                    inputs,
                )
    expected: dict[str, dict[str, str]] = {}
    for r in records:
        assert r.state in ("done", "present"), (
            f"upload record {r.id} ({r.target} {r.remote_key}) is {r.state}: {r.error}"
        )
        local = sha256_file(Path(r.local_path))
        assert r.sha256 == local, f"{r.local_path}: recorded sha256 {r.sha256} != {local}"
        keys = expected.setdefault(r.target, {})
        assert r.remote_key not in keys, f"{r.target}: key {r.remote_key} uploaded by two records"
        keys[r.remote_key] = local
        v.present += r.state == "present"
    seen = {(r.job_id, r.target, r.local_path) for r in records}
    assert len(seen) == len(records)
    if hpc is not None:
        objects, partial = hpc_objects(hpc)
        objects = _without_fleet(objects)
        assert not partial, f"partial files left on the share: {partial}"
        assert objects == expected.get("hpc", {}), _diff("hpc", objects, expected.get("hpc", {}))
        v.files["hpc"] = len(objects)
    if s3 is not None:
        client, bucket = s3
        objects = _without_fleet(s3_objects(client, bucket))
        assert objects == expected.get("s3", {}), _diff("s3", objects, expected.get("s3", {}))
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        v.files["s3"] = len(objects)
    return v


def _without_fleet(objects: dict[str, str]) -> dict[str, str]:
    """The stored objects but the service's own status document (``{prefix}/_fleet/{site}/{host}.json``, #19)."""
    return {k: v for k, v in objects.items() if "_fleet" not in k.split("/")[:-1]}


def _diff(target: str, stored: dict[str, str], expected: dict[str, str]) -> str:
    extra = sorted(set(stored) - set(expected))
    missing = sorted(set(expected) - set(stored))
    wrong = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
    return f"{target}: extra {extra[:5]}, missing {missing[:5]}, different content {wrong[:5]}"
