"""The summary sheet of a QC run: one picture, about :data:`SUMMARY_WIDTH` px wide, that a notification carries.

From the top: a header band with the verdict in its colour, the chip, stain
and run; every metric of every image with its value, threshold and result
(``pass``, ``FAIL`` for a required metric below its threshold, ``advisory``
for an advisory one, as ``imageqc show`` says); the reasons, wrapped; and
small versions of the run's pictures (:mod:`qc.pictures`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import cv2
import numpy as np

from qc.pictures.parts import (
    INK,
    PAPER,
    VERDICT_COLOURS,
    Legend,
    Picture,
    compose,
    header_band,
    judgement,
    number,
    side_by_side,
    stack,
    text_block,
    wrap,
)

__all__ = ["SUMMARY_PER_ROW", "SUMMARY_WIDTH", "draw_summary"]

#: Width of the summary sheet, px.
SUMMARY_WIDTH = 1600
#: Small versions of the pictures per row of the summary sheet.
SUMMARY_PER_ROW = 4

_COLUMNS = (("Image", 0.33), ("Metric", 0.11), ("Value", 0.22), ("Needs", 0.22), ("Result", 0.12))


def _value_text(c: Mapping[str, Any]) -> str:
    if c.get("detail"):
        return str(c["detail"])
    v = c.get("value")
    return "n/a" if v is None else number(float(v))


def _checks_table(checks: Sequence[Mapping[str, Any]], width: int, legend: Legend) -> np.ndarray:
    pad, lh = 10, 26
    xs, x = [], pad
    for _, share in _COLUMNS:
        xs.append(x)
        x += round((width - 2 * pad) * share)
    rows = []
    head = np.full((lh + 8, width, 3), (230, 230, 230), np.uint8)
    for (name, _), x0 in zip(_COLUMNS, xs, strict=False):
        cv2.putText(head, name, (x0 + 4, lh - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.6, INK, 2, cv2.LINE_AA)
    rows.append(head)
    words = {"pass": "pass", "fail": "FAIL", "advisory": "advisory"}
    for c in checks:
        verdict = judgement(c.get("passed"), bool(c.get("required", True)))
        metric = str(c.get("metric", "")) + ("" if c.get("required", True) else " (advisory)")
        cells = [str(c.get("image", "")), metric, _value_text(c), str(c.get("threshold", ""))]
        wrapped = [
            wrap(t, round((width - 2 * pad) * share) - 12) for t, (_, share) in zip(cells, _COLUMNS, strict=False)
        ]
        n = max(len(wl) for wl in wrapped)
        row = np.full((n * lh + 8, width, 3), PAPER, np.uint8)
        for wl, x0 in zip(wrapped, xs, strict=False):
            for i, t in enumerate(wl):
                cv2.putText(row, t, (x0 + 4, (i + 1) * lh - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.6, INK, 1, cv2.LINE_AA)
        colour = legend.use(
            VERDICT_COLOURS[verdict],
            {
                "pass": "pass",
                "fail": "FAIL: a required metric below its threshold",
                "advisory": "advisory: below, does not fail QC",
                "n/a": "not judged",
            }[verdict],
        )
        x0 = xs[-1]
        row[3 : lh + 3, x0 : width - pad] = colour
        ink = (255, 255, 255) if verdict in ("pass", "fail") else INK
        cv2.putText(
            row, words.get(verdict, verdict), (x0 + 8, lh - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.6, ink, 2, cv2.LINE_AA
        )
        row[-1, pad : width - pad] = (210, 210, 210)
        rows.append(row)
    return stack(rows, width)


def draw_summary(
    report: Any, pictures: Sequence[tuple[str, np.ndarray]] = (), *, width: int = SUMMARY_WIDTH
) -> Picture:
    """One sheet per run: the verdict, every metric of every image, the reasons, and small versions of the pictures.

    ``report`` is a :class:`qc.report.QCReport`; ``pictures`` ``(name, image)`` pairs.
    """
    verdict = "pass" if report.verdict == "pass" else "fail"
    legend = Legend()
    checks = list(report.checks)
    failed = sum(1 for c in checks if not c.get("passed") and c.get("required", True))
    advisory = sum(1 for c in checks if not c.get("passed") and not c.get("required", True))
    when = datetime.fromtimestamp(report.started_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if verdict == "pass":
        metric = f"QC passed: {len(checks)} metric(s) checked" + (f", {advisory} advisory" if advisory else "")
    else:
        metric = (
            f"QC failed: {failed} required metric(s) below threshold" if failed else "QC failed: QC could not run fully"
        )
    details = [
        f"chip {report.chip} | stain {report.stain} | {len(report.images)} image(s)",
        f"started {when} | imageqc {report.software_version}"
        + (f" | site {report.site}" if report.site else "")
        + (f" | operator {report.operator}" if report.operator else ""),
    ]
    header = header_band(verdict, metric, details, width)
    parts = [header, text_block(["Metrics"], width, scale=0.75, thick=2)]
    parts.append(
        _checks_table(checks, width, legend) if checks else text_block(["No metric could be measured."], width)
    )
    reasons = [f"- {r}" for r in report.reasons] or ["- none: every metric passed"]
    parts.append(text_block(["Reasons (failures first, then advisories)"], width, scale=0.75, thick=2))
    parts.append(text_block(reasons, width))
    if pictures:
        parts.append(text_block(["Pictures (each shown in full in its own file)"], width, scale=0.75, thick=2))
        # small versions: four a row, never enlarged (kept small: the sheet is what a message carries)
        per_row = SUMMARY_PER_ROW
        cell_w = (width - 20 - 12 * (per_row - 1)) // per_row
        cells = []
        for name, img in pictures:
            w = min(cell_w, img.shape[1])
            small = cv2.resize(img, (w, max(1, round(img.shape[0] * w / img.shape[1]))), interpolation=cv2.INTER_AREA)
            cells.append(stack([small, text_block([name], cell_w, scale=0.5)], cell_w))
        for k in range(0, len(cells), per_row):
            row = side_by_side(cells[k : k + per_row])
            parts.append(cv2.copyMakeBorder(row, 0, 12, 10, 0, cv2.BORDER_CONSTANT, value=PAPER))
    body = stack(parts[1:], width)
    band = legend.band(width) if legend.entries else np.zeros((0, width, 3), np.uint8)  # no table, no colours
    return compose(header, body, band, verdict, legend.entries)
