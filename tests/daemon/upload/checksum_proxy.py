"""An S3 pass-through proxy on 127.0.0.1 that refuses the x-amz-checksum-* headers, like an older S3-compatible server.

Requests are forwarded to the S3 server behind it (moto) as they came, except
those carrying a header whose name starts with ``x-amz-checksum-`` (the part
or object checksum, or ``x-amz-checksum-algorithm`` of CreateMultipartUpload):
their body is read and they are answered ``400 InvalidArgument``, as servers
without S3's flexible checksums answer. ``refuse`` narrows that to some
operations (e.g. only UploadPart: a server that takes the declaration and
refuses the part headers). Every request is logged with whether it was refused.
"""

from __future__ import annotations

import http.client
import uuid
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from .local_proxy import LocalProxy
from .s3_server import operation


class ChecksumRefusingProxy(LocalProxy):
    """Serve on 127.0.0.1 (a free port) in front of the S3 server at ``backend`` (host:port)."""

    thread_name = "checksum-proxy"

    def __init__(self, backend: str, refuse: set[str] | None = None) -> None:
        #: Operations whose checksum headers are refused (None: every operation).
        self.refuse = refuse
        super().__init__(backend)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        op = operation(h.command, parse_qs(url.query, keep_blank_values=True))
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        checksums = sorted(k.lower() for k in h.headers if k.lower().startswith("x-amz-checksum-"))
        refused = bool(checksums) and (self.refuse is None or op in self.refuse)
        with self._lock:
            self.log.append({"op": op, "path": url.path, "checksums": checksums, "refused": refused})
        if refused:
            data = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidArgument</Code>'
                f"<Message>Unsupported header {checksums[0]}</Message>"
                f"<RequestId>{uuid.uuid4().hex}</RequestId></Error>"
            ).encode()
            self._reply(h, 400, [("Content-Type", "application/xml")], data)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        conn = http.client.HTTPConnection(self.backend, timeout=60)
        try:
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("connection", "transfer-encoding")]
            self._reply(h, resp.status, kept, data)
        finally:
            conn.close()

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        h.send_response(status)
        for k, v in headers:
            if k.lower() != "content-length" or h.command == "HEAD":  # a HEAD's length is the object's
                h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body and h.command != "HEAD":
            h.wfile.write(body)
