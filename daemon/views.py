"""Pieces the human views (`status`, `jobs`, `show`, `uploads`, `qc`, `demo`) are built from.

Nothing a person needs is ever cut: a long value wraps at the console's width
under its own column (words first, a path or a long word folded), so the
reason and the advice that follows it are always read whole. The console is
rich's: colour on a terminal, plain text when the output is a pipe or a file;
its width is the terminal's, else ``$COLUMNS``, else 80.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from daemon.naming import shown_name

__all__ = [
    "LABEL_WIDTH",
    "OUTCOME_WORDS",
    "check_line",
    "check_outcome",
    "check_value",
    "console",
    "field",
    "human_age",
    "human_bytes",
    "job_label",
    "verdict_markup",
    "whole",
]

#: Width of the label column of labelled lines ("verdict   fail").
LABEL_WIDTH = 10


def console() -> Any:
    """A rich console for the human views (see the module text for width and colour)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, emoji=False)


def field(con: Any, label: str, value: Any, *, markup: bool = False, indent: int = 0) -> None:
    """Print ``label`` then ``value``, the value wrapped under itself, never cut.

    ``value`` is plain text unless ``markup`` (rich markup, for colour words).
    """
    from rich.text import Text

    lead = max(LABEL_WIDTH, indent + len(label) + 1)
    body = (
        Text.from_markup(shown_name(str(value))) if markup else Text("-" if value is None else shown_name(str(value)))
    )
    lines = body.wrap(con, max(20, con.width - lead), overflow="fold") if body.plain else [Text("")]
    for i, line in enumerate(lines):
        head = (" " * indent + label).ljust(lead) if i == 0 else " " * lead
        line.rstrip()
        con.print(Text(head) + line if line.plain else Text(head.rstrip()), soft_wrap=True)


def whole(con: Any, label: str, value: Any) -> None:
    """Print ``label`` and ``value`` on one line however long: a path to copy (the terminal wraps it, the copy stays whole)."""
    from rich.text import Text

    con.print(Text(label.ljust(max(LABEL_WIDTH, len(label) + 1)) + shown_name(str(value))), soft_wrap=True)


def verdict_markup(verdict: str | None) -> str:
    """The verdict word in its colour: pass green, fail bold red."""
    if verdict == "pass":
        return "[green]PASS[/]"
    if verdict == "fail":
        return "[bold red]FAIL[/]"
    return verdict or "-"


def job_label(state: str, verdict: str | None) -> str:
    """What a technician should read for a job (rich markup).

    A QC verdict that ended the job is named as such: a failing chip reads
    "QC FAIL" whatever happened after (``skipped`` only means that no upload is
    configured, so the verdict is all there is; ``done`` adds "uploaded").
    """
    if state in ("skipped", "done") and verdict in ("pass", "fail"):
        word = "[bold red]QC FAIL[/]" if verdict == "fail" else "[green]QC pass[/]"
        return word + (", uploaded" if state == "done" else "")
    if state == "failed":
        return "[red]failed[/]"
    return state


#: What a judged metric meant for the verdict, as every view words it.
OUTCOME_WORDS = {"pass": "pass", "fail": "FAIL", "advisory": "below (advisory: does not fail QC)"}


def check_value(c: Mapping[str, Any]) -> str:
    """A judged metric's measured value as a person reads it (the report's ``checks`` entries)."""
    value = c.get("value")
    if c.get("detail"):
        return str(c["detail"])
    if value is None:
        return "n/a"
    return f"{value:.0f}" if abs(float(value)) >= 10 else f"{value:.3g}"


def check_outcome(c: Mapping[str, Any]) -> str:
    """``pass``, ``fail`` (a required metric below its threshold) or ``advisory`` (below, but not required)."""
    if c.get("passed"):
        return "pass"
    return "fail" if c.get("required", True) else "advisory"


def human_bytes(n: float | None) -> str:
    """1.2 GB (powers of 1000); ``?`` when unknown."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def human_age(seconds: float, *, short: bool = False) -> str:
    """A duration as "42 s", "12 min", "3.5 h", "2.0 days" (``short``: "42s", "12m", "3.5h", "2d")."""
    s = max(0.0, float(seconds))
    for limit, div, long_unit, short_unit, fmt in (
        (90, 1, " s", "s", ".0f"),
        (5400, 60, " min", "m", ".0f"),
        (2 * 86400, 3600, " h", "h", ".1f"),
    ):
        if s < limit:
            return f"{s / div:{fmt}}{short_unit if short else long_unit}"
    return f"{s / 86400:.0f}d" if short else f"{s / 86400:.1f} days"


def check_line(c: Mapping[str, Any]) -> str:
    """One judged metric as a line of rich markup: image, value, threshold, result."""
    from rich.markup import escape

    style = {"pass": "green", "fail": "bold red", "advisory": "yellow"}[check_outcome(c)]
    result = f"[{style}]{OUTCOME_WORDS[check_outcome(c)]}[/]"
    return f"{escape(str(c.get('image', '')))}: {escape(check_value(c))} (needs {escape(str(c.get('threshold', '')))}) {result}"
