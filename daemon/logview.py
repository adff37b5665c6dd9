"""Reading the JSON-lines log back: filter, pretty-print, follow.

Backs ``imageqc logs``. Handles rotated files (``imageqc.jsonl.N`` ...
``imageqc.jsonl``, oldest first), lines that are not JSON (printed as they
are), and rotation while following.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from daemon.logging import LEVELS

__all__ = ["LogFilter", "follow_records", "format_record", "read_records"]

_SKIP_KEYS = {"timestamp", "level", "event", "job_id", "chip", "logger"}


@dataclass(frozen=True)
class LogFilter:
    chip: str | None = None
    level: str | None = None
    job_id: int | None = None

    def __call__(self, rec: dict[str, Any]) -> bool:
        if self.chip and rec.get("chip") != self.chip:
            return False
        if self.job_id is not None and rec.get("job_id") != self.job_id:
            return False
        if self.level:
            want = LEVELS.get(self.level, 0)
            got = LEVELS.get(str(rec.get("level", "info")).lower(), 20)
            if got < want:
                return False
        return True


def _files(path: Path) -> list[Path]:
    rotated = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.exists() else [])


def _parse(line: str) -> dict[str, Any]:
    line = line.rstrip("\n")
    try:
        rec = json.loads(line)
        if isinstance(rec, dict):
            return rec
    except ValueError:
        pass
    return {"event": line, "level": "info", "_raw": True}


def read_records(path: Path, flt: LogFilter = LogFilter()) -> Iterator[dict[str, Any]]:
    for f in _files(path):
        with f.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    rec = _parse(line)
                    if flt(rec):
                        yield rec


def follow_records(
    path: Path,
    flt: LogFilter = LogFilter(),
    *,
    stop: Callable[[], bool] = lambda: False,
    interval: float = 0.5,
) -> Iterator[dict[str, Any]]:
    """New records as they are written (from the current end), across rotations."""
    fh: TextIO | None = None
    ident: tuple[int, int] | None = None
    while not stop():
        if fh is None and path.exists():
            fh = path.open(encoding="utf-8", errors="replace")
            if ident is None:  # first open: start at the end, like tail -f
                fh.seek(0, 2)
            st = path.stat()
            ident = (st.st_ino, st.st_dev)
        if fh is not None:
            line = fh.readline()
            if line:
                if line.strip():
                    rec = _parse(line)
                    if flt(rec):
                        yield rec
                continue
            try:
                st = path.stat()
                rotated = (st.st_ino, st.st_dev) != ident or st.st_size < fh.tell()
            except FileNotFoundError:
                rotated = True
            if rotated:  # read the new file from its start
                fh.close()
                fh = None
                ident = (0, 0)
                continue
        time.sleep(interval)
    if fh is not None:
        fh.close()


def format_record(rec: dict[str, Any]) -> str:
    """One readable line: time, level, [job chip], event, key=value..."""
    if rec.get("_raw"):
        return str(rec.get("event", ""))
    ts = str(rec.get("timestamp", ""))[:19].replace("T", " ")
    level = str(rec.get("level", "")).upper()[:5]
    who = ""
    if rec.get("job_id") is not None or rec.get("chip"):
        who = f"[{rec.get('job_id', '-')} {rec.get('chip') or '-'}] "
    extras = " ".join(f"{k}={_short(v)}" for k, v in rec.items() if k not in _SKIP_KEYS and k != "exception")
    line = f"{ts} {level:<5} {who}{rec.get('event', '')}"
    if extras:
        line += f"  {extras}"
    if rec.get("exception"):
        line += "\n" + str(rec["exception"])
    return line


def _short(v: Any) -> str:
    """A value as written on the line: strings bare, the rest as JSON; never cut."""
    return v if isinstance(v, str) else json.dumps(v, default=str)
