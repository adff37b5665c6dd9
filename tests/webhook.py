"""A real HTTP endpoint on 127.0.0.1 that records the JSON apprise posts to it (``json://`` URLs)."""

from __future__ import annotations

import http.server
import json
import threading

from tests.helpers import scaled

__all__ = ["TOKEN", "Webhook"]

TOKEN = "Tok3nS3cr3tXYZ42"  # a token-like part of the webhook URL: must never be printed or logged


class Webhook:
    """An HTTP server that records the JSON bodies posted to it."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict]] = []
        received = self.messages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                received.append((self.path, json.loads(self.rfile.read(n))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook/{TOKEN}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(scaled(10))
