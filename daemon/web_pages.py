"""The HTML of the read-only status page (daemon/web.py serves it).

Plain HTML and one style sheet (``/style.css``): no script, no form, nothing
a visitor can change. Every value from the store, the config or a report goes
through :func:`html.escape`. Each page reloads itself (``<meta http-equiv=refresh>``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote

from daemon.store import Event, Job, JobState
from daemon.views import (
    OUTCOME_WORDS,
    check_outcome,
    check_value,
    human_age,
    human_bytes,
)

__all__ = ["STYLE", "job_page", "message_page", "status_page"]

STYLE = """\
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em 0.2em 0; text-align: left; vertical-align: top; }
th { color: #555; font-weight: 600; }
.pass { color: #17702a; font-weight: 600; } .fail { color: #b00020; font-weight: 700; }
.advisory { color: #8a6d00; } .muted { color: #777; }
img.picture { max-width: 45%; margin: 0.5em 0.5em 0 0; border: 1px solid #ccc; }
"""


def _h(value: Any) -> str:
    """Escaped text of any value ('-' for None)."""
    return "-" if value is None else escape(str(value), quote=True)


def _ts(at: float | None) -> str:
    return "-" if at is None else datetime.fromtimestamp(float(at)).strftime("%Y-%m-%d %H:%M:%S")


def _ago(at: float | None, now: float) -> str:
    return "never" if at is None else human_age(now - float(at)) + " ago"


def _verdict(v: str | None) -> str:
    if v == "pass":
        return '<span class="pass">PASS</span>'
    if v == "fail":
        return '<span class="fail">FAIL</span>'
    return _h(v)


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of cells that are already HTML (escaped by the caller)."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{_h(c)}</th>" for c in head) + f"</tr>{body}</table>"


def _page(title: str, body: str, refresh_s: int | None) -> str:
    meta = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{meta}'
        f'<title>{_h(title)}</title><link rel="stylesheet" href="/style.css"></head>'
        f"<body>{body}</body></html>"
    )


def message_page(title: str, text: str) -> str:
    """A short page for errors (404, 401, ...)."""
    return _page(title, f'<h1>{_h(title)}</h1><p>{_h(text)}</p><p><a href="/">status</a></p>', None)


def _job_link(job_id: Any) -> str:
    return f'<a href="/jobs/{quote(str(job_id))}">#{_h(job_id)}</a>'


def status_page(st: Mapping[str, Any], *, refresh_s: int, now: float | None = None) -> str:
    """What ``imageqc status`` shows, from :func:`daemon.status.collect_status`'s report."""
    now = time.time() if now is None else now
    svc = st.get("service", {})
    parts = ["<h1>imageqc</h1>"]
    if svc.get("running"):
        line = (
            f'<span class="pass">running</span> (pid {_h(svc.get("pid"))} on {_h(svc.get("host"))}, '
            f"since {_h(_ts(svc.get('started_at')))}, v{_h(svc.get('version'))})"
        )
    else:
        line = f'<span class="fail">not running</span>: {_h(svc.get("reason") or "")}'
    rows = [["service", line], ["state folder", _h(st.get("state_dir"))]]
    if svc.get("last_tick_error"):
        rows.append(["last error", _h(svc["last_tick_error"])])
    counts = st.get("counts", {})
    rows.append(
        ["jobs", _h("  ".join(f"{s.value} {counts[s.value]}" for s in JobState if counts.get(s.value)) or "none yet")]
    )
    parts.append(_table(["", ""], rows))
    if st.get("active"):
        parts.append("<h2>Active</h2>")
        parts.append(
            _table(
                ["job", "chip", "state", "stage", "progress", "started"],
                (
                    [
                        _job_link(a["job_id"]),
                        _h(a.get("chip")),
                        _h(a.get("state")),
                        _h(a.get("stage")),
                        "-" if a.get("progress") is None else _h(f"{a['progress']:.0f}%"),
                        _h(_ago(a.get("started_at"), now)),
                    ]
                    for a in st["active"]
                ),
            )
        )
    parts += _waiting(st.get("waiting") or {}, now)
    parts += _live(st.get("live") or [], now)
    if st.get("recent_verdicts"):
        parts.append("<h2>Recent QC</h2>")
        parts.append(
            _table(
                ["job", "chip", "verdict", "when", "first reason"],
                (
                    [
                        _job_link(v["job_id"]),
                        _h(v.get("chip")),
                        _verdict(v.get("verdict")),
                        _h(_ago(v.get("at"), now)),
                        _h(v.get("reason") or ""),
                    ]
                    for v in st["recent_verdicts"]
                ),
            )
        )
    if st.get("recent_errors"):
        parts.append("<h2>Recent errors</h2>")
        parts.append(
            _table(
                ["job", "chip", "when", "error", "retry"],
                (
                    [
                        _job_link(e["job_id"]),
                        _h(e.get("chip")),
                        _h(_ago(e.get("at"), now)),
                        _h(e.get("error")),
                        _h(_ts(e["retry_at"])) if e.get("retry_at") else "-",
                    ]
                    for e in st["recent_errors"]
                ),
            )
        )
    parts.append("<h2>Watch folders</h2>")
    if st.get("watchers"):
        parts.append(
            _table(
                ["folder", "observer", "health", "rescanned", "files", "settling"],
                (
                    [
                        _h(w.get("path")),
                        _h(w.get("observer")),
                        _h(w.get("health")),
                        _h(_ago(w.get("last_rescan"), now)),
                        _h(w.get("files")),
                        _h(w.get("pending", 0)),
                    ]
                    for w in st["watchers"]
                ),
            )
        )
    else:
        parts.append(
            _table(
                ["folder", "exists"],
                (
                    [_h(w["path"]), "yes" if w.get("exists") else '<span class="fail">missing</span>']
                    for w in st.get("disk", {}).get("watch", [])
                ),
            )
        )
    targets = (st.get("uploads") or {}).get("targets", {})
    if targets:
        parts.append("<h2>Uploads</h2>")
        parts.append(
            _table(
                ["target", "files waiting", "bytes waiting", "rate", "window"],
                (
                    [
                        _h(name),
                        _h(u.get("files", 0)),
                        _h(human_bytes(u.get("bytes"))),
                        _h(human_bytes(u.get("rate_bps")) + "/s"),
                        _h(u.get("window") or "any time")
                        + ("" if u.get("open", True) else ' <span class="muted">(closed)</span>'),
                    ]
                    for name, u in targets.items()
                ),
            )
        )
    n = st.get("notifications") or {}
    if n.get("rules") or n.get("waiting"):
        parts.append("<h2>Notifications</h2>")
        rows = [["waiting", _h(n.get("waiting", 0))], ["given up", _h(n.get("expired", 0))]]
        if n.get("last_error"):
            rows.append(["last error", _h(f"{_ago(n.get('last_error_at'), now)}: {n['last_error']}")])
        parts.append(_table(["", ""], rows))
    disk = st.get("disk", {})
    parts.append("<h2>Disk</h2>")
    drows = [
        [
            "state folder",
            _h(disk.get("state_dir", {}).get("path")),
            _h(human_bytes(disk.get("state_dir", {}).get("free_bytes"))),
        ]
    ]
    drows += [
        ["watch", _h(w["path"]), _h(human_bytes(w.get("free_bytes")))] for w in disk.get("watch", []) if w.get("exists")
    ]
    parts.append(_table(["", "folder", "free"], drows))
    parts.append(
        f'<p class="muted">Read-only view; refreshes every {int(refresh_s)} s. Generated {_h(_ts(now))}. '
        '<a href="/metrics">metrics</a></p>'
    )
    return _page("imageqc status", "".join(parts), refresh_s)


def _live(sets: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    """Tile folders live QC follows: progress and early warnings (as `imageqc status` lists them)."""
    if not sets:
        return []
    rows = []
    for s in sets:
        r, c = s.get("grid") or (0, 0)
        warnings = "; ".join(f"{w.get('code')}: {w.get('reason')}" for w in s.get("warnings") or []) or "-"
        state = "scanning" if s.get("finished_at") is None else f"ended {_ago(s.get('finished_at'), now)}"
        rows.append(
            [
                _h(s.get("chip")),
                _h(state),
                _h(f"{s.get('tiles_seen', 0)} of {r * c if s.get('grid_known') else '?'}"),
                _h(
                    f"{s.get('fovs_checked', 0)} ({s.get('fovs_with_lines', 0)} with lines)"
                    if s.get("fov_checks", True)
                    else f"{s.get('fovs_checked', 0)} registered (IF: no per-FOV checks)"
                ),
                _h(warnings),
                _h(s.get("folder")),
            ]
        )
    return ["<h2>Live QC</h2>", _table(["chip", "scan", "tiles", "FOVs checked", "early warnings", "folder"], rows)]


def _waiting(w: Mapping[str, Any], now: float) -> list[str]:
    """Sets not queued yet and why, and names ignored as not chip serials (as `imageqc status` lists them)."""
    sets, names = w.get("sets") or [], w.get("misnamed") or []
    out: list[str] = []
    if sets:
        out.append("<h2>Waiting</h2>")
        out.append(
            _table(
                ["chip", "for", "stage", "why", "folder"],
                (
                    [
                        _h(s.get("chip")),
                        _h(_ago(s.get("since"), now).replace(" ago", "")),
                        _h(s.get("stage")),
                        _h(s.get("reason")),
                        _h(s.get("folder")),
                    ]
                    for s in sets
                ),
            )
        )
        if w.get("sets_total", 0) > len(sets):
            out.append(f'<p class="muted">... and {_h(w["sets_total"] - len(sets))} more set(s)</p>')
    if names:
        out.append("<h2>Ignored names</h2>")
        out.append(_table(["path", "why"], ([_h(n.get("path")), _h(n.get("reason"))] for n in names)))
        if w.get("misnamed_total", 0) > len(names):
            out.append(f'<p class="muted">... and {_h(w["misnamed_total"] - len(names))} more ignored name(s)</p>')
    return out


def _check_row(c: Mapping[str, Any]) -> list[str]:
    outcome = check_outcome(c)
    result = f'<span class="{outcome}">{_h(OUTCOME_WORDS[outcome])}</span>'
    return [_h(c.get("metric")), _h(c.get("image")), _h(check_value(c)), _h(c.get("threshold")), result]


def job_page(
    job: Job,
    result: Mapping[str, Any] | None,
    events: Sequence[Event],
    pictures: Sequence[str],
    *,
    refresh_s: int,
    now: float | None = None,
) -> str:
    """One job: state, verdict with every judged metric, reasons, history and the pictures."""
    now = time.time() if now is None else now
    parts = [f"<h1>Job #{_h(job.id)}: {_h(job.chip)}</h1>", '<p><a href="/">back to status</a></p>']
    rows = [["state", _h(job.state)], ["created", _h(_ts(job.created_at))], ["attempts", _h(job.attempts)]]
    if job.stage:
        pct = "" if job.progress is None else f" {job.progress:.0f}%"
        rows.append(["stage", _h(f"{job.stage}{pct}")])
    if job.error:
        rows.append(["error", _h(job.error)])
    report = (result or {}).get("report") or {}
    if result is not None:
        rows.append(["verdict", _verdict(result.get("verdict"))])
        rows.append(["stain", _h(report.get("stain"))])
        rows.append(["output", _h(result.get("output_dir"))])
    parts.append(_table(["", ""], rows))
    if report.get("reasons"):
        parts.append("<h2>Reasons</h2><ul>" + "".join(f"<li>{_h(r)}</li>" for r in report["reasons"]) + "</ul>")
    if report.get("checks"):
        parts.append("<h2>Metrics</h2>")
        parts.append(
            _table(["metric", "image", "value", "threshold", "result"], (_check_row(c) for c in report["checks"]))
        )
    if pictures:
        parts.append("<h2>Pictures</h2>")
        parts.append(
            "".join(
                f'<a href="/pictures/{job.id}/{quote(p)}"><img class="picture" src="/pictures/{job.id}/{quote(p)}" '
                f'alt="{_h(p)}"></a>'
                for p in pictures
            )
        )
    parts.append("<h2>History</h2>")
    parts.append(
        _table(
            ["when", "event", "message"],
            (
                [
                    _h(_ts(e.at)),
                    _h(f"{e.from_state or ''} -> {e.to_state}" if e.to_state else e.kind),
                    _h(e.message or ""),
                ]
                for e in events
            ),
        )
    )
    parts.append(f'<p class="muted">Read-only view; refreshes every {int(refresh_s)} s.</p>')
    return _page(f"imageqc job {job.id}", "".join(parts), refresh_s)
