"""Logging: structlog to a rotating JSON-lines file plus readable console output.

Every line carries the job id and chip when code runs inside
``bind_job(job_id, chip)``. Secrets never reach a handler: values of keys that
look secret are masked, and strings registered with :func:`register_secret`
(credentials read at run time) are scrubbed from every field.

All global configuration happens in :func:`configure_logging`, once per
process (the service, a worker child, the CLI).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import re
import sys
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import Processor

from daemon.naming import shown_name

__all__ = ["LEVELS", "bind_job", "configure_logging", "get_logger", "redact", "register_secret"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_SECRET_KEY = re.compile(
    r"(?i)(secret|password|passwd|token|access[_-]?key|private[_-]?key|authorization|credential_value)"
)
_URL_USERINFO = re.compile(r"(://)([^/@\s:]+):([^/@\s]+)@")
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Never log this string: it is replaced by ``***`` wherever it appears."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def _scrub(text: str) -> str:
    text = _URL_USERINFO.sub(r"\1\2:***@", text)
    for s in _secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


def redact(value: Any, key: str = "") -> Any:
    """Mask secrets in a value (recursively for dicts and lists)."""
    if key and _SECRET_KEY.search(key) and value not in (None, "", False):
        return "***"
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def _redact_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event_dict):
        event_dict[k] = redact(event_dict[k], k)
    return event_dict


def _shown(value: Any) -> Any:
    if isinstance(value, str):
        return shown_name(value)
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    return value


def _names_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Names that are not UTF-8 (a folder from another code page) are written escaped (``Run\\xff``), never dropped."""
    for k in list(event_dict):
        event_dict[k] = _shown(event_dict[k])
    return event_dict


def _exc_scrub_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    exc = event_dict.get("exception")
    if isinstance(exc, str):
        event_dict["exception"] = _scrub(exc)
    return event_dict


_FIRST = ("timestamp", "level", "event", "job_id", "chip", "logger")


def _order_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    out = {k: event_dict[k] for k in _FIRST if k in event_dict}
    out.update((k, v) for k, v in event_dict.items() if k not in out)
    return out


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


class _LogFile(logging.handlers.RotatingFileHandler):
    """The JSON-lines log file.

    A write that fails with an OSError (disk full, share gone) is said once on
    stderr, not as a traceback per line; lines are dropped until a write
    succeeds again, which is said too.
    """

    failing = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)
        if self.failing and not self._failed:
            self.failing = False
            sys.stderr.write(f"imageqc: the log file {self.baseFilename} is writable again\n")

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        self._failed = True
        if self.stream is not None:  # reopened by the next line (the handler was made with delay=True)
            with contextlib.suppress(OSError, ValueError):
                self.stream.close()
            self.stream = None
        if not self.failing:
            self.failing = True
            sys.stderr.write(
                f"imageqc: cannot write the log file {self.baseFilename} ({exc.strerror or exc}); "
                "log lines are dropped until it is writable again (free space there)\n"
            )


class _StoppedEmitterFilter(logging.Filter):
    """Drop watchdog's "queue_events() called when the thread is inactive" error.

    inotify delivers events already read while an observer is being stopped (the
    service stopping, or the watcher restarting an observer); watchdog logs that as an
    error although nothing is lost: the rescan that follows is the source of truth.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


def configure_logging(
    *,
    level: str = "info",
    file: str | Path | None = None,
    max_bytes: int = 10_000_000,
    backups: int = 5,
    console: str = "auto",
    stream: Any = None,
) -> None:
    """Set up structlog and the stdlib handlers for this process.

    Parameters
    ----------
    level : str
        Lowest level written (debug, info, warning, error).
    file : path, optional
        The JSON-lines log; rotated at ``max_bytes`` keeping ``backups`` files.
    console : {"auto", "pretty", "json", "off"}
        ``auto`` is pretty on a terminal and JSON otherwise.
    """
    stream = sys.stderr if stream is None else stream
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        with contextlib.suppress(Exception):
            h.close()
    root.setLevel(LEVELS.get(level, logging.INFO))

    pre_chain = [*_SHARED, structlog.stdlib.ExtraAdder()]
    final_json: list[Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,  # a string traceback: never frame locals
        _redact_processor,
        _names_processor,
        _order_processor,
        structlog.processors.JSONRenderer(sort_keys=False, default=str),
    ]
    if file is not None:
        path = Path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = _LogFile(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        fh.setFormatter(structlog.stdlib.ProcessorFormatter(processors=final_json, foreign_pre_chain=pre_chain))
        root.addHandler(fh)
    if console == "auto":
        console = "pretty" if getattr(stream, "isatty", lambda: False)() else "json"
    if console != "off":
        ch = logging.StreamHandler(stream)
        if console == "pretty":
            procs: list[Processor] = [
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redact_processor,
                _names_processor,
                _exc_scrub_processor,
                structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)()),
            ]
        else:
            procs = final_json
        ch.setFormatter(structlog.stdlib.ProcessorFormatter(processors=procs, foreign_pre_chain=pre_chain))
        root.addHandler(ch)
    # third-party chatter stays at warning unless we debug
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "apscheduler", "watchdog", "oss2"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    inotify = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _StoppedEmitterFilter) for f in inotify.filters):
        inotify.addFilter(_StoppedEmitterFilter())

    structlog.configure(
        processors=[
            *_SHARED,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "imageqc") -> Any:
    return structlog.get_logger(name)


@contextlib.contextmanager
def bind_job(job_id: int | None, chip: str | None) -> Iterator[None]:
    """Every log line inside carries ``job_id`` and ``chip``."""
    tokens = structlog.contextvars.bind_contextvars(job_id=job_id, chip=chip)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
