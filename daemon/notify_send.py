"""Notification endpoints: apprise URLs from the environment or a file, one message sent with a timeout.

A rule's ``urls`` are references, never URLs (apprise URLs carry tokens):

``env:NAME``
    The service's environment variable ``NAME``: one or more URLs separated by
    spaces or newlines.
``file:PATH``
    A file with one URL a line; blank lines and ``#`` comments are skipped.

References are read at every delivery round, so a fixed file or variable is
picked up without a restart. Every URL read, and the token-like parts of it,
is registered with :func:`daemon.logging.register_secret`: no log line, stored
error or printed message can carry it. Endpoints are named ``rule[i]`` (the
``i``-th reference of the rule; ``rule[i.j]`` for its further URLs) and shown
with their reference and scheme only.

This module also holds ``imageqc notify test``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from daemon.config import Config, NotifyRule
from daemon.exitcodes import CONFIG_ENV, EXIT_FAILURE, EXIT_OK

__all__ = ["Endpoint", "add_notify_command", "resolve_endpoints", "send_message", "test_endpoints"]


@dataclass(frozen=True)
class Endpoint:
    """One apprise URL of a rule, or why there is none (``problem``). ``repr`` never shows the URL."""

    id: str
    rule: str
    source: str
    url: str | None = field(default=None, repr=False, compare=False)
    problem: str | None = None

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower() if self.url and "://" in self.url else "?"

    def label(self) -> str:
        """``rule[i] env:NAME (json)``: safe to print and log."""
        return f"{self.id} {self.source}" + (f" ({self.scheme})" if self.url else "")


def _register_url(url: str) -> None:
    """Never log a URL, nor its password and token-like parts (hosts, path segments, query values)."""
    from daemon.logging import register_secret  # structlog: not on every command's import path (imageqc qc)

    register_secret(url)
    try:
        parts = urlsplit(url)
        candidates = [
            parts.password or "",
            parts.netloc,
            *parts.path.split("/"),
            *(v for _, v in parse_qsl(parts.query)),
        ]
    except ValueError:
        return
    register_secret(parts.password)
    for c in candidates:
        if len(c) >= 8 and not c.isalpha():  # tokens, not words such as 'services'
            register_secret(c)


def _read_reference(ref: str, environ: Mapping[str, str]) -> tuple[list[str], str | None]:
    """The URLs a reference holds, or the problem that keeps them from us."""
    ref = ref.strip()
    if ref.startswith("env:"):
        name = ref[4:]
        value = environ.get(name, "")
        if not value.strip():
            return [], (
                f"{name} is not set in the service's environment; set it to the apprise URL "
                "(systemd: Environment= or EnvironmentFile=; Windows: the service's environment)"
            )
        return value.split(), None
    path = Path(ref[5:]).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], f"{path} not found; create it with one apprise URL a line, readable only by the service"
    except (OSError, UnicodeDecodeError) as e:
        return [], f"cannot read {path}: {getattr(e, 'strerror', None) or type(e).__name__}"
    urls = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not urls:
        return [], f"{path} holds no URL; write one apprise URL a line"
    return urls, None


def resolve_endpoints(rule: NotifyRule, environ: Mapping[str, str] | None = None) -> list[Endpoint]:
    """The rule's endpoints, in order; a reference that cannot be read is one endpoint with a problem."""
    env = os.environ if environ is None else environ
    out: list[Endpoint] = []
    for i, ref in enumerate(rule.urls):
        urls, problem = _read_reference(ref, env)
        if problem:
            out.append(Endpoint(id=f"{rule.name}[{i}]", rule=rule.name, source=ref, problem=problem))
        for j, url in enumerate(urls):
            _register_url(url)
            ep_id = f"{rule.name}[{i}]" if j == 0 else f"{rule.name}[{i}.{j}]"
            out.append(Endpoint(id=ep_id, rule=rule.name, source=ref, url=url))
    return out


class _AppriseLog(logging.Handler):
    """Keeps apprise's warnings (the reason a send failed) out of our log and available to :func:`send_message`.

    Apprise logs each failure at warning level; logged through, a dead endpoint would
    write a line per attempt. Its logger stops propagating; the service logs an outage once.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seq = 0
        self.records: collections.deque[tuple[int, str]] = collections.deque(maxlen=100)

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        self.seq += 1
        self.records.append((self.seq, record.getMessage()))

    def mark(self) -> int:
        return self.seq

    def since(self, mark: int) -> list[str]:
        return [m for s, m in list(self.records) if s > mark]


_capture: _AppriseLog | None = None
_capture_lock = threading.Lock()


def _apprise_log() -> _AppriseLog:
    global _capture
    with _capture_lock:
        if _capture is None:
            _capture = _AppriseLog()
            lg = logging.getLogger("apprise")
            lg.addHandler(_capture)
            lg.setLevel(logging.WARNING)
            lg.propagate = False
        return _capture


def send_message(
    ep: Endpoint, title: str, body: str, attach: str | Path | None = None, *, timeout: float = 30.0
) -> str | None:
    """Send one message to one endpoint; ``None`` when it was accepted, else why not (secrets masked).

    The send runs in its own thread and is given up after ``timeout`` seconds, so a
    hanging endpoint never holds up the caller. An attachment that no longer exists is left out.
    """
    if ep.url is None:
        return ep.problem or "no URL"
    import apprise

    capture = _apprise_log()
    mark = capture.mark()
    obj = apprise.Apprise()
    if not obj.add(ep.url):
        return f"apprise does not understand the URL from {ep.source} (scheme '{ep.scheme}'); check it against apprise's documentation"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            att = None
            if attach and Path(attach).is_file():
                att = apprise.AppriseAttachment()
                att.add(str(attach))
            box["ok"] = bool(obj.notify(body=body, title=title, attach=att))
        except Exception as e:  # a plugin bug must not kill the round
            box["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=run, name="notify-send", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return f"no answer within {timeout:g} s (notify.timeout_s)"
    if box.get("ok"):
        return None
    detail = (
        box.get("error") or "; ".join(dict.fromkeys(capture.since(mark))) or "the endpoint did not accept the message"
    )
    from daemon.logging import redact

    return str(redact(detail))[:500]


def test_endpoints(config: Config, environ: Mapping[str, str] | None = None) -> list[tuple[Endpoint, str | None]]:
    """Send a test message to every endpoint of every rule; each endpoint with ``None`` (ok) or the error."""
    host = socket.gethostname()
    out = []
    for rule in config.notify.rule:
        for ep in resolve_endpoints(rule, environ):
            title = f"imageqc test message ({config.site.name})"
            body = (
                f"A test from imageqc on {host}, site {config.site.name}, rule {rule.name} ({ep.source}).\n"
                f"This rule sends: {', '.join(rule.events)}. If you can read this, notifications reach you."
            )
            out.append((ep, send_message(ep, title, body, timeout=config.notify.timeout_s)))
    return out


# ---------------------------------------------------------------------------
# `imageqc notify test`
# ---------------------------------------------------------------------------


def cmd_notify_test(args: argparse.Namespace) -> int:
    from daemon.config import load_config

    cfg = load_config(args.config or os.environ.get(CONFIG_ENV) or None)
    if not cfg.notify.rule:
        print(
            f"imageqc: no notification rules in {cfg.source}; add a [[notify.rule]] (see `imageqc config example`)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    results = test_endpoints(cfg)
    for ep, error in results:
        print(f"{ep.label()}: " + ("OK" if error is None else f"FAILED: {error}"))
    failed = sum(1 for _, e in results if e is not None)
    print(f"{len(results) - failed} of {len(results)} endpoint(s) OK")
    return EXIT_OK if failed == 0 else EXIT_FAILURE


def add_notify_command(sub: Any) -> None:
    """``imageqc notify test [--config F]``."""
    np_ = sub.add_parser("notify", help="Notification tools.", description="Notification tools.")
    nsub = np_.add_subparsers(dest="notify_command", metavar="SUBCOMMAND", parser_class=type(np_))
    nsub.required = True
    nt = nsub.add_parser(
        "test",
        help="Send a test message to every configured notification URL; exit 0 if all arrived, else 1.",
        description="Send a test message to every configured notification URL; exit 0 if all arrived, else 1.",
    )
    nt.add_argument(
        "--config", "-c", metavar="FILE", help="config file (default: $IMAGEQC_CONFIG, else the embedded default)"
    )
    nt.set_defaults(func=cmd_notify_test)
