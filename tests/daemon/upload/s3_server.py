"""moto's S3 server with a request log, for tests and the benchmark.

Run as ``python tests/daemon/upload/s3_server.py [PORT]``: it binds 127.0.0.1
(port 0 = a free one), prints ``PORT <n>`` on its first line and serves
moto's real S3 protocol. Every request is logged (method, path, query keys,
operation, status) and ``GET /_log`` returns the log as JSON, ``DELETE /_log``
clears it. The tests count ``UploadPart`` requests with it: a resumed upload
must send only the parts the server does not have.
"""

from __future__ import annotations

import json
import sys
import threading
from urllib.parse import parse_qs


def operation(method: str, query: dict[str, list[str]]) -> str:
    """The S3 operation a request is, from its method and query keys."""
    if "uploadId" in query:
        if method == "PUT" and "partNumber" in query:
            return "UploadPart"
        return {"POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload", "GET": "ListParts"}.get(
            method, "?"
        )
    if "uploads" in query:
        return "CreateMultipartUpload" if method == "POST" else "ListMultipartUploads"
    return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, method)


class Logged:
    """WSGI middleware that records every request."""

    def __init__(self, app):
        self.app = app
        self.log: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        if path == "/_log":
            with self.lock:
                if method == "DELETE":
                    self.log.clear()
                body = json.dumps(self.log).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        entry = {
            "method": method,
            "path": path,
            "op": operation(method, query),
            "upload_id": (query.get("uploadId") or [None])[0],
            "part": int(query["partNumber"][0]) if "partNumber" in query else None,
            "status": None,
        }
        with self.lock:
            self.log.append(entry)

        def start(status, headers, exc_info=None):
            entry["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    app = Logged(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
