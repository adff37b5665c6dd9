"""Upload benchmark: one large file to a local S3 server, our uploader beside plain boto3.

    python benchmarks/bench_upload.py [--quick] [--server moto|rclone] [--size-mb N]

Writes a file of random bytes (2 GiB; ``--quick``: 256 MiB), starts the
server on 127.0.0.1 (moto's, or ``rclone serve s3`` over a temporary folder),
then uploads the file:

* ``imageqc``: :class:`daemon.upload.s3.S3Uploader` with the config defaults
  (64 MiB parts, 4 in parallel) and once with boto3's part size and threads
  (8 MiB, 10); timed apart: the digest pass (SHA-256 + part MD5s) and the
  upload itself (HEAD, multipart with Content-MD5 per part, HEAD to verify);
* ``boto3``: ``client.upload_file`` with its default TransferConfig.

Prints the figures and writes them into this benchmark's section of
benchmarks/RESULTS.md. The file and the server's data are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, record  # noqa: E402

KEYS = ("AKIABENCH", "bench-secret-key")
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not start on port {port}")


def start_server(kind: str, data: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    if kind == "moto":
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        env = {**os.environ, "TMPDIR": str(data)}  # moto spools large objects to temporary files
    else:
        name = "rclone.exe" if sys.platform == "win32" else "rclone"
        binary = Path(sys.executable).parent / name
        cmd = [
            str(binary if binary.exists() else shutil.which("rclone")),
            "serve",
            "s3",
            str(data),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            ",".join(KEYS),
            "--force-path-style",
            "--config",
            os.devnull,
        ]
        env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


def write_file(path: Path, size: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(rng.bytes(n))
            left -= n


def client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEYS[0],
        aws_secret_access_key=KEYS[1],
        config=Config(s3={"addressing_style": "path"}),
    )


def ours(endpoint: str, bucket: str, path: Path, key: str, *, part_mb: int, threads: int) -> dict[str, float]:
    from daemon.config import UploadTarget
    from daemon.upload.base import Transfer
    from daemon.upload.credentials import Credentials
    from daemon.upload.s3 import S3Uploader

    target = UploadTarget(
        name="bench",
        type="s3",
        endpoint=endpoint,
        bucket=bucket,
        region="us-east-1",
        addressing_style="path",
        part_size_mb=part_mb,
        concurrency=threads,
        timeout_s=300,
    )
    with tempfile.TemporaryDirectory() as state:
        up = S3Uploader(target, state_dir=Path(state), credentials=Credentials(*KEYS))
        verify, spent = up.verify, []

        def timed_verify(local, key):  # the HEAD + comparison after the last part
            t = time.perf_counter()
            try:
                return verify(local, key)
            finally:
                spent.append(time.perf_counter() - t)

        up.verify = timed_verify  # type: ignore[method-assign]
        try:
            t0 = time.perf_counter()
            local = up.digest(path)
            t1 = time.perf_counter()
            outcome = up.send(Transfer(local=local, key=key))
            t2 = time.perf_counter()
        finally:
            up.close()
    assert not outcome.present
    return {"digest": t1 - t0, "upload": t2 - t1, "verify": sum(spent), "total": t2 - t0}


def plain_boto3(endpoint: str, bucket: str, path: Path, key: str) -> dict[str, float]:
    c = client(endpoint)
    t0 = time.perf_counter()
    c.upload_file(str(path), bucket, key)
    t1 = time.perf_counter()
    return {"digest": 0.0, "upload": t1 - t0, "verify": 0.0, "total": t1 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB instead of 2 GiB")
    ap.add_argument("--server", choices=("moto", "rclone"), default="moto")
    ap.add_argument("--size-mb", type=int, help="file size in MiB (overrides --quick)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    from daemon.logging import configure_logging

    configure_logging(level="warning", console="off")
    size = (args.size_mb or (256 if args.quick else 2048)) * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    data = work / "server"
    data.mkdir()
    path = work / "SS200000135TL_D1.tif"
    try:
        t = time.perf_counter()
        write_file(path, size)
        setup = time.perf_counter() - t
        rows = []
        runs = [
            ("boto3 upload_file (defaults: 8 MiB parts, 10 threads)", lambda ep, b, k: plain_boto3(ep, b, path, k)),
            (
                "imageqc S3Uploader, defaults (64 MiB parts, 4 threads)",
                lambda ep, b, k: ours(ep, b, path, k, part_mb=64, threads=4),
            ),
            (
                "imageqc S3Uploader, boto3's sizes (8 MiB parts, 10 threads)",
                lambda ep, b, k: ours(ep, b, path, k, part_mb=8, threads=10),
            ),
        ]
        for label, run in runs:  # each on a fresh server
            server_data = data / str(len(rows))
            server_data.mkdir()
            proc, endpoint = start_server(args.server, server_data)
            try:
                admin = client(endpoint)
                admin.create_bucket(Bucket="bench")
                figures = run(endpoint, "bench", "big.tif")
                head = admin.head_object(Bucket="bench", Key="big.tif")
                assert head["ContentLength"] == size
            finally:
                proc.kill()
                proc.wait()
                shutil.rmtree(server_data, ignore_errors=True)
            rows.append((label, figures))
            print(
                f"{label}: digest {figures['digest']:.1f} s, upload {figures['upload']:.1f} s (verify {figures['verify']:.1f} s), "
                f"total {figures['total']:.1f} s = {size / MiB / figures['total']:.0f} MiB/s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    flags = (" --quick" if args.quick else "") + (" --server rclone" if args.server == "rclone" else "")
    title = f"## Uploads (`benchmarks/bench_upload.py{flags}`): {size / MiB:.0f} MiB to {args.server} on 127.0.0.1"
    lines = [
        title,
        "",
        "Machine: " + machine_info("boto3"),
        "",
        "| uploader | digest s | upload s (of which verify) | total s | MiB/s (total) | MiB/s (upload) |",
        "|---|---|---|---|---|---|",
    ]
    for label, f in rows:
        lines.append(
            f"| {label} | {f['digest']:.1f} | {f['upload']:.1f} ({f['verify']:.1f}) | {f['total']:.1f} | "
            f"{size / MiB / f['total']:.0f} | {size / MiB / f['upload']:.0f} |"
        )
    lines += [
        "",
        "imageqc reads the file twice: once for the digests (SHA-256 for the object's metadata, an MD5 per part for "
        "Content-MD5 and for resuming), once to send it; boto3 sends with its default checksum (CRC32) and keeps no "
        "resumable state. imageqc's upload time includes its HEADs and the verification; a server whose ETag "
        "for a multipart object is the whole file's MD5 (rclone) makes the verification hash the file once more on "
        "both sides. Each run starts a fresh server; the server shares the cores with the client (and, here, with "
        "other work: see the load average), so compare on a quiet machine before reading much into the gap. "
        f"Random data in the page cache. Setup (writing the file): {setup:.0f} s.",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        record(
            "bench_upload" + ("_quick" if args.quick else "") + ("_rclone" if args.server == "rclone" else ""), section
        )


if __name__ == "__main__":
    main()
