"""Live QC (issue #18): a running service checks tile folders while a microscope is still writing them.

One real service (discovery, live QC, the QC worker, notifications to a real HTTP endpoint) watches an
inbox while four microscopes (qc.testing.scan.ScanWriter, one thread each) write a 10 x 10 grid of
1024^2 tiles each, every tile in chunks, over about a minute: a good chip, one whose first three
rows are out of focus, one without track lines (its technician stops the scan after the warning, at
30 tiles, so it never completes), and one whose tile (1, 1) is acquired again in the middle of the
scan. The scenario runs once for the module; each test checks one case.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.cli import main
from daemon.config import load_config_text
from daemon.service import Daemon, default_components
from daemon.store import JobState, Store
from qc.testing.scan import ScanWriter, scan_tiles
from tests.helpers import scaled
from tests.webhook import Webhook

pytestmark = pytest.mark.timeout(900)

ROWS = COLS = 10
TILE = 1024
OVERLAP = 0.1
SCAN_S = 60.0  #: how long each microscope takes for its 100 tiles
GOOD, BLURRED, NO_LINES, REWRITTEN = "C02533C", "A02677B5", "C02531C", "D02070C3D3"
NO_LINES_STOP = 30  #: the lineless scan is stopped after this many tiles (its warning comes by the 15th)
REWRITE_AFTER = 45  #: tile (1, 1) is written again right after the 46th tile
TOTAL_PAIRS = ROWS * (COLS - 1) + COLS * (ROWS - 1)
LAST_ROW_PAIRS = (COLS - 1) + COLS  #: the pairs within the last row and those joining it to the row above


def _tiles(kind: str, seed: int) -> list[tuple[int, int, np.ndarray]]:
    return scan_tiles(kind, rows=ROWS, cols=COLS, tile=TILE, overlap=OVERLAP, seed=seed)


@dataclass
class Scenario:
    cfg: Any
    writers: dict[str, ScanWriter]
    messages: list[tuple[str, dict]]
    live: dict[str, dict[str, Any]] = field(default_factory=dict)  #: chip -> its live set as health last showed it
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    completed_at: dict[str, float] = field(default_factory=dict)
    verdict_at: dict[str, float] = field(default_factory=dict)
    status_text: str = ""  #: `imageqc status` while the good chip was being scanned


def _config(tmp: Path, hook_env: str) -> Any:
    text = f"""
state_dir = "state"
[[watch]]
path = "inbox"
settle_seconds = {scaled(6):g}
[discovery]
grouping_window_s = 0
rescan_interval_s = 2
poll_interval_s = 0.5
[service]
tick_seconds = 0.2
lease_seconds = 60
[logging]
console = "off"
[qc]
priority = "normal"
threads = 2
[live]
priority = "normal"
tile_settle_s = 0.5
poll_s = 0.3
[[notify.rule]]
name = "lab"
urls = ["env:{hook_env}"]
events = ["early_warning", "qc_fail"]
"""
    (tmp / "inbox").mkdir()
    (tmp / "imageqc.toml").write_text(text, encoding="utf-8")
    return load_config_text(text, file=str(tmp / "imageqc.toml"), base=tmp)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("live")
    hook = Webhook()
    os.environ["IMAGEQC_TEST_LIVE_HOOK"] = hook.url
    cfg = _config(tmp, "IMAGEQC_TEST_LIVE_HOOK")
    again = _tiles("good", 4)
    plan = {  # each chip its own content: the service's pair cache must not answer for another chip
        GOOD: _tiles("good", 1),
        BLURRED: _tiles("blurred_rows", 2),
        NO_LINES: _tiles("no_lines", 3)[:NO_LINES_STOP],
        REWRITTEN: again,
    }
    info = {"rows": ROWS, "cols": COLS, "overlap": OVERLAP, "tile_width": TILE, "tile_height": TILE}
    r, c, px = again[COLS + 1]  # tile (1, 1) acquired again: brighter
    reacquired = (r, c, np.clip(px.astype(np.int16) + 3, 0, 255).astype(px.dtype))
    writers = {
        chip: ScanWriter(
            tmp / "inbox" / chip,
            tiles,
            scaled(SCAN_S) * len(tiles) / (ROWS * COLS),  # every microscope at the same pace
            info,
            rewrite={REWRITE_AFTER: reacquired} if chip == REWRITTEN else {},
        )
        for chip, tiles in plan.items()
    }
    complete = [GOOD, BLURRED, REWRITTEN]  # the scans that finish (and get their final QC)
    d = Daemon(cfg, components=default_components(cfg))
    d.start()
    sc = Scenario(cfg, writers, hook.messages)
    live = next(c for c in d.components if c.name == "live")
    try:
        for w in writers.values():
            w.start()
        deadline = time.monotonic() + scaled(SCAN_S) * 3 + scaled(240)
        with Store(cfg.database_path, readonly=True) as store:
            while time.monotonic() < deadline:
                for s in live.health()["sets"]:
                    sc.live[s["chip"]] = s
                g = sc.live.get(GOOD) or {}
                if not sc.status_text and g.get("fovs_checked", 0) >= 20 and g.get("finished_at") is None:
                    out = io.StringIO()
                    with contextlib.redirect_stdout(out):
                        main(["status", "--config", str(tmp / "imageqc.toml")])
                    sc.status_text = out.getvalue()
                for chip in complete:
                    if chip in sc.reports:
                        continue
                    jobs = [j for j in store.list_jobs(chip=chip) if j.state not in ("superseded",)]
                    if jobs and chip not in sc.completed_at:
                        sc.completed_at[chip] = jobs[-1].created_at
                    done = [j for j in jobs if j.state in (JobState.DONE.value, JobState.SKIPPED.value)]
                    if done:
                        result = store.get_result(done[0].id)
                        sc.reports[chip] = result["report"]
                        sc.verdict_at[chip] = done[0].updated_at
                    failed = [j for j in jobs if j.state == JobState.FAILED.value]
                    if failed:
                        pytest.fail(f"{chip}: QC job failed: {failed[0].error}")
                if len(sc.reports) == len(complete):
                    break
                time.sleep(0.3)
        for w in writers.values():
            w.join(scaled(30))
        for s in live.health()["sets"]:
            sc.live[s["chip"]] = s
        assert len(sc.reports) == len(complete), (
            f"reports for {sorted(sc.reports)} only; live: {json.dumps(sc.live)[:2000]}"
        )
        yield sc
    finally:
        for w in writers.values():
            w.stop()
        d.stop()
        hook.close()
        os.environ.pop("IMAGEQC_TEST_LIVE_HOOK", None)


def _stitching(report: dict[str, Any]) -> dict[str, Any]:
    return next(im["stitching"] for im in report["images"] if im.get("stitching"))


def _warnings(sc: Scenario, chip: str) -> list[dict[str, Any]]:
    return [m for _, m in sc.messages if chip in m.get("title", "")]


def test_a_good_chip_gets_no_warning_and_its_final_qc_reuses_the_live_pairs(scenario):
    s = scenario.live[GOOD]
    assert s["warnings"] == [] and s["cleared"] == [], s
    assert not _warnings(scenario, GOOD)
    assert s["fovs_checked"] == ROWS * COLS and s["skipped"] == 0, s
    st = _stitching(scenario.reports[GOOD])
    assert st["pairs_total"] == TOTAL_PAIRS
    assert st["pairs_computed"] <= LAST_ROW_PAIRS, st  # at most the last row's pairs anew


def test_blurred_first_rows_warn_before_the_scan_ends_and_the_warning_clears(scenario):
    msgs = _warnings(scenario, BLURRED)
    titles = [m["title"] for m in msgs]
    assert any("early warning" in t and "blur" in t and "cleared" not in t for t in titles), titles
    assert any("cleared" in t and "blur" in t for t in titles), titles
    s = scenario.live[BLURRED]
    assert "blur" in {c["code"] for c in s["cleared"]}, s
    raised = next(w for w in s["history"] if w["code"] == "blur" and w["event"] == "raised")
    last_tile = scenario.writers[BLURRED].written[-1][2]
    assert raised["at"] < last_tile, (raised, last_tile)


def test_a_chip_without_track_lines_warns_within_the_first_15_percent_of_tiles(scenario):
    s = scenario.live[NO_LINES]
    raised = next(w for w in s["history"] if w["code"] == "no_track_lines" and w["event"] == "raised")
    assert raised["fovs_checked"] <= 0.15 * ROWS * COLS, raised
    titles = [m["title"] for m in _warnings(scenario, NO_LINES)]
    assert any("no track lines" in t for t in titles), titles


def test_a_tile_rewritten_mid_scan_recomputes_only_its_own_pairs(scenario):
    s = scenario.live[REWRITTEN]
    assert s["rewritten"] == 1 and s["skipped"] == 0, s
    assert s["fovs_computed"] == ROWS * COLS + 1, s
    # tile (1, 1) has four neighbours; all four pairs are registered again with its new content
    assert s["pairs_computed"] == TOTAL_PAIRS + 4, s
    st = _stitching(scenario.reports[REWRITTEN])
    assert st["pairs_computed"] <= LAST_ROW_PAIRS, st


def test_status_shows_a_live_sets_progress_while_it_is_scanned(scenario):
    text = " ".join(scenario.status_text.split())  # as wrapped for an 80-column terminal
    assert "live QC" in text and GOOD in text, text
    assert "scanning" in text and f"of {ROWS * COLS}" in text and "FOVs checked" in text, text


def test_the_status_page_and_the_fleet_document_show_a_scan_on_the_stage_and_its_warning(scenario):
    from daemon.fleet import build_document, judge, pc_line
    from daemon.web_pages import status_page

    row = scenario.live[NO_LINES]  # stopped at 30 tiles: still followed, its warning standing
    assert row["finished_at"] is None and row["warnings"], row
    now = time.time()
    page = status_page({"live": [row], "active": [], "counts": {}}, refresh_s=15, now=now)
    assert "<h2>Live QC</h2>" in page and NO_LINES in page and "no_track_lines" in page, page
    status = {"live": [row], "service": {}, "counts": {}, "disk": {}}
    doc = build_document(scenario.cfg, status, now=now)
    assert doc["live"][0]["chip"] == NO_LINES and doc["live"][0]["warnings"][0]["code"] == "no_track_lines"
    kind, problems = judge(doc, now)
    assert kind == "failing" and any(p.startswith(f"early warning {NO_LINES}") for p in problems), problems
    line = pc_line({"kind": kind, "document": doc, "age_s": 0.0, "problems": problems})
    assert f"scanning {NO_LINES} {row['fovs_checked']}/{ROWS * COLS} FOVs WARNING no_track_lines" in line, line
