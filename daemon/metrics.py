"""Prometheus metrics of one imageqc service, read at scrape time (``/metrics``, see daemon/web.py).

:class:`StoreCollector` is a prometheus_client custom collector. It takes
nothing from the service's objects: each scrape opens the job database
read-only (its own connection, never the service's) and reads the heartbeat
the service writes every tick (the same data ``imageqc status`` shows), so a
scrape never waits on, nor slows, QC or uploads.

Gauges are read whole at each scrape (jobs per state, upload backlog, disk,
watchers). Counters and histograms of QC runs (verdicts, checks, durations
per stage) count the runs finished since the listener started, read
incrementally from the job history after an event-id cursor, so a scrape
costs the same with 100,000 jobs in the store as with ten.

Names follow Prometheus conventions: ``imageqc_`` prefix, base units in the
name (``_seconds``, ``_bytes``), ``_total`` on counters. deploy/ holds a
scrape example and a Grafana dashboard built on them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from daemon import __version__
from daemon.config import Config
from daemon.errors import DatabaseUnavailable
from daemon.fsinfo import free_bytes
from daemon.status import _service_state
from daemon.store import JobState, Store

__all__ = ["RECOUNT_S", "RUN_BUCKETS", "STAGE_BUCKETS", "StoreCollector"]

#: How a working watcher's health reads (daemon/watcher.py): 'ok', or recovered ('restarted 2x', 'native failed').
_HEALTHY = ("ok", "restarted", "native failed")
#: Longest time (seconds) jobs per state are reused without reading them again (see StoreCollector._tables).
RECOUNT_S = 60.0
#: Histogram buckets (seconds) of one QC stage.
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Histogram buckets (seconds) of a whole QC run.
RUN_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class _Histogram:
    """Cumulative bucket counts and sum, as a Prometheus histogram exposes them."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for b, n in zip((*self.bounds, float("inf")), self.counts, strict=False):
            total += n
            out.append(("+Inf" if b == float("inf") else repr(float(b)), total))
        return out


class StoreCollector(Collector):
    """The service's metrics, from its job database opened read-only at each scrape.

    Parameters
    ----------
    config : Config
    clock : callable
        Returns now in seconds (ages, heartbeat freshness).
    """

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()  # scrapes may come in parallel; the cursor moves under this lock
        self._cursor: int | None = None
        self._stages: dict[str, _Histogram] = {}
        self._runs = _Histogram(RUN_BUCKETS)
        self._verdicts: dict[str, int] = {"pass": 0, "fail": 0}
        self._checks: dict[tuple[str, str], int] = {}
        self._failed = 0
        self._last: dict[str, Any] | None = None
        #: Whole-table figures (jobs per state, the stopped service's upload backlog) with the newest event id and
        #: the time they were read: every job state change writes an event in the same transaction, so while no
        #: event was added they cannot have changed; they are read again at least every RECOUNT_S all the same.
        self._tables: tuple[int, float, dict[str, Any]] | None = None

    # -- reading ----------------------------------------------------------------

    def _open(self) -> Store | None:
        try:
            return Store(self.config.database_path, readonly=True, busy_timeout_s=2.0)
        except DatabaseUnavailable:
            return None

    def prime(self) -> None:
        """Start counting QC runs from now (the newest event), and remember the newest result's scores."""
        store = self._open()
        if store is None:
            return
        with store, self._lock:
            self._prime(store)

    def _prime(self, store: Store) -> None:
        self._cursor = store.last_event_id()
        with store.db(commit=False) as c:
            row = c.execute(
                "SELECT r.job_id, j.chip, r.verdict, r.report, r.created_at FROM events e JOIN qc_results r ON r.job_id = e.job_id"
                " JOIN jobs j ON j.id = e.job_id WHERE e.kind = 'state' AND e.to_state = ? ORDER BY e.id DESC LIMIT 1",
                (JobState.QC_DONE.value,),
            ).fetchone()
        if row is not None:
            import json

            self._last = {
                "job_id": row["job_id"],
                "chip": row["chip"],
                "verdict": row["verdict"],
                "report": json.loads(row["report"]),
                "at": row["created_at"],
            }

    def _advance(self, store: Store) -> None:
        """Count the QC runs and job failures recorded since the cursor."""
        if self._cursor is None:
            self._prime(store)
            return
        while True:
            batch = store.finished_since(self._cursor, limit=500)
            if not batch:
                return
            for r in batch:
                self._observe(r)
            self._cursor = batch[-1]["event_id"]

    def _observe(self, r: dict[str, Any]) -> None:
        if r["kind"] != "state":
            return  # 'gave_up' repeats a failure already counted
        if r["to_state"] == JobState.FAILED.value:
            self._failed += 1
            return
        report = r.get("report")
        if not report:
            return
        verdict = str(report.get("verdict", r.get("verdict") or ""))
        self._verdicts[verdict] = self._verdicts.get(verdict, 0) + 1
        if isinstance(report.get("duration_s"), (int, float)):
            self._runs.observe(float(report["duration_s"]))
        for stage, seconds in (report.get("stage_s") or {}).items():
            if isinstance(seconds, (int, float)):
                self._stages.setdefault(str(stage), _Histogram(STAGE_BUCKETS)).observe(float(seconds))
        for c in report.get("checks") or []:
            outcome = "pass" if c.get("passed") else ("fail" if c.get("required", True) else "advisory")
            key = (str(c.get("metric", "")), outcome)
            self._checks[key] = self._checks.get(key, 0) + 1
        self._last = {"job_id": r["job_id"], "chip": r["chip"], "verdict": verdict, "report": report, "at": r["at"]}

    # -- the collector protocol -------------------------------------------------------

    def describe(self) -> Iterator[Any]:
        return iter(())  # names depend on the data; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        now = self.clock()
        info = InfoMetricFamily("imageqc_build", "The imageqc version serving these metrics.")
        info.add_metric([], {"version": __version__})
        yield info
        store = self._open()
        up = GaugeMetricFamily("imageqc_database_readable", "1 when the job database could be read for this scrape.")
        up.add_metric([], 0.0 if store is None else 1.0)
        yield up
        yield from self._disk()
        if store is None:
            return
        with store:
            try:
                with self._lock:
                    self._advance(store)
                    families = [*self._from_store(store, now), *self._qc_families()]
            except DatabaseUnavailable:
                return
        yield from families

    def _disk(self) -> Iterator[Any]:
        g = GaugeMetricFamily(
            "imageqc_disk_free_bytes",
            "Free space of the folders the service writes to or reads from.",
            labels=["role", "path"],
        )
        seen: list[tuple[str, str]] = [("state", str(self.config.state_dir)), ("output", str(self.config.output_dir))]
        seen += [("watch", str(w.path)) for w in self.config.watch]
        for role, path in seen:
            free = free_bytes(path)
            if free is not None:
                g.add_metric([role, path], float(free))
        yield g

    def _table_figures(self, store: Store, *, backlog: bool) -> dict[str, Any]:
        """Jobs per state and (if asked) the upload backlog, read again only when the job history moved."""
        mark, mono = store.last_event_id(), time.monotonic()
        cached = self._tables
        if (
            cached is not None
            and cached[0] == mark
            and mono - cached[1] < RECOUNT_S
            and (not backlog or "backlog" in cached[2])
        ):
            return cached[2]
        figures: dict[str, Any] = {"counts": store.counts()}
        if backlog:
            figures["backlog"] = store.upload_backlog()
        self._tables = (mark, mono, figures)
        return figures

    def _from_store(self, store: Store, now: float) -> list[Any]:
        out: list[Any] = []
        svc = _service_state(self.config, store.get_status(), now)
        comps = svc.get("components", {}) if svc.get("running") else {}
        live_uploads = comps.get("uploads", {}).get("targets")
        tables = self._table_figures(
            store, backlog=live_uploads is None and any(t.mode != "none" for t in self.config.upload)
        )
        jobs = GaugeMetricFamily("imageqc_jobs", "Jobs in the store per state.", labels=["state"])
        for state, n in tables["counts"].items():
            jobs.add_metric([state], float(n))
        out.append(jobs)
        running = GaugeMetricFamily("imageqc_service_running", "1 while the service writes fresh heartbeats.")
        running.add_metric([], 1.0 if svc.get("running") else 0.0)
        out.append(running)
        if svc.get("started_at") is not None:
            g = GaugeMetricFamily("imageqc_service_start_time_seconds", "When the service started (Unix time).")
            g.add_metric([], float(svc["started_at"]))
            out.append(g)
        if svc.get("heartbeat_at") is not None:
            g = GaugeMetricFamily(
                "imageqc_service_heartbeat_age_seconds", "Seconds since the service's last heartbeat."
            )
            g.add_metric([], max(0.0, now - float(svc["heartbeat_at"])))
            out.append(g)
        out += self._watchers(comps.get("discovery", {}).get("roots", []), now)
        waiting = comps.get("discovery", {}).get("waiting") or {}
        sets = GaugeMetricFamily(
            "imageqc_waiting_sets",
            "Scan sets seen and not queued yet (being written, incomplete, settling), as `imageqc status` lists them.",
        )
        sets.add_metric([], float(waiting.get("sets_total", 0)))
        names = GaugeMetricFamily("imageqc_ignored_names", "Names in the watch folders ignored as not chip serials.")
        names.add_metric([], float(waiting.get("misnamed_total", 0)))
        out += [sets, names]
        out += self._uploads(tables.get("backlog", {}), live_uploads)
        outbox = store.outbox_summary()
        g = GaugeMetricFamily(
            "imageqc_notify_outbox_messages", "Notification messages in the outbox per state.", labels=["state"]
        )
        for state in ("waiting", "expired", "sent"):
            g.add_metric([state], float(outbox.get(state, 0)))
        out.append(g)
        return out

    def _watchers(self, roots: list[dict[str, Any]], now: float) -> list[Any]:
        healthy = GaugeMetricFamily(
            "imageqc_watch_healthy",
            "1 while the root's watcher works (health 'ok' or recovered).",
            labels=["root", "observer"],
        )
        age = GaugeMetricFamily(
            "imageqc_watch_last_rescan_age_seconds", "Seconds since the last full rescan of the root.", labels=["root"]
        )
        pending = GaugeMetricFamily(
            "imageqc_watch_pending_sets", "Scan sets seen under the root and not yet queued.", labels=["root"]
        )
        for r in roots:
            root = str(r.get("path", ""))
            health = str(r.get("health", ""))
            ok = all(p.startswith(_HEALTHY) for p in health.split(", "))  # else a problem, or 'observer down'
            healthy.add_metric([root, str(r.get("observer", ""))], 1.0 if ok else 0.0)
            if r.get("last_rescan") is not None:
                age.add_metric([root], max(0.0, now - float(r["last_rescan"])))
            pending.add_metric([root], float(r.get("pending") or 0))
        return [healthy, age, pending]

    def _uploads(self, backlog: dict[str, dict[str, int]], live: dict[str, Any] | None) -> list[Any]:
        targets = [t for t in self.config.upload if t.mode != "none"]
        files = GaugeMetricFamily(
            "imageqc_upload_backlog_files", "Files still to upload per target.", labels=["target"]
        )
        nbytes = GaugeMetricFamily(
            "imageqc_upload_backlog_bytes", "Bytes still to upload per target.", labels=["target"]
        )
        rate = GaugeMetricFamily(
            "imageqc_upload_rate_bytes_per_second", "Upload rate per target over the last minute.", labels=["target"]
        )
        window = GaugeMetricFamily(
            "imageqc_upload_window_open", "1 while the target's upload window is open.", labels=["target"]
        )
        sent = CounterMetricFamily(
            "imageqc_upload_bytes", "Bytes sent per target since the service started.", labels=["target"]
        )
        for t in targets:
            h = (live or {}).get(t.name) or {
                **backlog.get(t.name, {"files": 0, "bytes": 0}),
                "rate_bps": 0,
                "open": None,
            }
            files.add_metric([t.name], float(h.get("files", 0)))
            nbytes.add_metric([t.name], float(h.get("bytes", 0)))
            rate.add_metric([t.name], float(h.get("rate_bps") or 0))
            if h.get("open") is not None:
                window.add_metric([t.name], 1.0 if h["open"] else 0.0)
            if live is not None:  # a counter of the running service (its heartbeat); none while it is stopped
                sent.add_metric([t.name], float(h.get("sent_bytes") or 0))
        return [files, nbytes, rate, window, sent]

    def _qc_families(self) -> list[Any]:
        runs = CounterMetricFamily(
            "imageqc_qc_runs", "QC runs finished since the listener started, per verdict.", labels=["verdict"]
        )
        for v, n in sorted(self._verdicts.items()):
            runs.add_metric([v], float(n))
        checks = CounterMetricFamily(
            "imageqc_qc_checks",
            "Judged QC metrics since the listener started, per metric and "
            "outcome (pass, fail, advisory: below an advisory threshold).",
            labels=["metric", "outcome"],
        )
        for (metric, outcome), n in sorted(self._checks.items()):
            checks.add_metric([metric, outcome], float(n))
        failed = CounterMetricFamily(
            "imageqc_jobs_failed", "Jobs that failed (errors, not QC verdicts) since the listener started."
        )
        failed.add_metric([], float(self._failed))
        duration = HistogramMetricFamily("imageqc_qc_duration_seconds", "Duration of whole QC runs.")
        duration.add_metric([], self._runs.buckets(), self._runs.sum)
        stages = HistogramMetricFamily(
            "imageqc_qc_stage_duration_seconds", "Duration of each QC stage.", labels=["stage"]
        )
        for stage, h in sorted(self._stages.items()):
            stages.add_metric([stage], h.buckets(), h.sum)
        out = [runs, checks, failed, duration, stages]
        if self._last is not None:
            rep = self._last["report"]
            score = GaugeMetricFamily(
                "imageqc_qc_last_score", "Scores of the newest QC run per metric and image.", labels=["metric", "image"]
            )
            for c in rep.get("checks") or []:
                if isinstance(c.get("value"), (int, float)):
                    score.add_metric([str(c.get("metric", "")), str(c.get("image", ""))], float(c["value"]))
            at = GaugeMetricFamily(
                "imageqc_qc_last_timestamp_seconds", "When the newest QC result was stored (Unix time)."
            )
            at.add_metric([], float(self._last["at"]))
            passed = GaugeMetricFamily(
                "imageqc_qc_last_passed", "1 when the newest QC run passed, 0 when it failed.", labels=["chip"]
            )
            passed.add_metric([str(self._last["chip"])], 1.0 if self._last["verdict"] == "pass" else 0.0)
            out += [score, at, passed]
        return out
