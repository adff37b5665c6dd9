"""``imageqc follow [--notify]``: new QC verdicts as they happen, in the user's own session.

A Windows service runs in session 0 and cannot show anything on a user's
desktop; a systemd service has no desktop either. So the service only records
verdicts, and this small command, started in the technician's session (by hand,
or at logon: ``imageqc service install --follow-at-logon``), reads the job
database read-only and prints each new verdict; with ``--notify`` it also shows
it as a desktop notification (through desktop-notifier: the freedesktop
notification service on Linux, the Windows notification centre, macOS's).
A verdict is new when the job's verdict changed (``qc_results.verdict_at``):
a job whose QC runs again on the same files with the same verdict, say after
its archive could not be written, is not shown again.

Where no desktop exists (no D-Bus session bus, or Windows session 0) it says so
and exits 2 instead of failing silently.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.exitcodes import EXIT_OK, EXIT_USAGE

__all__ = [
    "AUTOSTART_NAME",
    "Verdict",
    "add_follow_command",
    "autostart_entry",
    "cmd_follow",
    "desktop_problem",
    "new_verdicts",
]

#: The XDG autostart file that starts ``imageqc follow --notify`` at logon (Linux).
AUTOSTART_NAME = "imageqc-follow.desktop"


@dataclass(frozen=True)
class Verdict:
    """One QC verdict as `follow` shows it."""

    job_id: int
    chip: str
    verdict: str
    reason: str
    at: float

    @property
    def word(self) -> str:
        return "QC FAIL" if self.verdict == "fail" else "QC pass"

    @property
    def title(self) -> str:
        return f"{self.word}: {self.chip}"

    def body(self) -> str:
        first = self.reason or ("all required metrics pass" if self.verdict == "pass" else "see the report")
        return f"{first}\n(imageqc show {self.job_id})"


def add_follow_command(sub: Any) -> None:
    sp = sub.add_parser(
        "follow",
        help="Print new QC verdicts as they happen; --notify also shows them as desktop notifications.",
        description="Print each new QC verdict of the service (read-only; run it in your own desktop session). "
        "With --notify each verdict is also a desktop notification, a failing chip an urgent one. "
        "Exit 2 when --notify finds no desktop (a service session, or no D-Bus session bus). Ctrl-C stops it.",
    )
    sp.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="the service's config (default: $IMAGEQC_CONFIG, else the embedded default)",
    )
    sp.add_argument("--notify", action="store_true", help="show each new verdict as a desktop notification")
    sp.add_argument("--fail-only", action="store_true", help="only failing verdicts")
    sp.add_argument(
        "--since",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="also show verdicts of the last MINUTES at start (default 0)",
    )
    sp.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="how often to look, in seconds (default 2)"
    )
    sp.set_defaults(func=cmd_follow)


def desktop_problem(env: dict[str, str] | None = None, *, platform: str = sys.platform) -> str | None:
    """Why desktop notifications cannot be shown from this process, or None when they can be tried."""
    env = dict(os.environ) if env is None else env
    if platform == "win32":
        from windows_service.desktop import session_id

        if session_id() == 0:
            return "this process runs in Windows session 0 (a service's session), which has no desktop"
        return None
    if platform == "darwin":
        return None
    if env.get("DBUS_SESSION_BUS_ADDRESS"):
        return None
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and (Path(runtime) / "bus").exists():
        return None
    return "no desktop session here: no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is not set)"


def new_verdicts(rows: list[dict[str, Any]], seen: set[tuple[int, float]], since: float) -> list[Verdict]:
    """The verdicts in ``rows`` (``Store.recent_verdicts``) newer than ``since`` and not in ``seen``, oldest first."""
    out = []
    for r in sorted(rows, key=lambda r: (r["at"] or 0.0, r["job_id"])):
        key = (int(r["job_id"]), float(r["at"] or 0.0))
        if key in seen or key[1] <= since:
            continue
        seen.add(key)
        out.append(Verdict(key[0], str(r["chip"]), str(r["verdict"]), str(r.get("reason") or ""), key[1]))
    return out


class _DesktopNotices:
    """Desktop notifications through desktop-notifier (one connection, reused)."""

    def __init__(self) -> None:
        from desktop_notifier import DesktopNotifierSync

        self._notifier = DesktopNotifierSync(app_name="imageqc")

    def check(self) -> str | None:
        """None when the notification service answers, else why not."""
        try:
            self._notifier.get_capabilities()
        except Exception as e:  # any failure to reach the desktop is reported the same way
            return f"the desktop's notification service does not answer ({type(e).__name__}: {e})"
        return None

    def show(self, v: Verdict) -> None:
        from desktop_notifier import Urgency

        urgency = Urgency.Critical if v.verdict == "fail" else Urgency.Normal
        self._notifier.send(title=v.title, message=v.body(), urgency=urgency)


def cmd_follow(args: argparse.Namespace) -> int:
    from daemon.config import load_config

    cfg = load_config(args.config or os.environ.get("IMAGEQC_CONFIG") or None)
    if args.interval <= 0:
        print("imageqc follow: --interval must be > 0", file=sys.stderr)
        return EXIT_USAGE
    notices = None
    if args.notify:
        problem = desktop_problem()
        if problem is None:
            notices = _DesktopNotices()
            problem = notices.check()
        if problem:
            print(
                f"imageqc follow --notify: {problem}. Run it in a logged-in desktop session (at logon: imageqc service "
                "install --follow-at-logon); without --notify it prints the verdicts here.",
                file=sys.stderr,
            )
            return EXIT_USAGE
    print(f"following QC verdicts in {cfg.database_path} (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    try:
        return follow(
            cfg,
            since=time.time() - 60.0 * args.since,
            interval=args.interval,
            stop=stop,
            fail_only=args.fail_only,
            show=notices.show if notices else None,
        )
    except KeyboardInterrupt:
        return EXIT_OK


def follow(
    cfg: Any,
    *,
    since: float,
    interval: float,
    stop: threading.Event,
    fail_only: bool = False,
    show: Callable[[Verdict], None] | None = None,
    out: Any = None,
) -> int:
    """Print (and ``show``) every new verdict until ``stop`` is set. The database may not exist yet."""
    from daemon.errors import DatabaseUnavailable
    from daemon.store import Store

    out = out or sys.stdout
    seen: set[tuple[int, float]] = set()
    said_missing = False
    while not stop.is_set():
        rows: list[dict[str, Any]] = []
        if cfg.database_path.exists():
            try:
                with Store(cfg.database_path, readonly=True) as store:
                    rows = store.recent_verdicts(100)
                said_missing = False
            except DatabaseUnavailable as e:
                if not said_missing:
                    print(f"imageqc follow: {e} (trying again)", file=sys.stderr, flush=True)
                    said_missing = True
        for v in new_verdicts(rows, seen, since):
            if fail_only and v.verdict != "fail":
                continue
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.at))
            print(
                f"{stamp}  #{v.job_id} {v.chip}  {v.word}" + (f": {v.reason}" if v.reason else ""), file=out, flush=True
            )
            if show is not None:
                try:
                    show(v)
                except Exception as e:  # a lost notice must not end the follow
                    print(f"imageqc follow: could not show the notification: {e}", file=sys.stderr, flush=True)
        stop.wait(interval)
    return EXIT_OK


def autostart_entry(command: list[str]) -> str:
    """An XDG autostart ``.desktop`` file that runs ``command`` at every desktop logon."""
    from shlex import quote

    exec_line = " ".join(quote(a) for a in command).replace("%", "%%")
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=imageqc verdicts\n"
        "Comment=Shows each new image QC verdict of the imageqc service as a desktop notification\n"
        f"Exec={exec_line}\n"
        "Terminal=false\n"
        "NoDisplay=true\n"
        "X-GNOME-Autostart-enabled=true\n"
    )
