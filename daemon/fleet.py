"""Every PC's status in the site's own bucket, and ``imageqc fleet`` that lists them.

Acquisition PCs often sit behind firewalls that let them reach the bucket and
let nobody reach them. So each service writes, every ``fleet.interval_s``, a
small JSON document (``schema: imageqc.fleet/1``) to each of its upload
targets at ``{prefix}/_fleet/{site}/{host}.json``, with the target's own
credentials: nothing beyond what uploads already need (PutObject on that
prefix; reading them back needs ListObjects and GetObject). The document holds
what ``imageqc status`` shows, in brief: host, site, version, heartbeat,
counts, waiting sets, scans live QC follows (with their early warnings), last
verdicts, upload backlog, watchers and disk. A clean stop writes one last
document saying so.

``imageqc fleet [--target T] [--json]`` reads them all and prints a line per
PC: stale ones first (no heartbeat for 3 of their intervals), then stopped,
then failing (failed jobs, a watcher down, a tick error, a failed QC verdict,
an early warning of a scan still on the stage),
then the healthy ones.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from daemon import __version__
from daemon.config import Config, UploadTarget
from daemon.errors import DaemonError, UploadError
from daemon.views import human_age, human_bytes

__all__ = [
    "FLEET_SCHEMA",
    "STALE_INTERVALS",
    "FleetReporter",
    "add_fleet_command",
    "build_document",
    "fleet_key",
    "fleet_prefix",
    "host_name",
    "judge",
    "read_fleet",
]


def _log() -> Any:
    """The fleet's logger (structlog is imported on first use: `imageqc qc` builds this command's parser only)."""
    from daemon.logging import get_logger

    return get_logger("imageqc.fleet")


FLEET_SCHEMA = "imageqc.fleet/1"
#: A PC whose newest document is older than this many of its own intervals is stale.
STALE_INTERVALS = 3
#: How long a clean stop waits for its last document to be written, seconds.
STOP_WRITE_S = 10.0


def host_name(config: Config) -> str:
    """This PC's name in the fleet: ``fleet.host``, else the computer's name made safe for a key."""
    name = config.fleet.host or socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "unnamed"


def fleet_prefix(target: UploadTarget) -> str:
    """The folder-like prefix all PCs' documents of a target live under."""
    return "/".join(p for p in (target.prefix.strip("/"), "_fleet") if p) + "/"


def fleet_key(target: UploadTarget, site: str, host: str) -> str:
    return f"{fleet_prefix(target)}{site}/{host}.json"


def build_document(config: Config, status: Mapping[str, Any], *, now: float, state: str = "running") -> dict[str, Any]:
    """The fleet document from :func:`daemon.status.collect_status`'s report."""
    svc = status.get("service", {})
    uploads = (status.get("uploads") or {}).get("targets", {})
    return {
        "schema": FLEET_SCHEMA,
        "host": host_name(config),
        "site": config.site.name,
        "version": __version__,
        "state": state,
        "heartbeat": now,
        "interval_s": config.fleet.interval_s,
        "started_at": svc.get("started_at"),
        "last_tick_error": svc.get("last_tick_error"),
        "counts": dict(status.get("counts", {})),
        "active": [
            {k: a.get(k) for k in ("job_id", "chip", "state", "stage", "progress")} for a in status.get("active", [])
        ],
        "waiting": _waiting(status.get("waiting") or {}),
        "live": _live(status.get("live") or []),
        "last_verdicts": [
            {k: v.get(k) for k in ("job_id", "chip", "verdict", "reason", "at")}
            for v in status.get("recent_verdicts", [])
        ],
        "recent_errors": [
            {k: e.get(k) for k in ("job_id", "chip", "at", "error")} for e in status.get("recent_errors", [])
        ],
        "uploads": {n: {k: u.get(k) for k in ("files", "bytes", "rate_bps", "open")} for n, u in uploads.items()},
        "watchers": [
            {k: w.get(k) for k in ("path", "health", "last_rescan", "pending")} for w in status.get("watchers", [])
        ],
        "disk": status.get("disk", {}),
    }


def _waiting(w: Mapping[str, Any]) -> dict[str, Any]:
    """The sets not queued yet (at most 10, with the total) and the names ignored, from the status report."""
    sets, names = list(w.get("sets") or []), list(w.get("misnamed") or [])
    return {
        "sets": sets[:10],
        "sets_total": w.get("sets_total", len(sets)),
        "misnamed": names[:10],
        "misnamed_total": w.get("misnamed_total", len(names)),
    }


def _live(sets: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Scans live QC follows right now (at most 10): progress and their early warnings, from the status report."""
    return [
        {
            "chip": s.get("chip"),
            "folder": s.get("folder"),
            "tiles_seen": s.get("tiles_seen"),
            "grid": s.get("grid"),
            "fovs_checked": s.get("fovs_checked"),
            "warnings": [{k: w.get(k) for k in ("code", "reason", "since")} for w in s.get("warnings") or []],
        }
        for s in sets
        if s.get("finished_at") is None
    ][:10]


class FleetReporter:
    """The service component that writes this PC's fleet document to every upload target.

    The writing runs in its own thread, woken by the tick when an interval has
    passed, so a slow or unreachable bucket never holds up the service's round.

    Parameters
    ----------
    config : Config
    uploaders : mapping, optional
        Target name -> uploader (tests); default one built per target from its config (its own credentials).
    clock : callable, optional
        Wall-clock seconds; default the service's clock.
    """

    name = "fleet"

    def __init__(
        self, config: Config, *, uploaders: Mapping[str, Any] | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        self.config = config
        self.targets = [t for t in config.upload if t.mode != "none"]
        self._clock_given = clock
        self.clock = clock or time.time
        self._given = dict(uploaders or {})
        self._uploaders: dict[str, Any] = dict(self._given)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._due = float("-inf")
        self._daemon: Any = None
        self._final_deadline = float("inf")
        self._lock = threading.Lock()
        self.written: dict[str, float] = {}
        self.errors: dict[str, str] = {}

    # -- component protocol ---------------------------------------------------------

    def start(self, daemon: Any = None) -> None:
        self._daemon = daemon
        if self._clock_given is None and daemon is not None:
            self.clock = daemon.clock  # the service's clock: its heartbeat and this document agree
        self._thread = threading.Thread(target=self._run, name="imageqc-fleet", daemon=True)
        self._thread.start()

    def tick(self, now: float) -> None:
        if now >= self._due:
            self._due = now + self.config.fleet.interval_s
            self._wake.set()

    def stop(self) -> None:
        """Write the last document ('stopped'), by the service's stop deadline at the latest."""
        limit = time.monotonic() + STOP_WRITE_S
        shared = getattr(self._daemon, "stop_deadline", None)  # the deadline every wait of the stop shares
        self._final_deadline = min(limit, shared) if shared is not None else limit
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(max(0.0, self._final_deadline - time.monotonic()) + 0.5)
            if thread.is_alive():  # a request still hanging: abandoned with its daemon thread, uploaders left open
                _log().warning(
                    "the last fleet status was not written before the stop deadline",
                    targets=[t.name for t in self.targets],
                )
                return
        for name, up in self._uploaders.items():
            if name not in self._given:
                up.close()
        self._uploaders = dict(self._given)

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "interval_s": self.config.fleet.interval_s,
                "written": dict(self.written),
                "errors": dict(self.errors),
            }

    # -- writing -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            self.write(state="running")
        self.write(state="stopped", deadline=self._final_deadline)

    def write(self, *, state: str = "running", deadline: float | None = None) -> dict[str, str | None]:
        """Write the document to every target now; returns each target's error (None when written)."""
        from daemon.status import collect_status

        now = self.clock()
        status = collect_status(self.config, now=now)
        doc = build_document(self.config, status, now=now, state=state)
        data = json.dumps(doc, indent=1, default=str).encode("utf-8")
        out: dict[str, str | None] = {}
        for t in self.targets:
            if deadline is not None and time.monotonic() > deadline:
                out[t.name] = "not written: the service was stopping"
                continue
            key = fleet_key(t, doc["site"], doc["host"])
            try:
                self._uploader(t).put_document(key, data)
            except (UploadError, DaemonError, OSError) as e:
                out[t.name] = str(e)
            else:
                out[t.name] = None
            self._note(t.name, key, out[t.name], now)
        return out

    def _uploader(self, target: UploadTarget) -> Any:
        up = self._uploaders.get(target.name)
        if up is None:
            from daemon.upload import make_uploader

            up = make_uploader(target, state_dir=self.config.state_dir)
            self._uploaders[target.name] = up
        return up

    def _note(self, target: str, key: str, error: str | None, now: float) -> None:
        with self._lock:
            before = self.errors.get(target)
            if error is None:
                self.written[target] = now
                self.errors.pop(target, None)
            else:
                self.errors[target] = error
        if error is None and before is not None:
            _log().info("fleet status written again", target=target, key=key)
        elif error is not None and error != before:  # each distinct problem once, not every interval
            _log().warning(
                "could not write the fleet status; retried next interval", target=target, key=key, error=error
            )


# ---------------------------------------------------------------------------
# Reading: `imageqc fleet`
# ---------------------------------------------------------------------------

#: Order of the kinds in `imageqc fleet` (problems first).
KINDS = ("stale", "stopped", "failing", "ok")


def judge(doc: Mapping[str, Any], now: float) -> tuple[str, list[str]]:
    """A PC's kind (stale, stopped, failing, ok) and its problems, from its newest document."""
    problems: list[str] = []
    interval = float(doc.get("interval_s") or 300.0)
    age = now - float(doc.get("heartbeat") or 0.0)
    if doc.get("last_tick_error"):
        problems.append(f"error: {doc['last_tick_error']}")
    for w in doc.get("watchers") or []:
        health = str(w.get("health") or "")
        if health and not all(p.startswith(("ok", "restarted", "native failed")) for p in health.split(", ")):
            problems.append(f"watch {w.get('path')}: {health}")
    failed = int((doc.get("counts") or {}).get("failed", 0) or 0)
    if failed:
        problems.append(
            f"{failed} failed job(s)"
            + (f", newest: {doc['recent_errors'][0].get('error')}" if doc.get("recent_errors") else "")
        )
    last = (doc.get("last_verdicts") or [None])[0]
    if last and last.get("verdict") == "fail":
        problems.append(f"last QC FAIL: {last.get('chip')}" + (f" ({last['reason']})" if last.get("reason") else ""))
    for live in doc.get("live") or []:  # a scan on the stage that would fail QC: fixable now
        for w in live.get("warnings") or []:
            problems.append(f"early warning {live.get('chip')}: {w.get('reason') or w.get('code')}")
    if age > STALE_INTERVALS * interval:
        return "stale", [f"no status for {_age(age)} (writes every {_age(interval)})", *problems]
    if doc.get("state") == "stopped":
        return "stopped", ["stopped cleanly", *problems]
    return ("failing" if problems else "ok"), problems


def read_fleet(
    config: Config, *, target: str | None = None, now: float | None = None, uploaders: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Every PC's newest document from the targets (one, or all), judged; and each target's reading error.

    Returns ``{"generated_at", "targets": {name: {"error": str | None, "documents": n}}, "pcs": [...]}``, the PCs
    sorted stale, stopped, failing, ok, then by site and host. A PC found in several targets is listed once,
    from its newest document.
    """
    from daemon.upload import make_uploader

    now = time.time() if now is None else now
    targets = [t for t in config.upload if t.mode != "none" and (target is None or t.name == target)]
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    report: dict[str, Any] = {"schema": "imageqc.fleet-list/1", "generated_at": now, "targets": {}, "pcs": []}
    for t in targets:
        given = (uploaders or {}).get(t.name)
        info: dict[str, Any] = {"error": None, "documents": 0}
        report["targets"][t.name] = info
        try:
            up = given or make_uploader(t, state_dir=config.state_dir)
        except (UploadError, DaemonError) as e:
            info["error"] = str(e)
            continue
        try:
            for key in up.list_documents(fleet_prefix(t)):
                if not key.endswith(".json"):
                    continue
                raw = up.get_document(key)
                try:
                    doc = json.loads(raw or b"")
                except ValueError:
                    doc = None
                if not isinstance(doc, dict) or doc.get("schema") != FLEET_SCHEMA:
                    continue  # not ours, or from a future version we cannot read
                info["documents"] += 1
                ident = (str(doc.get("site")), str(doc.get("host")))
                old = seen.get(ident)
                if old is None or float(doc.get("heartbeat") or 0) > float(old["document"].get("heartbeat") or 0):
                    seen[ident] = {
                        "target": t.name,
                        "key": key,
                        "document": doc,
                        "targets": sorted({t.name, *(old["targets"] if old else [])}),
                    }
                else:
                    old["targets"] = sorted({*old["targets"], t.name})
        except (UploadError, DaemonError) as e:
            info["error"] = str(e)
        finally:
            if given is None:
                up.close()
    for entry in seen.values():
        doc = entry["document"]
        kind, problems = judge(doc, now)
        entry.update(kind=kind, problems=problems, age_s=round(now - float(doc.get("heartbeat") or 0.0), 1))
    report["pcs"] = sorted(
        seen.values(),
        key=lambda e: (KINDS.index(e["kind"]), str(e["document"].get("site")), str(e["document"].get("host"))),
    )
    return report


def _age(seconds: float) -> str:
    return human_age(seconds)


def _bytes(n: float | None) -> str:
    return human_bytes(n or 0)


def pc_line(entry: Mapping[str, Any]) -> str:
    """One PC as a line of plain text: kind, site/host, version, heartbeat age, jobs, last verdict, uploads, disk."""
    doc = entry["document"]
    counts = doc.get("counts") or {}
    jobs = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "no jobs"
    parts = [
        f"{entry['kind'].upper():8}{doc.get('site')}/{doc.get('host')}",
        f"v{doc.get('version')}",
        f"seen {_age(entry['age_s'])} ago",
        jobs,
    ]
    last = (doc.get("last_verdicts") or [None])[0]
    if last:
        parts.append(f"last {last.get('chip')} {str(last.get('verdict')).upper()}")
    for name, u in (doc.get("uploads") or {}).items():
        if u.get("files"):
            parts.append(f"{name}: {u.get('files')} files {_bytes(u.get('bytes'))} waiting")
    for live in doc.get("live") or []:
        rows, cols = live.get("grid") or (0, 0)
        warned = ", ".join(str(w.get("code")) for w in live.get("warnings") or [])
        parts.append(
            f"scanning {live.get('chip')} {live.get('fovs_checked')}/{rows * cols} FOVs"
            + (f" WARNING {warned}" if warned else "")
        )
    free = ((doc.get("disk") or {}).get("state_dir") or {}).get("free_bytes")
    if free is not None:
        parts.append(f"{_bytes(free)} free")
    line = "  ".join(parts)
    if entry.get("problems") and entry["kind"] != "ok":
        line += "\n" + "\n".join(f"          {p}" for p in entry["problems"])
    return line


def cmd_fleet(args: argparse.Namespace) -> int:
    from daemon.cli import _config, _print_json
    from daemon.exitcodes import EXIT_FAILURE, EXIT_OK

    cfg = _config(args)
    targets = [t for t in cfg.upload if t.mode != "none"]
    if args.target and args.target not in {t.name for t in targets}:
        names = ", ".join(t.name for t in targets) or "none"
        print(f"imageqc fleet: no upload target named {args.target!r} in {cfg.source} (targets: {names})")
        return EXIT_FAILURE
    if not targets:
        print(
            f"imageqc fleet: {cfg.source} has no upload target; the fleet documents live in upload targets, "
            "so give a config with the site's [[upload]] targets (--config FILE)"
        )
        return EXIT_FAILURE
    report = read_fleet(cfg, target=args.target)
    if args.json:
        _print_json(report)
    else:
        for entry in report["pcs"]:
            print(pc_line(entry))
        if not report["pcs"]:
            print(
                "no fleet documents found"
                + "".join(f"; {n}: {i['documents']} read" for n, i in report["targets"].items())
            )
        for name, info in report["targets"].items():
            if info["error"]:
                print(f"imageqc fleet: could not read target {name!r}: {info['error']}")
    return EXIT_FAILURE if any(i["error"] for i in report["targets"].values()) else EXIT_OK


def add_fleet_command(sub: Any) -> None:
    """``imageqc fleet [--target T] [--json]``."""
    from daemon.exitcodes import CONFIG_ENV

    help_text = (
        "List every PC's status from the fleet documents in the upload targets: stale ones (no status for 3 "
        "intervals) first, then stopped, then failing."
    )
    sp = sub.add_parser("fleet", help=help_text, description=help_text)
    sp.add_argument(
        "--config", "-c", metavar="FILE", help=f"config file with the site's upload targets (default: ${CONFIG_ENV})"
    )
    sp.add_argument("--target", metavar="NAME", help="read only this upload target")
    sp.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    sp.set_defaults(func=cmd_fleet)
