"""Upload policy per site: what goes where, when, how fast and how often it is retried.

Pure rules with time passed in, so tests need no clock patching:

* :func:`kinds_for_mode` - ``none|inputs|outputs|all`` -> the kinds uploaded;
* :func:`render_key` - ``key_template`` -> a clean remote key;
* :class:`UploadWindow` - a daily window such as ``20:00-06:00`` (local time);
  its next opening comes from an APScheduler cron trigger;
* :func:`retrying` - retries transient errors after :func:`daemon.clock.backoff`;
  permanent errors are never retried.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, TypeVar

from daemon.clock import backoff
from daemon.config import parse_window
from daemon.errors import TransientUploadError

__all__ = [
    "KINDS",
    "UploadWindow",
    "kinds_for_mode",
    "render_key",
    "retrying",
    "run_id",
]

T = TypeVar("T")

#: The two kinds of files a job uploads.
KINDS = ("inputs", "outputs")

_MODES = {"none": (), "inputs": ("inputs",), "outputs": ("outputs",), "all": ("inputs", "outputs")}


def kinds_for_mode(mode: str) -> tuple[str, ...]:
    """``"all"`` -> ``("inputs", "outputs")``; ``"none"`` -> ``()``."""
    try:
        return _MODES[mode]
    except KeyError:
        msg = f"unknown upload mode {mode!r}; use none, inputs, outputs or all"
        raise ValueError(msg) from None


_ARCHIVE_NAME = re.compile(r"^(?P<chip>.+)_(?P<date>\d{8})_(?P<time>\d{6})_(?P<version>[^_]+)$")


def run_id(chip: str, archive: str | None, created_at: float, tz: tzinfo | None = None) -> tuple[str, str]:
    """``(run, date)`` of a QC run: the archive's stem, or ``<chip>_<YYYYMMDD>_<HHMMSS>``.

    ``date`` (YYYYMMDD) comes from the archive name when it has one, else
    from the result's creation time in local time.
    """
    if archive:
        name = Path(archive).name
        stem = name[: -len(".tar.gz")] if name.endswith(".tar.gz") else Path(name).stem
        m = _ARCHIVE_NAME.match(stem)
        if m:
            return stem, m.group("date")
        when = datetime.fromtimestamp(created_at, tz).astimezone(tz)
        return stem, when.strftime("%Y%m%d")
    when = datetime.fromtimestamp(created_at, tz).astimezone(tz)
    return f"{chip}_{when:%Y%m%d_%H%M%S}", when.strftime("%Y%m%d")


def _escape_bytes(text: str) -> str:
    """Bytes of a name that are not UTF-8 (lone surrogates from ``os.fsdecode``) as ``%NN``: keys must be UTF-8."""
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    return "".join(f"%{ord(ch) - 0xDC00:02X}" if "\udc80" <= ch <= "\udcff" else ch for ch in text)


def render_key(template: str, **fields: str) -> str:
    """Fill ``key_template`` and normalise it to ``a/b/c`` (no empty, ``.`` or ``..`` parts).

    Fields: prefix, site, chip, run, name, kind, date. An empty prefix simply
    disappears; back-slashes become slashes; bytes of a name that are not
    UTF-8 become ``%NN`` (``Run\\xff`` -> ``Run%FF``).
    """
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    missing = used - set(fields)
    if missing:
        msg = f"key_template needs {', '.join(sorted(missing))}, which the upload does not have"
        raise ValueError(msg)
    text = _escape_bytes(template.format(**fields).replace("\\", "/"))
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        msg = f"key {text!r} contains '..'; fix key_template or the file names"
        raise ValueError(msg)
    if not parts:
        msg = f"key_template {template!r} gives an empty key"
        raise ValueError(msg)
    return "/".join(parts)


@dataclass(frozen=True)
class UploadWindow:
    """A daily window in local time; ``end`` may be past midnight (``20:00-06:00``).

    ``start``/``end`` are minutes after midnight (``end`` up to 1440).
    """

    start: int
    end: int
    tz: tzinfo | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str, tz: tzinfo | None = None) -> UploadWindow | None:
        parsed = parse_window(text)
        return None if parsed is None else cls(parsed[0], parsed[1], tz, text.strip())

    def _zone(self) -> tzinfo:
        if self.tz is not None:
            return self.tz
        from tzlocal import get_localzone

        return get_localzone()

    def _local(self, now: float) -> datetime:
        return datetime.fromtimestamp(now, self._zone())

    def is_open(self, now: float) -> bool:
        t = self._local(now)
        minute = t.hour * 60 + t.minute + t.second / 60
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def next_open(self, now: float) -> float:
        """When the window next opens (``now`` if it is open)."""
        if self.is_open(now):
            return now
        return self._next_fire(now, self.start)

    def next_close(self, now: float) -> float:
        """When the window next closes (from inside it) or the end after the next opening."""
        start = self.next_open(now)
        return self._next_fire(start, self.end % 1440)

    def _next_fire(self, now: float, minute: int) -> float:
        from apscheduler.triggers.cron import CronTrigger

        trigger = CronTrigger(hour=minute // 60, minute=minute % 60, timezone=self._zone())
        fire: datetime | None = trigger.get_next_fire_time(None, self._local(now) + timedelta(microseconds=1))
        assert fire is not None
        return fire.timestamp()


def retrying(
    fn: Callable[[], T],
    *,
    attempts: int,
    base: float,
    cap: float,
    wait: Callable[[float], Any],
    rng: random.Random | None = None,
    on_retry: Callable[[int, float, TransientUploadError], None] = lambda n, d, e: None,
) -> T:
    """Call ``fn``; on :class:`TransientUploadError` wait with :func:`backoff` and try again.

    At most ``attempts`` calls; the last error propagates. Anything else
    (permanent errors, :class:`~daemon.upload.base.Interrupted`) propagates at once.
    """
    for n in range(1, attempts + 1):
        try:
            return fn()
        except TransientUploadError as e:
            if n >= attempts:
                raise
            delay = backoff(n, base=base, cap=cap, rng=rng)
            on_retry(n, delay, e)
            wait(delay)
    raise AssertionError("unreachable")  # pragma: no cover
