"""Notifications: a durable outbox in the job database, delivered through apprise.

Events (``[[notify.rule]] events``):

``qc_fail``
    A job's QC verdict is fail: the chip, the first reason, every reason with its
    advice, and the run's summary sheet attached (``pictures/<chip>_summary.png``:
    verdict, every metric against its threshold, the reasons, small versions of
    the pictures; for a run written before summary sheets existed, the nuclear
    image's ``<image>_track.png``). Urgent by default: sent even in quiet hours.
``qc_pass``
    A pass, with any advisories (off unless a rule names it).
``job_failed``
    A job that ended ``failed`` with no retry pending (an upload given up, an
    incomplete scan set, a corrupt image); not jobs cancelled by hand.
``health``
    A watch folder missing or its watcher down, or free disk below
    ``notify.disk_free_min_gb``, once it has lasted ``notify.health_grace_s``;
    and its end.
``digest``
    At ``notify.digest_at`` each day: the last 24 hours in a few lines.

Enqueueing. Each tick :meth:`Notifier.enqueue` reads the job history (the
append-only ``events`` table) after a cursor, turns the jobs whose verdict was
announced (the QC child records it as soon as the report and pictures are
written, before the IPR and archive) or that reached ``qc_done`` or
``failed`` into messages, and inserts them together with the
new cursor in one transaction. A row is unique per (event, key), the key of a
job event being ``job:<id>``, so a second enqueue, or a restart after kill -9
anywhere in between, adds nothing and nothing is lost: an unread event stays
after the cursor.

Delivery. A background thread (never the tick, so QC and uploads never wait)
sends due rows to every endpoint of the rules that take the event, each send
in its own thread with ``notify.timeout_s``. The endpoints a row reached are
recorded on it, so a retry goes only to the others. A failing endpoint backs
off exponentially (``retry_base_s`` doubling to ``retry_max_s``; time is passed
in as ``now``), its rows wait with it, the error is stored on them for
``imageqc status``, and the outage is logged once, with one more line when it
ends. Rows older than ``expire_after_s`` are given up. A message can be sent
twice only if the service dies between the endpoint accepting it and the row
being marked.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from daemon.config import Config, NotifyRule, parse_clock
from daemon.fsinfo import free_bytes
from daemon.logging import get_logger
from daemon.notify_send import Endpoint, resolve_endpoints, send_message
from daemon.snapshot import norm
from daemon.store import JobState, OutboxRow, OutboxState, Store
from daemon.upload.policy import UploadWindow

__all__ = ["CATCH_UP_S", "ROUND_LIMIT", "Notifier", "job_message", "summary_picture"]

log = get_logger("imageqc.notify")

#: Job events older than this when first read are not notified (a service that was down for days).
CATCH_UP_S = 86400.0
#: Most rows one delivery round looks at.
ROUND_LIMIT = 50
#: Watcher health words that are not problems (see daemon/watcher.py).
_WATCH_OK = ("ok", "restarted", "native failed")


def summary_picture(output_dir: str | None, report: Mapping[str, Any] | None) -> Path | None:
    """The picture a notification attaches: the run's summary sheet ``*_summary.png`` (:func:`qc.pictures.pictures_for_run`).

    Runs written before summary sheets existed fall back to the nuclear image's track picture.
    """
    if not output_dir:
        return None
    pics = Path(output_dir) / "pictures"
    found = sorted(pics.glob("*_summary.png"))
    if found:
        return found[0]
    for image in (report or {}).get("images") or []:
        if image.get("role") in ("nuclear", "HE") and image.get("name"):
            p = pics / f"{_safe_name(str(image['name']))}_track.png"
            if p.is_file():
                return p
    found = sorted(pics.glob("*_track.png"))
    return found[0] if found else None


def _safe_name(name: str) -> str:
    """A picture's file stem, as qc.pictures.safe_name makes it (not imported: it would load OpenCV here)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def job_message(row: Mapping[str, Any], config: Config) -> dict[str, Any] | None:
    """The outbox row for a job whose verdict was announced, or that reached ``qc_done`` or ``failed``
    (a :meth:`Store.finished_since` row), or None.

    A verdict is announced before the job writes what SAW needs (the IPR, a fused image, the archive), so its
    message goes out then; the same job's ``qc_done`` makes the same row (event, key), which the outbox keeps
    once. The key names the job and since when its verdict stands (``job:<id>@<verdict_at>``): QC run again
    with the same verdict keeps that time (nothing new to say), a verdict that changed (fail, pass, fail
    again after a retry by hand) is a new message each time. A final failure's key names the job and when it
    failed (``job:<id>!<finished_at>``): the failure and the service giving up on it are one message, a job
    that fails again after a retry by hand is another.
    """
    chip, job_id = row["chip"], row["job_id"]
    where = f"site {config.site.name}, {socket.gethostname()}"
    verdict_reached = row["kind"] == "verdict" or (row["kind"] == "state" and row["to_state"] == JobState.QC_DONE.value)
    if verdict_reached and row["verdict"]:
        report = row["report"] or {}
        reasons = [str(r) for r in report.get("reasons") or []]
        stain = f", {report['stain']}" if report.get("stain") else ""
        if row["verdict"] == "fail":
            event, title = "qc_fail", f"imageqc: QC fail {chip}"
            lines = [
                f"Chip {chip} failed QC (job #{job_id}{stain}; {where}).",
                f"Reason: {reasons[0] if reasons else 'none given'}",
            ]
            lines += ["Also:", *(f"- {r}" for r in reasons[1:])] if len(reasons) > 1 else []
        else:
            event, title = "qc_pass", f"imageqc: QC pass {chip}"
            lines = [f"Chip {chip} passed QC (job #{job_id}{stain}; {where})."]
            lines += ["Advisories:", *(f"- {r}" for r in reasons)] if reasons else []
        if row["output_dir"]:
            lines.append(f"Outputs: {row['output_dir']}")
        lines.append(f"Details: imageqc show {job_id}")
        pic = summary_picture(row["output_dir"], report) if config.notify.attach_pictures else None
        return {
            "event": event,
            "key": f"job:{job_id}" + (f"@{row['verdict_at']:.6f}" if row.get("verdict_at") is not None else ""),
            "job_id": job_id,
            "title": title,
            "body": "\n".join(lines),
            "attach": str(pic) if pic else None,
        }
    final = (
        row["state"] == JobState.FAILED.value and row["next_attempt_at"] is None and row["failed_stage"] != "cancelled"
    )
    if (row["kind"] == "gave_up" or row["to_state"] == JobState.FAILED.value) and final:
        stage = f" at stage {row['failed_stage']}" if row["failed_stage"] else ""
        body = (
            f"Job #{job_id} (chip {chip}) failed{stage} after {row['attempts']} attempt(s) and is not retried by itself "
            f"({where}).\nError: {row['error']}\nWhen the cause is fixed: imageqc retry {job_id}"
        )
        return {
            "event": "job_failed",
            "key": f"job:{job_id}" + (f"!{row['finished_at']:.6f}" if row.get("finished_at") is not None else ""),
            "job_id": job_id,
            "title": f"imageqc: job failed {chip}",
            "body": body,
        }
    return None


@dataclass
class _Outage:
    """A failing endpoint: when it started, how often it failed, when it may be tried again."""

    since: float
    failures: int
    retry_at: float
    error: str


class Notifier:
    """The ``notify`` component: enqueues each tick, delivers and checks health in a background round.

    Parameters
    ----------
    config : Config
    store : Store, optional
        Default the daemon's, given at :meth:`start`.
    tz : tzinfo, optional
        Time zone of quiet hours and the digest; default the PC's.
    environ : mapping, optional
        Where ``env:`` references are read; default ``os.environ``.
    """

    name = "notify"

    def __init__(
        self,
        config: Config,
        *,
        store: Store | None = None,
        tz: tzinfo | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.tz = tz
        self.environ = environ
        self.rules: tuple[NotifyRule, ...] = config.notify.rule
        self.wanted = {e for r in self.rules for e in r.events}
        self.quiet = {r.name: UploadWindow.parse(r.quiet_hours, tz) for r in self.rules}
        self.outages: dict[str, _Outage] = {}
        self._stop = threading.Event()
        self._round: threading.Thread | None = None
        self._round_error: str | None = None

    # -- component protocol -----------------------------------------------------

    def start(self, daemon: Any = None) -> None:
        """Attach to the daemon's store; the first start puts the cursor at the end of the history."""
        if daemon is not None:
            self.store = daemon.store
        assert self.store is not None
        if self.store.kv_get("notify", "cursor") is None:
            self.store.outbox_add([], cursor=("cursor", self.store.last_event_id()))

    def tick(self, now: float) -> None:
        """Enqueue (quick, in the tick), then start a delivery round unless one is still going."""
        if self._stop.is_set() or self.store is None:
            return
        self.enqueue(now)
        if self._round is None or not self._round.is_alive():
            self._round = threading.Thread(target=self._work, args=(now,), name="notify-round", daemon=True)
            self._round.start()

    def stop(self) -> None:
        self._stop.set()
        if self._round is not None:
            wait = min(self.config.notify.timeout_s, self.config.service.shutdown_timeout_s) + 1.0
            self._round.join(wait)
            if self._round.is_alive():
                log.warning("a notification send was still going at stop; its message is sent again at the next start")

    def health(self) -> dict[str, Any]:
        return {
            "rules": [r.name for r in self.rules],
            "failing": {
                k: {"since": o.since, "failures": o.failures, "retry_at": o.retry_at, "error": o.error}
                for k, o in list(self.outages.items())
            },
        }

    def _work(self, now: float) -> None:
        try:
            self.check_health(now)
            self.digest(now)
            self.deliver(now)
            self._round_error = None
        except Exception as e:  # never kills the service; said once per distinct error
            text = f"{type(e).__name__}: {e}"
            if text != self._round_error and not self._stop.is_set():
                log.exception("notification round failed; retried next tick")
            self._round_error = text

    # -- enqueueing -----------------------------------------------------------------

    def enqueue(self, now: float | None = None) -> int:
        """Queue messages for the jobs that reached QC done or failed since the cursor; returns how many were new."""
        assert self.store is not None
        now = time.time() if now is None else now
        raw = self.store.kv_get("notify", "cursor")
        cursor = int(raw) if raw is not None else 0
        added = 0
        while True:
            batch = self.store.finished_since(cursor, limit=500)
            if not batch:
                return added
            rows = []
            for r in batch:
                if now - r["at"] > CATCH_UP_S:
                    continue
                msg = job_message(r, self.config)
                if msg is not None and msg["event"] in self.wanted:
                    rows.append(msg)
            cursor = batch[-1]["event_id"]
            added += self.store.outbox_add(rows, cursor=("cursor", cursor), now=now)

    def check_health(self, now: float) -> None:
        """Queue a health message for each problem that has lasted ``health_grace_s``, and one when it ends."""
        if "health" not in self.wanted:
            return
        assert self.store is not None
        problems = self._problems()
        seen = {k: json.loads(v) for k, v in self.store.kv_items("notify.health").items()}
        grace = self.config.notify.health_grace_s
        where = f"on {socket.gethostname()} (site {self.config.site.name})"
        for key, (title, text) in problems.items():
            st = dict(seen.get(key) or {"since": now, "sent": False, "title": title})
            if not st["sent"] and now - st["since"] >= grace:
                body = f"{text}\nSince {_local(st['since'], self.tz)} {where}."
                self.store.outbox_add([_health_row(f"{key}@{st['since']:.0f}", title, body)], now=now)
                st["sent"] = True
            if seen.get(key) != st:
                self.store.kv_put("notify.health", key, json.dumps(st).encode(), now=now)
        ended = [k for k in seen if k not in problems]
        for key in ended:
            st = seen[key]
            if st["sent"]:
                title = f"resolved: {st.get('title', key)}"
                body = f"Resolved {where}: {st.get('title', key)} (since {_local(st['since'], self.tz)}), fine at {_local(now, self.tz)}."
                self.store.outbox_add([_health_row(f"{key}@{st['since']:.0f}:end", title, body)], now=now)
        if ended:
            self.store.kv_delete("notify.health", ended)

    def _problems(self) -> dict[str, tuple[str, str]]:
        """What is wrong now, by a stable key: (title, body)."""
        assert self.store is not None
        out: dict[str, tuple[str, str]] = {}
        heartbeat = self.store.get_status().get("service", ({}, 0.0))[0]
        discovery = heartbeat.get("components", {}).get("discovery", {})
        roots = {r.get("path"): str(r.get("health", "")) for r in discovery.get("roots", [])}
        for w in self.config.watch:
            health = roots.get(norm(w.path)) or roots.get(str(w.path)) or ""
            if not w.path.exists():
                health = health if health and not health.startswith(_WATCH_OK) else "folder missing"
            if health and not health.startswith(_WATCH_OK):
                out[f"watch {w.path}"] = (
                    f"watch folder {w.path}: {health}",
                    f"The watch folder {w.path} is not watched ({health}): new scan sets there are not seen. "
                    "Check that the folder or share is there and readable by the service.",
                )
        limit = self.config.notify.disk_free_min_gb * 1e9
        if limit > 0:
            paths = {self.config.state_dir, self.config.output_dir, *(w.path for w in self.config.watch)}
            for p in sorted(paths, key=str):
                free = free_bytes(p) if p.exists() else None
                if free is not None and free < limit:
                    out[f"disk {p}"] = (
                        f"low disk space at {p}",
                        f"{free / 1e9:.1f} GB free at {p}, below notify.disk_free_min_gb = "
                        f"{self.config.notify.disk_free_min_gb:g}. Free space there: QC outputs, the job database "
                        "and the microscope's exports need it.",
                    )
        return out

    def digest(self, now: float) -> bool:
        """Queue today's digest once its time has come (rules with ``digest``); True when queued now."""
        at = self.config.notify.digest_at
        if not at or "digest" not in self.wanted:
            return False
        assert self.store is not None
        local = datetime.fromtimestamp(now, self.tz or _local_zone())
        minute = parse_clock(at)
        if local.hour * 60 + local.minute < minute:
            return False
        day = local.date().isoformat()
        if self.store.outbox_exists("digest", day):
            return False
        a = self.store.activity_since(now - 86400)
        v, fails = a["verdicts"], a["qc_fail_chips"]
        lines = [
            f"The last 24 hours on {socket.gethostname()} (site {self.config.site.name}):",
            f"QC: {v.get('pass', 0)} pass, {v.get('fail', 0)} fail" + (f" ({', '.join(fails[:10])})" if fails else ""),
            f"New jobs: {a['jobs_created']}",
            f"Jobs failed for good: {len(a['failed_jobs'])}",
            *(f"- #{j['id']} {j['chip']}: {j['error']}" for j in a["failed_jobs"][:10]),
        ]
        waiting = self.store.outbox_summary()["waiting"]
        if waiting:
            lines.append(f"Notifications waiting: {waiting}")
        title = f"imageqc daily digest {day} ({self.config.site.name})"
        return (
            self.store.outbox_add([{"event": "digest", "key": day, "title": title, "body": "\n".join(lines)}], now=now)
            == 1
        )

    # -- delivery ---------------------------------------------------------------------

    def deliver(self, now: float) -> int:
        """One delivery round over the due rows; returns how many rows were completed (sent everywhere)."""
        assert self.store is not None
        endpoints = {r.name: resolve_endpoints(r, self.environ) for r in self.rules}
        done = expired = 0
        for row in self.store.outbox(due=now, limit=ROUND_LIMIT):
            if self._stop.is_set():
                break
            if now - row.created_at > self.config.notify.expire_after_s:
                self.store.outbox_update(row.id, now=now, state=OutboxState.EXPIRED, delivered=row.delivered)
                expired += 1
                continue
            targets = [(r, ep) for r in self.rules if row.event in r.events for ep in endpoints[r.name]]
            if not targets:
                self.store.outbox_update(
                    row.id,
                    now=now,
                    state=OutboxState.EXPIRED,
                    error=f"no notification rule takes '{row.event}' any more",
                )
                expired += 1
                continue
            done += self._deliver_row(row, targets, now)
        if expired:
            log.warning("notifications given up", count=expired, expire_after_s=self.config.notify.expire_after_s)
        return done

    def _deliver_row(self, row: OutboxRow, targets: list[tuple[NotifyRule, Endpoint]], now: float) -> int:
        assert self.store is not None
        delivered = list(row.delivered)
        errors: list[str] = []
        waits: list[float] = []
        attempted = False
        for rule, ep in targets:
            if ep.id in delivered:
                continue
            ready = self._ready_at(rule, ep, row.event, now)
            if ready > now:
                waits.append(ready)
                continue
            attempted = True
            error = send_message(ep, row.title, row.body, row.attach, timeout=self.config.notify.timeout_s)
            if error is None:
                delivered.append(ep.id)
                self._endpoint_up(ep, now)
            else:
                errors.append(f"{ep.id}: {error}")
                waits.append(self._endpoint_down(ep, error, now))
        if all(ep.id in delivered for _, ep in targets):
            self.store.outbox_update(row.id, now=now, state=OutboxState.SENT, delivered=delivered, attempted=attempted)
            return 1
        self.store.outbox_update(
            row.id,
            now=now,
            delivered=delivered,
            attempted=attempted,
            next_attempt_at=min(waits),
            error="; ".join(errors) or None,
        )
        return 0

    def _ready_at(self, rule: NotifyRule, ep: Endpoint, event: str, now: float) -> float:
        """When this endpoint may get this event: after quiet hours (unless urgent) and its backoff."""
        ready = now
        quiet = self.quiet.get(rule.name)
        if quiet is not None and event not in rule.urgent and quiet.is_open(now):
            ready = quiet.next_close(now)
        outage = self.outages.get(ep.id)
        if outage is not None:
            ready = max(ready, outage.retry_at)
        return ready

    def _endpoint_down(self, ep: Endpoint, error: str, now: float) -> float:
        """Record a failure; back off; log only the first of an outage. Returns when to try again."""
        n = self.config.notify
        o = self.outages.get(ep.id)
        if o is None:
            o = self.outages[ep.id] = _Outage(since=now, failures=0, retry_at=now, error=error)
            log.warning(
                "notification endpoint failing; its messages wait and are retried with backoff",
                endpoint=ep.label(),
                error=error,
            )
        o.failures += 1
        o.error = error
        o.retry_at = now + min(n.retry_max_s, n.retry_base_s * 2 ** (o.failures - 1))
        return o.retry_at

    def _endpoint_up(self, ep: Endpoint, now: float) -> None:
        o = self.outages.pop(ep.id, None)
        if o is not None:
            log.info(
                "notification endpoint reachable again",
                endpoint=ep.label(),
                failures=o.failures,
                down_s=round(now - o.since, 1),
            )


def _health_row(key: str, title: str, body: str) -> dict[str, Any]:
    return {"event": "health", "key": key, "title": f"imageqc: {title}", "body": body}


def _local_zone() -> tzinfo:
    from tzlocal import get_localzone

    return get_localzone()


def _local(t: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(t, tz or _local_zone()).strftime("%Y-%m-%d %H:%M")
