"""moto's S3 server with a request log (``tests/daemon/upload/s3_server.py``) in a child process.

The session fixture ``s3_server`` (tests/conftest.py) starts one for every test that needs it: the
upload tests and the fault tests share it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers import REPO, scaled

SCRIPT = REPO / "tests" / "daemon" / "upload" / "s3_server.py"


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[str]

    def log(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.endpoint}/_log", timeout=scaled(10)) as r:
            return json.loads(r.read())

    def clear_log(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/_log", method="DELETE")
        urllib.request.urlopen(req, timeout=scaled(10)).read()

    def requests(self, op: str, key: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.log() if e["op"] == op and (key is None or e["path"].endswith("/" + key))]

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="admin",
            aws_secret_access_key="admin",
        )

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(scaled(30))


def start_s3_server() -> S3Server:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.match(r"PORT (\d+)", line)
    if not m:
        proc.kill()
        pytest.fail(f"moto's S3 server did not start: {line!r}")
    return S3Server(f"http://127.0.0.1:{m.group(1)}", proc)
