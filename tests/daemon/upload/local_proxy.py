"""The part every test proxy in front of the local S3 server shares: an HTTP server on 127.0.0.1 that hands each
request to the proxy's ``handle`` and keeps a log of what it saw."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients closing keep-alive sockets
            super().handle_error(request, client_address)


class LocalProxy:
    """Serve on 127.0.0.1 (a free port) in front of the S3 server at ``backend`` (host:port).

    A subclass sets what its :meth:`handle` needs before calling this ``__init__``, which starts serving.
    """

    #: The serving thread's name.
    thread_name = "test-proxy"

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.log: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name=self.thread_name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests(self, op: str | None = None) -> list[dict[str, Any]]:
        """The logged requests, all or those of one operation (``op``)."""
        with self._lock:
            return [e for e in self.log if op is None or e["op"] == op]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError
