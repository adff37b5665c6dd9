"""The ``imageqc`` command. Thin: it calls library code and maps errors to exit codes.

Exit codes: 0 ok, 1 operational failure, 2 usage or configuration error
(``imageqc qc`` adds 3 for a QC fail). ``--json`` outputs are stable: keys may
be added, never renamed; each carries a ``schema`` name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape

from daemon import __version__
from daemon.config import Config, config_to_dict, load_config
from daemon.errors import DaemonError, JobNotFound
from daemon.exitcodes import CONFIG_ENV, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from daemon.naming import shown_name
from daemon.store import JobState, Store
from daemon.views import (
    check_line,
    field,
    human_age,
    human_bytes,
    job_label,
    verdict_markup,
    whole,
)

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


# ---------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------


def _console() -> Any:
    from daemon.views import console

    return console()


def _finite(obj: Any) -> Any:
    """``obj`` with every float that is not a finite number (a time an old recovery stamped) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _print_json(obj: Any) -> None:
    """Strict JSON: never ``Infinity`` or ``NaN`` (null instead)."""
    sys.stdout.write(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")


def _ts(t: float | None) -> str:
    if not t or not math.isfinite(t):
        return "-"
    try:
        return datetime.fromtimestamp(t, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # a time beyond what the platform can show
        return "-"


def _ago(t: float | None, now: float) -> str:
    if not t or not math.isfinite(t):
        return "-"
    return human_age(now - t, short=True) + " ago"


def _member_where(member: dict[str, Any], root: str) -> str:
    """A scan-set member as ``show`` lists it: its path under the watch root (its name when not under it)."""
    path = str(member.get("path") or "")
    if path and root and (path + os.sep).startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, root)
    return str(member.get("name") or path)


def _config(args: argparse.Namespace) -> Config:
    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or None
    return load_config(path)


def _job_id(text: str) -> int:
    try:
        return int(text.lstrip("#"))
    except ValueError:
        raise JobNotFound(text) from None


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.logging import configure_logging
    from daemon.service import Daemon, default_components, exit_past_abandoned_threads

    cfg = _config(args)
    lg = cfg.logging
    configure_logging(level=lg.level, file=cfg.log_file, max_bytes=lg.max_bytes, backups=lg.backups, console=lg.console)
    if cfg.source == "<embedded default>":  # `make run` on a fresh checkout: create ./inbox
        for w in cfg.watch:
            w.path.mkdir(parents=True, exist_ok=True)
    from daemon.store import check_database_file

    check_database_file(cfg.database_path)  # before any connection of this process exists
    daemon = Daemon(cfg, components=default_components(cfg), notify=_notifier())
    daemon.run_forever()
    code = EXIT_OK
    if daemon.failure:  # the service stopped itself: a non-zero exit lets systemd restart it
        print(f"imageqc: the service stopped on an error: {daemon.failure}", file=sys.stderr)
        code = EXIT_FAILURE
    exit_past_abandoned_threads(code)
    return code


def _notifier() -> Callable[[str], None] | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        import sdnotify
    except ImportError:  # pragma: no cover - not on Linux
        return None
    n = sdnotify.SystemdNotifier()
    return lambda msg: n.notify(msg)


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.status import collect_status

    cfg = _config(args)
    st = collect_status(cfg)
    if args.json:
        _print_json(st)
        return EXIT_OK
    con = _console()
    now = time.time()
    svc = st["service"]
    if svc.get("running"):
        field(
            con,
            "service",
            f"[green]running[/] (pid {svc.get('pid')} on {escape(str(svc.get('host')))}, "
            f"since {_ts(svc.get('started_at'))}, v{svc.get('version')})",
            markup=True,
        )
    else:
        field(con, "service", f"[red]not running[/]: {escape(str(svc.get('reason') or ''))}", markup=True)
    if svc.get("last_tick_error"):
        field(con, "", f"last error: {svc['last_tick_error']}")
    field(con, "state", st["state_dir"])
    counts = st["counts"]
    order = [s.value for s in JobState]
    field(con, "jobs", "  ".join(f"{s} {counts.get(s, 0)}" for s in order if counts.get(s)) or "none yet")
    if st["active"]:
        from rich.table import Table

        t = Table(title=None, box=None, pad_edge=False, show_edge=False)
        columns: tuple[tuple[str, dict[str, Any]], ...] = (
            ("job", {"justify": "right"}),
            ("chip", {"overflow": "fold"}),
            ("state", {}),
            ("stage", {"overflow": "fold"}),
            ("progress", {"justify": "right"}),
            ("started", {}),
        )
        for col, kw in columns:
            t.add_column(col, **kw)
        for a in st["active"]:
            pct = "-" if a["progress"] is None else f"{a['progress']:.0f}%"
            t.add_row(
                str(a["job_id"]),
                escape(a["chip"]),
                a["state"],
                escape(a["stage"] or "-"),
                pct,
                _ago(a["started_at"], now),
            )
        con.print("active")
        con.print(t)
    for w in st["watchers"]:
        field(con, "watch", f"{w.get('path')}  {w.get('observer', '?')}  {w.get('health', '')}")
        files = "?" if w.get("files") is None else f"{w['files']:,}"
        field(
            con,
            "",
            f"rescanned {_ago(w.get('last_rescan'), now)}, {files} files, {w.get('pending', 0)} set(s) settling",
        )
    _print_waiting(con, st.get("waiting") or {}, now)
    _print_live(con, st.get("live") or [], now)
    if not st["watchers"]:
        for w in st["disk"]["watch"]:
            mark = "" if w["exists"] else "  [red](missing)[/]"
            field(con, "watch", f"{escape(str(w['path']))}{mark}", markup=True)
    for name, u in (st.get("uploads") or {}).get("targets", {}).items():
        line = f"{name}: {u.get('files', 0)} files, {human_bytes(u.get('bytes'))} waiting, {human_bytes(u.get('rate_bps'))}/s"
        if u.get("next_open"):
            line += f", opens {datetime.fromtimestamp(u['next_open']).strftime('%H:%M')}"
        field(con, "upload", line)
    _print_notifications(con, st.get("notifications") or {})
    disk = st["disk"]
    field(
        con,
        "free",
        f"state {human_bytes(disk['state_dir']['free_bytes'])}"
        + "".join(f"; {Path(w['path']).name} {human_bytes(w['free_bytes'])}" for w in disk["watch"] if w["exists"]),
    )
    if st["recent_verdicts"]:
        con.print("recent QC")
        for v in st["recent_verdicts"]:
            reason = f": {escape(v['reason'])}" if v["reason"] else ""
            field(
                con,
                f"#{v['job_id']}",
                f"{escape(v['chip'])} {verdict_markup(v['verdict'])} {_ago(v['at'], now)}{reason}",
                markup=True,
                indent=2,
            )
    if st["recent_errors"]:
        con.print("recent errors")
        for e in st["recent_errors"]:
            retry = (
                f" (retry {_ago(now - (e['retry_at'] - now), now).replace(' ago', '')})" if e.get("retry_at") else ""
            )
            field(con, f"#{e['job_id']}", f"{e['chip']} {_ago(e['at'], now)}: {e['error']}{retry}", indent=2)
    return EXIT_OK


def _print_waiting(con: Any, w: dict[str, Any], now: float) -> None:
    """Sets not queued yet and why; names ignored as not chip serials (from the service's heartbeat)."""
    sets, names = w.get("sets") or [], w.get("misnamed") or []
    if not (sets or names):
        return
    con.print("waiting")
    for s in sets:
        field(
            con,
            s["chip"],
            f"{_ago(s.get('since'), now).replace(' ago', '')} {s.get('stage')}: {s.get('reason')} ({s.get('folder')})",
            indent=2,
        )
    if w.get("sets_total", 0) > len(sets):
        field(
            con,
            "",
            f"... and {w['sets_total'] - len(sets)} more set(s) (imageqc status --json lists the first {len(sets)})",
            indent=2,
        )
    for n in names:
        field(con, "ignored", f"{n['path']}: {n['reason']}", indent=2)
    if w.get("misnamed_total", 0) > len(names):
        field(con, "", f"... and {w['misnamed_total'] - len(names)} more ignored name(s)", indent=2)


def _print_live(con: Any, sets: list[dict[str, Any]], now: float) -> None:
    """Live QC of tile folders still being written: progress, warnings so far (daemon/live.py)."""
    if not sets:
        return
    con.print("live QC")
    for s in sets:
        rows, cols = s.get("grid") or (0, 0)
        grid = f"{rows * cols}" if s.get("grid_known") else f"? (so far {rows} x {cols})"
        state = "scanning" if s.get("finished_at") is None else f"scan ended {_ago(s['finished_at'], now)}"
        checked = (
            f"{s.get('fovs_checked', 0)} FOVs checked ({s.get('fovs_with_lines', 0)} with track lines)"
            if s.get("fov_checks", True)
            else f"{s.get('fovs_checked', 0)} FOVs registered (an IF image: no per-FOV checks)"
        )
        line = f"{state}: {s.get('tiles_seen', 0)} tiles of {grid}, {checked}, {s.get('pairs', 0)} pairs"
        if s.get("skipped"):
            line += f", {s['skipped']} skipped (fell behind)"
        field(con, s.get("chip", "?"), f"{escape(line)} ({escape(str(s.get('folder')))})", markup=True, indent=2)
        for w in s.get("warnings") or []:
            fovs = ", ".join(w.get("fovs") or [])
            text = f"[yellow]warning[/] {escape(w.get('code', ''))} {_ago(w.get('since'), now)}: {escape(w.get('reason', ''))}"
            if fovs:
                text += f" (FOVs {escape(fovs)})"
            field(con, "", text, markup=True, indent=4)
        for c in s.get("cleared") or []:
            field(con, "", f"cleared {c.get('code')} {_ago(c.get('at'), now)}", indent=4)
        if s.get("error"):
            field(con, "", f"live QC error: {s['error']}", indent=4)


def _print_notifications(con: Any, n: dict[str, Any]) -> None:
    """The status line of the notification outbox (daemon/notify.py): waiting messages and the last error."""
    if not (n.get("rules") or n.get("waiting")):
        return
    line = f"{n.get('waiting', 0)} waiting"
    if n.get("expired"):
        line += f" ({n['expired']} given up)"
    if n.get("last_error"):
        line += f", last error {_ago(n.get('last_error_at'), time.time())}: {n['last_error']}"
    field(con, "notify", line)


def _open_store(cfg: Config, *, readonly: bool = True) -> Store:
    return Store(cfg.database_path, readonly=readonly)


def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = _config(args)
    states = [args.state] if args.state else None
    if not cfg.database_path.exists():
        if args.json:
            _print_json({"schema": "imageqc.jobs/1", "jobs": []})
        else:
            print(f"no jobs yet: the service has not run with state folder {cfg.state_dir}")
        return EXIT_OK
    with _open_store(cfg) as store:
        jobs = store.list_jobs(states=states, chip=args.chip, limit=args.limit)
        verdicts = store.verdicts(j.id for j in jobs)
    if args.json:
        docs = []
        for j in jobs:
            verdict, reason = verdicts.get(j.id, (None, None))
            docs.append({**j.as_dict(), "verdict": verdict, "reason": reason})
        _print_json({"schema": "imageqc.jobs/1", "jobs": docs})
        return EXIT_OK
    from rich.table import Table

    con = _console()
    if not jobs:
        con.print("no jobs" + (" matching the filter" if (states or args.chip) else " yet"))
        return EXIT_OK
    now = time.time()
    t = Table(box=None, pad_edge=False, show_edge=False)
    t.add_column("job", justify="right")
    t.add_column("chip", overflow="fold")
    t.add_column("state", overflow="fold")
    t.add_column("try", justify="right")
    t.add_column("updated", no_wrap=True)
    t.add_column("note", overflow="fold", ratio=1)
    for j in jobs:
        verdict, reason = verdicts.get(j.id, (None, None))
        if j.state == "failed":
            note = j.error or ""
        elif j.state in ("running", "uploading") and j.stage:
            note = f"{j.stage} {j.progress:.0f}%" if j.progress is not None else j.stage
        else:
            note = reason or ""
        t.add_row(
            str(j.id),
            escape(j.chip),
            job_label(j.state, verdict),
            str(j.attempts),
            _ago(j.updated_at, now),
            escape(note),
        )
    con.print(t)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    job_id = _job_id(args.job)
    with _open_store(cfg) as store:
        job = store.get_job(job_id)
        scan = store.get_scan_set(job.scan_set_id)
        events = store.events(job_id)
        result = store.get_result(job_id)
        uploads = _uploads_of(store, job_id)
    if args.json:
        _print_json(
            {
                "schema": "imageqc.job/1",
                "job": job.as_dict(),
                "scan_set": {
                    "chip": scan.chip,
                    "root": scan.root,
                    "fingerprint": scan.fingerprint,
                    "members": scan.members,
                },
                "events": [e.as_dict() for e in events],
                "result": result,
                "uploads": uploads,
            }
        )
        return EXIT_OK
    con = _console()
    verdict = result["verdict"] if result else None
    con.print(
        f"job #{job.id}  {escape(shown_name(job.chip))}  [bold]{job_label(job.state, verdict)}[/]  (state {job.state}, attempts {job.attempts})"
    )
    if job.error:
        field(con, "error", job.error)
    field(con, "root", scan.root)
    for m in scan.members:
        field(con, "member", f"{_member_where(m, scan.root)}  {human_bytes(m.get('size'))}", indent=2)
    if result:
        rep = result["report"]
        field(con, "verdict", verdict_markup(result["verdict"]), markup=True)
        for r in rep.get("reasons", []):
            field(con, "reason", r, indent=2)
        if rep.get("checks"):
            for c in rep["checks"]:
                field(con, str(c.get("metric", "")), check_line(c), markup=True, indent=2)
        if result.get("archive"):
            # whole: the path is what a person copies into `saw count --image-tar`
            whole(con, "archive", result["archive"])
            field(con, "", "for SAW: saw count ... --image-tar=<the archive above>")
        for fused in (rep.get("outputs") or {}).get("fused_images", []):
            whole(con, "fused image", str(Path(result["output_dir"] or "") / fused["file"]))
    for u in uploads:
        field(con, "upload", f"{u['target']}: {u['remote_key']} {u['state']}")
    con.print("history")
    for e in events:
        move = f"{e.from_state or '-'} -> {e.to_state}" if e.to_state else e.kind
        field(con, _ts(e.at), f"{move}  {e.message or ''}".rstrip(), indent=2)
    return EXIT_OK


def _uploads_of(store: Store, job_id: int) -> list[dict[str, Any]]:
    with store.db(commit=False) as c:
        rows = c.execute(
            "SELECT target, kind, local_path, remote_key, size, state, bytes_done, error FROM uploads WHERE job_id = ? ORDER BY id",
            (job_id,),
        ).fetchall()
    return [dict(r) for r in rows]


def cmd_uploads(args: argparse.Namespace) -> int:
    from daemon.store import UploadState

    cfg = _config(args)
    rows, chips = [], {}
    if cfg.database_path.exists():
        with _open_store(cfg) as store:
            rows = store.uploads(
                args.job,
                target=args.target,
                states=[args.state] if args.state else None,
                limit=args.limit,
                newest_first=True,
            )
            chips = {j.id: j.chip for j in store.list_jobs()}
    if args.json:
        out = []
        for r in rows:
            d = r.as_dict()
            parts = d.pop("parts") or {}
            d["parts_done"] = len((parts.get("state") or {}).get("parts") or {})
            d["chip"] = chips.get(r.job_id)
            out.append(d)
        _print_json({"schema": "imageqc.uploads/1", "uploads": out})
        return EXIT_OK
    con = _console()
    if not rows:
        con.print("no uploads" + (" matching the filter" if (args.job or args.target or args.state) else " yet"))
        return EXIT_OK
    from rich.table import Table

    t = Table(box=None, pad_edge=False, show_edge=False)
    columns: tuple[tuple[str, dict[str, Any]], ...] = (
        ("job", {"justify": "right"}),
        ("target", {"overflow": "fold"}),
        ("state", {}),
        ("size", {"justify": "right"}),
        ("done", {"justify": "right"}),
        ("key", {"overflow": "fold"}),
    )
    for col, kw in columns:
        t.add_column(col, **kw)
    for r in rows:
        finished = r.state in (UploadState.DONE, UploadState.PRESENT)
        pct = "100%" if finished else (f"{100 * r.bytes_done / r.size:.0f}%" if r.size else "-")
        t.add_row(str(r.job_id), escape(r.target), r.state, human_bytes(r.size), pct, escape(r.remote_key))
    con.print(t)
    for r in rows:
        if r.error and r.state not in (UploadState.DONE, UploadState.PRESENT):
            field(con, f"#{r.job_id}", f"{r.target}: {r.error}", indent=2)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    cfg = _config(args)
    with Store(cfg.database_path, create=False) as store:
        job = store.retry(_job_id(args.job), qc=args.qc)
    print(f"job #{job.id} {job.chip}: {job.state} (the service picks it up at its next tick)")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    cfg = _config(args)
    with Store(cfg.database_path, create=False) as store:
        job = store.cancel(
            _job_id(args.job),
            reason=f"cancelled by {os.environ.get('USER') or os.environ.get('USERNAME') or 'operator'}",
        )
    print(f"job #{job.id} {job.chip}: cancelled (state {job.state}; `imageqc retry {job.id}` runs it again)")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from daemon.logview import LogFilter, follow_records, format_record, read_records

    cfg = _config(args)
    flt = LogFilter(chip=args.chip, level=args.level, job_id=args.job)
    path = cfg.log_file
    if not path.exists() and not args.follow:
        print(f"no log yet at {path}", file=sys.stderr)
        return EXIT_OK

    def emit(rec: dict[str, Any]) -> None:
        print(json.dumps(rec, default=str) if args.json else format_record(rec))

    records = list(read_records(path, flt))
    for rec in records[-args.lines :] if args.lines else records:
        emit(rec)
    if args.follow:
        sys.stdout.flush()
        try:
            for rec in follow_records(path, flt):
                emit(rec)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    data = config_to_dict(cfg, mask=True)
    warnings = _config_warnings(cfg)
    if args.json:
        _print_json({"schema": "imageqc.config/1", "valid": True, "warnings": warnings, "config": data})
        return EXIT_OK
    for w in warnings:
        print(f"{cfg.source}: warning: {w}", file=sys.stderr)
    print(f"{cfg.source}: valid" + (f" ({len(warnings)} warning(s) above)" if warnings else ""))
    print(_to_toml(data))
    return EXIT_OK


def _config_warnings(cfg: Config) -> list[str]:
    """What is allowed but probably not meant: watch folders that do not exist (yet) on this machine."""
    out = []
    for i, w in enumerate(cfg.watch):
        if not w.path.exists():
            out.append(
                f"watch[{i}].path: the folder {w.path} does not exist here; the service waits for it (shown as "
                "'folder missing' in imageqc status) and watches it once it appears. Check the path or the share's mount"
            )
        elif not w.path.is_dir():
            out.append(f"watch[{i}].path: {w.path} is a file, not a folder; nothing will be found there")
    return out


_INLINE_TABLES = {"model_classes"}


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(x)}" for k, x in v.items()) + " }" if v else "{}"
    return json.dumps(v)


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """The effective config as TOML: plain keys first, then tables."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if k == "source":
            continue
        if (isinstance(v, dict) and k not in _INLINE_TABLES) or (
            isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        ):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{prefix}{k}"
        for item in v if isinstance(v, list) else [v]:
            header = f"[[{name}]]" if isinstance(v, list) else f"[{name}]"
            body = _to_toml(item, prefix=f"{name}.")
            out += f"\n\n{header}\n{body}".rstrip() if body.strip() else f"\n\n{header}"
    return out.strip("\n")


def cmd_config_example(args: argparse.Namespace) -> int:
    from daemon.config import example_toml

    sys.stdout.write(example_toml())
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    if args.json:
        _print_json({"schema": "imageqc.version/1", "version": __version__, "python": sys.version.split()[0]})
    else:
        print(f"imageqc {__version__}")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2 with one line
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="imageqc",
        description="Image QC and upload service for Stereo-seq microscope PCs.",
        epilog=f"Commands that read the state folder take --config (or ${CONFIG_ENV}); without it the "
        "embedded default is used: watch ./inbox, state in ./.imageqc/, no upload.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str, *, config: bool = True, json_: bool = False
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if config:
            sp.add_argument(
                "--config",
                "-c",
                metavar="FILE",
                help=f"config file (default: ${CONFIG_ENV}, else the embedded default)",
            )
        if json_:
            sp.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
        sp.set_defaults(func=fn)
        return sp

    add("run", cmd_run, "Run the service in the foreground (Ctrl-C or SIGTERM stops it cleanly).")
    add(
        "status",
        cmd_status,
        "Show the service's state: jobs per state, running jobs, watchers, errors, free space.",
        json_=True,
    )
    sp = add("jobs", cmd_jobs, "List jobs, newest first.", json_=True)
    sp.add_argument("--state", choices=[s.value for s in JobState], help="only jobs in this state")
    sp.add_argument("--chip", help="only jobs of this chip")
    sp.add_argument("--limit", type=int, default=50, help="at most this many (default 50; 0 = all)")
    sp = add("show", cmd_show, "Show one job: members, verdict, uploads and history.", json_=True)
    sp.add_argument("job", help="job id")
    sp = add(
        "uploads", cmd_uploads, "List upload records, newest first: target, state, progress, remote key.", json_=True
    )
    sp.add_argument("--job", type=int, help="only this job's uploads")
    sp.add_argument("--target", help="only this target")
    sp.add_argument(
        "--state",
        choices=["pending", "active", "done", "present", "retry", "failed", "changed"],
        help="only this state",
    )
    sp.add_argument("--limit", type=int, default=50, help="at most this many (default 50; 0 = all)")
    sp = add("retry", cmd_retry, "Run a failed or skipped job again (an upload failure resumes the upload, not QC).")
    sp.add_argument("job", help="job id")
    sp.add_argument(
        "--qc", action="store_true", help="run QC again too, whatever stopped the job (a new verdict replaces the old)"
    )
    sp = add("cancel", cmd_cancel, "Cancel a job (a running one is stopped).")
    sp.add_argument("job", help="job id")
    sp = add("logs", cmd_logs, "Print the service log readably.", json_=True)
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    sp.add_argument("--chip", help="only lines about this chip")
    sp.add_argument("--job", type=int, help="only lines about this job")
    sp.add_argument("--level", choices=["debug", "info", "warning", "error"], help="only this level and above")
    sp.add_argument("-n", "--lines", type=int, default=0, help="only the last N matching lines")
    cp = sub.add_parser("config", help="Configuration tools.", description="Configuration tools.")
    csub = cp.add_subparsers(dest="config_command", metavar="SUBCOMMAND", parser_class=_Parser)
    csub.required = True
    cc = csub.add_parser("check", help="Validate a config file and print the effective settings (secrets masked).")
    cc.add_argument("file", nargs="?", help="the file (default: the embedded default)")
    cc.add_argument("--json", action="store_true", help="machine-readable output")
    cc.set_defaults(func=cmd_config_check)
    ce = csub.add_parser("example", help="Print the commented example config (every setting with its default).")
    ce.set_defaults(func=cmd_config_example)
    add("version", cmd_version, "Print the version.", config=False, json_=True)
    from daemon.demo import add_demo_command
    from daemon.follow import add_follow_command
    from daemon.fusecmd import add_fuse_command
    from daemon.qccmd import add_qc_command

    add_qc_command(sub)
    add_fuse_command(sub)
    add_demo_command(sub)
    add_follow_command(sub)
    _add_service_command(sub)
    _add_notify_command(sub)
    from daemon.fleet import add_fleet_command

    add_fleet_command(sub)
    return p


def _add_service_command(sub: Any) -> None:
    """`imageqc service install|remove|start|stop` (daemon/install.py)."""
    from daemon.install import add_service_parser

    add_service_parser(sub)


def _add_notify_command(sub: Any) -> None:
    """`imageqc notify test` (daemon/notify_send.py)."""
    from daemon.notify_send import add_notify_command

    add_notify_command(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2)
        return int(e.code or 0)
    try:
        return int(args.func(args))
    except DaemonError as e:
        print(f"imageqc: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `imageqc logs | head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
