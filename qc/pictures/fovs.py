"""The per-FOV map of a tiled image: each field of view a cell of the grid, coloured by its checks.

The checks are :class:`qc.live.FovCheck` objects (read by attribute: ``row``, ``col``,
``track_found``, ``focus``, ``blurred``, ``over_exposed``, ``empty``). A cell's fill is its focus
(sharp, blurred, or no structure to judge it by: bare chip surface), except that an over-exposed FOV
is filled magenta and a dark (empty) one dark blue; a red cross marks a FOV without track lines. The
clarity model's score is not drawn: on real-looking dark chips it is information, not a verdict. A grid cell with no FOV is left
as paper with a thin outline. No text is written in the cells: the legend names every colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from qc.pictures.parts import BGR, PAPER, Legend, Picture, compose, header_band

__all__ = ["BLURRED_SCORE", "GOOD_SCORE", "draw_fov_map"]

#: Clarity score at or above which a FOV counts as clear (the clarity criterion); information only.
GOOD_SCORE = 80.0
#: Clarity score below which the clarity model calls a FOV blurred; information only (the map and live QC's
#: blur rule use the focus measure, :attr:`qc.live.FovCheck.blurred`).
BLURRED_SCORE = 60.0

_GOOD: BGR = (60, 200, 60)
_BLURRED: BGR = (0, 150, 255)
_NO_SCORE: BGR = (200, 200, 200)
_NO_LINES: BGR = (40, 40, 230)
_OVER: BGR = (200, 40, 200)
_DARK: BGR = (110, 40, 20)
_OUTLINE: BGR = (120, 120, 120)


def draw_fov_map(
    checks: Sequence[Any],
    grid: tuple[int, int] | None,
    *,
    title: str,
    chip: str = "",
    stain: str = "",
    width: int = 900,
) -> Picture:
    """The grid of FOVs coloured by state, with a header (counts) and a legend.

    Parameters
    ----------
    checks : sequence of FovCheck
    grid : (rows, cols), optional
        Default: from the checks' largest row and column.
    title : str
        The image's name.
    width : int
        The picture's width in px; cells are square.
    """
    rows = max([grid[0] if grid else 0, *(c.row + 1 for c in checks)])
    cols = max([grid[1] if grid else 0, *(c.col + 1 for c in checks)])
    rows, cols = max(rows, 1), max(cols, 1)
    pad, gap = 12, 3
    cell = int(np.clip((width - 2 * pad) // cols, 6, 80))
    body = np.full((2 * pad + rows * cell, max(width, 2 * pad + cols * cell), 3), PAPER, np.uint8)
    legend = Legend()
    by_cell = {(c.row, c.col): c for c in checks}
    for r in range(rows):
        for col in range(cols):
            x0, y0 = pad + col * cell + gap // 2, pad + r * cell + gap // 2
            x1, y1 = x0 + cell - gap, y0 + cell - gap
            c = by_cell.get((r, col))
            if c is None:
                cv2.rectangle(body, (x0, y0), (x1, y1), legend.use(_OUTLINE, "no FOV (yet)"), 1)
                continue
            if c.over_exposed:
                fill = legend.use(_OVER, "over-exposed")
            elif c.empty:
                fill = legend.use(_DARK, "dark, nearly empty")
            elif c.blurred:
                fill = legend.use(_BLURRED, "blurred (focus measure)")
            elif c.focus is not None:
                fill = legend.use(_GOOD, "sharp (focus measure)")
            else:
                fill = legend.use(_NO_SCORE, "no structure to judge focus by (bare chip surface)")
            cv2.rectangle(body, (x0, y0), (x1, y1), fill, -1)
            t = max(2, cell // 12)
            if not c.track_found:
                colour = legend.use(_NO_LINES, "no track lines found (cross)")
                m = max(3, cell // 5)
                cv2.line(body, (x0 + m, y0 + m), (x1 - m, y1 - m), colour, t, cv2.LINE_AA)
                cv2.line(body, (x0 + m, y1 - m), (x1 - m, y0 + m), colour, t, cv2.LINE_AA)
    n = len(checks)
    lines = sum(1 for c in checks if c.track_found)
    over = sum(1 for c in checks if c.over_exposed)
    blurred = sum(1 for c in checks if not c.over_exposed and c.blurred)
    where = " | ".join(
        p for p in (f"chip {chip}" if chip else "", f"stain {stain}" if stain else "", f"image {title}") if p
    )
    details = [
        where,
        f"grid {rows} x {cols}: {n} FOVs checked one by one (track lines, focus, exposure)",
        f"without track lines {n - lines}, blurred {blurred}, over-exposed {over}",
    ]
    w = body.shape[1]
    header = header_band("n/a", f"FOVs with track lines {lines} of {n}", details, w)
    notes = ["Each cell is one field of view at its grid position (row down, column right)."]
    return compose(header, body, legend.band(w, notes=notes), "n/a", legend.entries)
