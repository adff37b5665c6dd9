"""The optional local listener: Prometheus ``/metrics`` and a read-only status page.

``[web] listen = "127.0.0.1:8787"`` turns it on. The standard library's
threading HTTP server runs in a daemon thread the service starts and stops
(:class:`WebServer` is a service component). Every request reads the job
database through its own read-only connection, so the page and the scrapes
never wait on the service nor slow QC.

Pages (GET and HEAD only; nothing can be changed from here):

``/``                        what ``imageqc status`` shows
``/jobs/<id>``               one job: verdict, metrics, reasons, history, pictures
``/pictures/<id>/<file>``    a PNG of that job's own output folder, nothing else
``/metrics``                 Prometheus text format (daemon/metrics.py)

Security: loopback by default; any other address needs ``web.token`` (checked
when the config is loaded), compared in constant time, given as a bearer token
(Prometheus) or as the password of the browser's login prompt. Every response
carries a strict Content-Security-Policy, ``nosniff``, ``DENY`` framing, no
referrer and ``no-store``. A port already in use is one clear log line; the
service runs on without the page.
"""

from __future__ import annotations

import base64
import errno
import hmac
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from daemon.config import Config, parse_listen
from daemon.errors import DaemonError, DatabaseUnavailable, JobNotFound
from daemon.logging import get_logger, register_secret
from daemon.store import Store

__all__ = ["SAFE_HEADERS", "WebServer", "WebUnavailable", "picture_file", "read_token"]

log = get_logger("imageqc.web")

#: Headers set on every response.
SAFE_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Largest picture served (bytes); QC pictures are a few MB at most.
_MAX_PICTURE = 64 * 1024 * 1024


class WebUnavailable(DaemonError):
    """The listener could not start (port in use, address not on this machine, token unreadable)."""


def read_token(ref: str, environ: Mapping[str, str] | None = None) -> str:
    """The token a ``web.token`` reference ('env:NAME' or 'file:PATH') holds.

    Raises
    ------
    WebUnavailable
        When it cannot be read or is empty, saying where to put it.
    """
    env = os.environ if environ is None else environ
    ref = ref.strip()
    if ref.startswith("env:"):
        token = env.get(ref[4:], "").strip()
        if not token:
            msg = (
                f"web.token: {ref[4:]} is not set in the service's environment; set it to a long random token "
                "(systemd: Environment= or EnvironmentFile=; Windows: the service's environment)"
            )
            raise WebUnavailable(msg)
    else:
        path = Path(ref[5:]).expanduser()
        try:
            lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            msg = (
                f"web.token: cannot read {path} ({getattr(e, 'strerror', None) or type(e).__name__}); "
                "write the token in it, readable only by the service"
            )
            raise WebUnavailable(msg) from None
        token = next((s for s in lines if s and not s.startswith("#")), "")
        if not token:
            raise WebUnavailable(f"web.token: {path} holds no token; write one long random token in it")
    register_secret(token)
    return token


def picture_file(config: Config, output_dir: str | None, name: str) -> Path | None:
    """The picture ``name`` of a job whose output folder is ``output_dir``, or None when it must not be served.

    Served: a regular ``.png`` file directly in ``<output folder>/pictures``, the output folder lying
    inside the service's own output folder, no symbolic link on the way out of it.
    """
    if (
        not output_dir
        or not name.lower().endswith(".png")
        or name.startswith(".")
        or len(name) > 255
        or any(c in name for c in "/\\:\x00")
        or any(ord(c) < 32 for c in name)
    ):
        return None  # one plain file name: no folder, drive or stream part, no hidden or control characters
    try:
        root = config.output_dir.resolve(strict=True)
        folder = Path(output_dir).resolve(strict=True)
        pictures = (folder / "pictures").resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if root not in folder.parents or pictures.parent != folder:
        return None  # a job folder outside the output folder, or a pictures folder linked elsewhere
    candidate = pictures / name
    if candidate.is_symlink():
        return None
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return real if real.parent == pictures else None


def _read_png(path: Path) -> bytes | None:
    """The file's bytes if it is a regular PNG file (opened without following a link where the OS can)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_PICTURE:
            return None
        data = fh.read(_MAX_PICTURE + 1)
    return data if data.startswith(_PNG_MAGIC) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # SO_REUSEADDR lets a restart bind through TIME_WAIT on POSIX; on Windows it would let two programs share the port.
    allow_reuse_address = os.name != "nt"

    def __init__(self, address: tuple[str, int], app: WebServer) -> None:
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "imageqc"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 15  # a client that sends nothing for this long is dropped

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web request", client=self.client_address[0], line=format % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _refuse(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            b"read-only: only GET and HEAD are served\n",
            extra={"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def end_headers(self) -> None:
        for k, v in SAFE_HEADERS.items():  # every response, the standard library's own errors included
            self.send_header(k, v)
        super().end_headers()

    def _send(self, status: int, ctype: str, data: bytes, *, body: bool = True, extra: Mapping[str, str] = {}) -> None:
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _authorized(self) -> bool:
        token = self.server.app.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        offered = ""
        if scheme.lower() == "bearer":
            offered = value.strip()
        elif scheme.lower() == "basic":
            try:
                offered = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                offered = ""
        return hmac.compare_digest(offered.encode("utf-8"), token.encode("utf-8"))

    def _serve(self, *, body: bool) -> None:
        from daemon.web_pages import STYLE, message_page

        app = self.server.app
        if not self._authorized():
            page = message_page("Token needed", "This page needs the token set in web.token (any user name).")
            self._send(
                HTTPStatus.UNAUTHORIZED,
                "text/html; charset=utf-8",
                page.encode(),
                body=body,
                extra={"WWW-Authenticate": 'Basic realm="imageqc", charset="UTF-8"'},
            )
            return
        raw = urlsplit(self.path).path
        parts = raw.split("/")[1:]
        try:
            if raw == "/":
                self._html(app.status_html(), body)
            elif raw == "/metrics":
                data, ctype = app.metrics()
                self._send(HTTPStatus.OK, ctype, data, body=body)
            elif raw == "/style.css":
                self._send(HTTPStatus.OK, "text/css; charset=utf-8", STYLE.encode(), body=body)
            elif len(parts) == 2 and parts[0] == "jobs" and parts[1].isdigit():
                job_page = app.job_html(int(parts[1]))
                if job_page is None:
                    self._not_found(body)
                else:
                    self._html(job_page, body)
            elif len(parts) == 3 and parts[0] == "pictures" and parts[1].isdigit():
                png = app.picture(int(parts[1]), unquote(parts[2], errors="strict"))
                if png is None:
                    self._not_found(body)
                else:
                    self._send(HTTPStatus.OK, "image/png", png, body=body)
            else:
                self._not_found(body)
        except DatabaseUnavailable as e:
            page = message_page("Job database unavailable", str(e))
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/html; charset=utf-8", page.encode(), body=body)
        except UnicodeDecodeError:
            self._not_found(body)

    def _html(self, page: str, body: bool) -> None:
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode("utf-8"), body=body)

    def _not_found(self, body: bool) -> None:
        from daemon.web_pages import message_page

        page = message_page("Not found", "Nothing here; the status page is at /.")
        self._send(HTTPStatus.NOT_FOUND, "text/html; charset=utf-8", page.encode(), body=body)


class WebServer:
    """The listener as a service component (started and stopped with the service; its tick does nothing).

    Parameters
    ----------
    config : Config
    clock : callable
        Returns now in seconds.
    environ : mapping, optional
        Where an ``env:`` token reference is read; default ``os.environ``.
    """

    name = "web"

    def __init__(
        self, config: Config, *, clock: Callable[[], float] = time.time, environ: Mapping[str, str] | None = None
    ) -> None:
        from prometheus_client import CollectorRegistry

        from daemon.metrics import StoreCollector

        self.config = config
        self.clock = clock
        self.environ = environ
        self.token: str | None = None
        self.error: str | None = None
        self.address: tuple[str, int] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.collector = StoreCollector(config, clock=clock)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    # -- component protocol ------------------------------------------------------

    def start(self, daemon: Any = None) -> None:
        """Listen; a failure (port in use, ...) is logged once and leaves the service running without the page."""
        try:
            self.serve()
        except WebUnavailable as e:
            self.error = str(e)
            log.error(
                "status page and metrics are off", error=str(e), setting="web.listen", listen=self.config.web.listen
            )

    def tick(self, now: float) -> None:
        return None

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def health(self) -> dict[str, Any]:
        return {"listen": self.config.web.listen, "url": self.url, "error": self.error}

    # -- serving -------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        if self.address is None:
            return None
        host, port = self.address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve(self) -> None:
        """Bind and start the server thread.

        Raises
        ------
        WebUnavailable
            Port in use, an address this machine does not have, or an unreadable token.
        """
        w = self.config.web
        host, port = parse_listen(w.listen)
        self.token = read_token(w.token, self.environ) if w.token else None
        try:
            server = _Server((host, port), self)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
                msg = (
                    f"port {port} is already in use (web.listen = {w.listen!r}); stop the program using it or set "
                    "web.listen to a free port; the service runs on without the status page"
                )
            else:
                msg = (
                    f"cannot listen on {w.listen!r} (web.listen): {e.strerror or e}; use an address of this machine, "
                    "e.g. '127.0.0.1:8787'; the service runs on without the status page"
                )
            raise WebUnavailable(msg) from None
        self.collector.prime()
        self._server = server
        self.address = server.server_address[:2]  # type: ignore[assignment]
        self.error = None
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="imageqc-web", daemon=True
        )
        self._thread.start()
        log.info("status page listening", url=self.url, token=bool(self.token))

    # -- what the pages show ---------------------------------------------------------

    def metrics(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def status_html(self) -> str:
        from daemon.status import collect_status
        from daemon.web_pages import status_page

        now = self.clock()
        return status_page(collect_status(self.config, now=now), refresh_s=self.config.web.refresh_s, now=now)

    def _store(self) -> Store:
        return Store(self.config.database_path, readonly=True, busy_timeout_s=2.0)

    def job_html(self, job_id: int) -> str | None:
        from daemon.web_pages import job_page

        with self._store() as store:
            try:
                job = store.get_job(job_id)
            except JobNotFound:
                return None
            result = store.get_result(job_id)
            events = store.events(job_id)
        pictures: list[str] = []
        if result and result.get("output_dir"):
            folder = Path(result["output_dir"]) / "pictures"
            try:
                names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png")
            except OSError:
                names = []
            pictures = [n for n in names if picture_file(self.config, result["output_dir"], n) is not None]
        return job_page(job, result, events, pictures, refresh_s=self.config.web.refresh_s, now=self.clock())

    def picture(self, job_id: int, name: str) -> bytes | None:
        with self._store() as store:
            try:
                result = store.get_result(job_id)
            except JobNotFound:
                return None
        path = picture_file(self.config, (result or {}).get("output_dir"), name)
        return None if path is None else _read_png(path)
