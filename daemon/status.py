"""What `imageqc status` reports, read from the state folder by another process.

Only reads: the database is opened read-only, so status never blocks the
service and works whether the service runs or not. The JSON form is stable
(``schema: imageqc.status/1``); keys may be added, never renamed.
"""

from __future__ import annotations

import time
from typing import Any

from daemon.config import Config
from daemon.errors import DatabaseUnavailable
from daemon.fsinfo import free_bytes
from daemon.service import heartbeat_age_limit
from daemon.stateguard import live_service
from daemon.store import JobState, Store

__all__ = ["STATUS_SCHEMA", "collect_status"]

STATUS_SCHEMA = "imageqc.status/1"


def _service_state(config: Config, status: dict[str, tuple[Any, float]], now: float) -> dict[str, Any]:
    entry = status.get("service")
    if entry is None:
        return {"running": False, "reason": "the service has never written a heartbeat here"}
    h, at = entry
    age = now - at
    alive = live_service(h, at, now=now, age_limit=heartbeat_age_limit(config))
    out = {
        "running": alive,
        "pid": h.get("pid"),
        "host": h.get("host"),
        "version": h.get("version"),
        "config": h.get("config"),
        "started_at": h.get("started_at"),
        "heartbeat_at": at,
        "heartbeat_age_s": round(age, 1),
        "last_tick_error": h.get("last_tick_error"),
    }
    if not alive:
        out["reason"] = "stopped cleanly" if h.get("state") == "stopped" else f"no heartbeat for {age:.0f} s"
    out["components"] = h.get("components", {})
    return out


def collect_status(config: Config, *, now: float | None = None, error_limit: int = 5) -> dict[str, Any]:
    """The status report as plain data (see the README for the schema)."""
    now = time.time() if now is None else now
    report: dict[str, Any] = {
        "schema": STATUS_SCHEMA,
        "generated_at": now,
        "state_dir": str(config.state_dir),
        "database": str(config.database_path),
        "service": {"running": False},
        "counts": {s.value: 0 for s in JobState},
        "active": [],
        "recent_errors": [],
        "recent_verdicts": [],
        "watchers": [],
        "waiting": {"sets": [], "sets_total": 0, "misnamed": [], "misnamed_total": 0},
        "uploads": {},
        "live": [],
        "notifications": {
            "rules": [r.name for r in config.notify.rule],
            "waiting": 0,
            "expired": 0,
            "sent": 0,
            "last_error": None,
            "last_error_at": None,
            "last_sent_at": None,
        },
        "disk": {
            "state_dir": {"path": str(config.state_dir), "free_bytes": free_bytes(config.state_dir)},
            "watch": [
                {
                    "path": str(w.path),
                    "exists": w.path.exists(),
                    "free_bytes": free_bytes(w.path) if w.path.exists() else None,
                }
                for w in config.watch
            ],
        },
    }
    try:
        store = Store(config.database_path, readonly=True)
    except DatabaseUnavailable as e:
        report["service"] = {"running": False, "reason": str(e)}
        return report
    with store:
        try:
            _read_state(report, store, config, now, error_limit)
        except DatabaseUnavailable as e:  # damaged pages met while reading: say so, as at open
            report["service"] = {"running": False, "reason": str(e)}
    return report


def _read_state(report: dict[str, Any], store: Store, config: Config, now: float, error_limit: int) -> None:
    report["service"] = _service_state(config, store.get_status(), now)
    report["counts"] = store.counts()
    for job in store.list_jobs(states=[JobState.RUNNING, JobState.UPLOADING], newest_first=False):
        report["active"].append(
            {
                "job_id": job.id,
                "chip": job.chip,
                "state": job.state,
                "stage": job.stage,
                "progress": job.progress,
                "started_at": job.started_at,
                "lease_owner": job.lease_owner,
            }
        )
    for job in store.list_jobs(states=[JobState.FAILED], limit=error_limit):
        report["recent_errors"].append(
            {
                "job_id": job.id,
                "chip": job.chip,
                "at": job.finished_at or job.updated_at,
                "error": job.error,
                "retry_at": job.next_attempt_at,
                "attempts": job.attempts,
            }
        )
    report["recent_verdicts"] = store.recent_verdicts(error_limit)
    report["notifications"].update(store.outbox_summary())
    comps = report["service"].get("components", {})
    report["watchers"] = comps.get("discovery", {}).get("roots", [])
    if comps.get("discovery", {}).get("waiting"):
        report["waiting"] = comps["discovery"]["waiting"]
    report["uploads"] = comps.get("uploads", {})
    report["live"] = comps.get("live", {}).get("sets", [])
    if not report["service"].get("running") and any(t.mode != "none" for t in config.upload):
        backlog = store.upload_backlog()  # no live heartbeat: the backlog from the database, no rate
        report["uploads"] = {
            "targets": {
                t.name: {
                    **backlog.get(t.name, {"files": 0, "bytes": 0}),
                    "rate_bps": 0,
                    "type": t.type,
                    "window": t.window or None,
                }
                for t in config.upload
                if t.mode != "none"
            }
        }
