"""An upload server that trickles its response (issue #20, case 4): a stop is never held hostage.

The S3 endpoint is a real HTTP server on 127.0.0.1 that answers HEAD at once
(404: nothing stored yet) and then, for every upload, reads the whole request
and sends its answer 2 bytes a second: no read timeout ever fires, the
request would take minutes. The real service (a subprocess) uploads a QC'd
job to it; SIGTERM must stop it within ``service.shutdown_timeout_s`` (plus a
margin for the process's own exit), a second SIGTERM at once, and nothing is
lost: started again against a good server (moto), the job ends ``done`` with
every file stored once.
"""

from __future__ import annotations

import math
import signal
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.store import Store
from tests.daemon.upload.conftest import make_qc_done_job, new_bucket
from tests.helpers import SLOWDOWN

from .conftest import Service, config_text, s3_target, verify_exactly_once

pytestmark = pytest.mark.soak

#: Seconds the service may take beyond the shutdown timeout to exit (interpreter exit, busy machine),
#: before the slowdown factor; far below the time the trickled answer lasts (scaled alike).
MARGIN_S = 25.0

#: The answer to every upload request, sent 2 bytes a second (about 150 s in all, times the slowdown).
TRICKLED = (
    b'HTTP/1.1 200 OK\r\nETag: "d41d8cd98f00b204e9800998ecf8427e"\r\nContent-Length: 0\r\n'
    + b"x-amz-request-id: "
    + b"trickle" * math.ceil(30 * SLOWDOWN)
    + b"\r\n\r\n"
)


class TricklingS3(socketserver.ThreadingTCPServer):
    """An S3 endpoint that reads each upload whole, then answers it at 2 bytes/s."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.stopping = threading.Event()
        self.uploads = 0  # requests whose body was read and whose answer is trickling
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


class _Handler(socketserver.StreamRequestHandler):
    server: TricklingS3

    def handle(self) -> None:
        while not self.server.stopping.is_set():
            line = self.rfile.readline()
            if not line:
                return
            method = line.split(b" ", 1)[0]
            headers = {}
            while True:
                h = self.rfile.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("expect", "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.wfile.flush()
            length = int(headers.get("content-length") or 0)
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    return
                length -= len(chunk)
            if method == b"HEAD":
                self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                self.wfile.flush()
                continue
            self.server.uploads += 1
            for i in range(0, len(TRICKLED), 2):
                if self.server.stopping.wait(1.0):
                    return
                try:
                    self.wfile.write(TRICKLED[i : i + 2])
                    self.wfile.flush()
                except OSError:
                    return


@pytest.fixture
def trickling_s3() -> Iterator[TricklingS3]:
    srv = TricklingS3()
    yield srv
    srv.close()


def _service(tmp_path: Path, endpoint: str, bucket: str, shutdown_s: float) -> str:
    return config_text(
        uploads=[s3_target(endpoint, bucket, timeout_s=60, max_attempts=1)],
        service={"shutdown_timeout_s": shutdown_s},
    )


def test_a_trickling_upload_server_never_holds_up_a_stop_and_nothing_is_lost(
    make_service, trickling_s3, s3_server, tmp_path
) -> None:
    shutdown_s = 2.0
    svc: Service = make_service(_service(tmp_path, trickling_s3.endpoint, "bkt", shutdown_s), folders=("inbox",))
    svc.db.parent.mkdir(parents=True)
    with Store(svc.db) as store:  # a QC'd job waiting for its upload (files outside the watch root)
        job = make_qc_done_job(store, svc.root / "exports", svc.root / "qc-out")

    def stuck_uploading() -> bool:
        jobs = svc.jobs()
        return trickling_s3.uploads >= 1 and bool(jobs) and jobs[0].state == "uploading"

    # 1. SIGTERM while a request trickles: the stop waits shutdown_timeout_s, abandons it, exits 0
    svc.start()
    svc.wait_for(stuck_uploading, 60, "an upload to be stuck in the trickling answer")
    svc.proc.send_signal(signal.SIGTERM)
    code = svc.wait_exit(shutdown_s + MARGIN_S, "the service to exit on SIGTERM past the trickling upload")
    assert code == 0, svc.output()
    events = [e.get("event") for e in svc.log()]
    assert "transfers still in flight at the stop deadline are abandoned; they resume at the next start" in events
    # ...and the process ends past the abandoned thread instead of finalising around it (that once aborted with
    # glibc's "double free or corruption", exit -6, when the trickled bytes arrived during finalisation)
    assert "exiting past threads still busy at the stop" in events
    assert svc.jobs()[0].state == "qc_done"  # released for the next start, not left to lease recovery

    # 2. SIGTERM, then a second one: the service exits at once (it would otherwise wait 10 minutes)
    svc.config.write_text(_service(tmp_path, trickling_s3.endpoint, "bkt", 600.0), encoding="utf-8")
    before = trickling_s3.uploads
    signals = sum(e.get("event") == "signal received: stopping" for e in svc.log())
    svc.start()
    svc.wait_for(lambda: trickling_s3.uploads > before and stuck_uploading(), 60, "the upload to be stuck again")
    svc.proc.send_signal(signal.SIGTERM)
    svc.wait_for(
        lambda: sum(e.get("event") == "signal received: stopping" for e in svc.log()) > signals, 30, "the first signal"
    )
    svc.proc.send_signal(signal.SIGTERM)
    code = svc.wait_exit(MARGIN_S, "a second SIGTERM to stop the service at once")
    assert code == 128 + signal.SIGTERM
    assert any(e.get("event") == "second signal: stopping now" for e in svc.log())

    # 3. nothing lost: against a good server the job resumes and ends done, every file stored once
    bucket = new_bucket(s3_server)
    svc.config.write_text(_service(tmp_path, s3_server.endpoint, bucket, shutdown_s), encoding="utf-8")
    svc.start()
    svc.wait_for(lambda: [j.state for j in svc.jobs()] == ["done"], 90, "the job to be uploaded after the restart")
    assert svc.stop() == 0
    verify_exactly_once(svc, [job.chip], s3=(s3_server.client(), bucket))
