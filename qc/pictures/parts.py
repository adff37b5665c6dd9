"""The parts every QC picture is built of: text bands, the header, the legend.

Text is never written over an image: it goes on bands with a plain
background above (the header) and below (captions, the legend) the image.
Text uses OpenCV's Hershey font at sizes legible at 100 % (no font files are
read or downloaded); it is ASCII only, so other characters are replaced.

Every colour drawn on a picture goes through a :class:`Legend`, which
records it with its meaning and renders the legend band, so a colour cannot
be drawn without being named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = [
    "BGR",
    "INK",
    "PAPER",
    "STRIPE_PX",
    "VERDICT_COLOURS",
    "Legend",
    "Picture",
    "ascii_text",
    "compose",
    "header_band",
    "judgement",
    "number",
    "side_by_side",
    "stack",
    "text_block",
    "wrap",
]

BGR = tuple[int, int, int]

FONT = cv2.FONT_HERSHEY_SIMPLEX
#: Body text: about 14 px capitals, readable at 100 %.
BODY = 0.6
#: The metric line of a header.
TITLE = 0.75
#: Bands' background and text colour.
PAPER: BGR = (250, 250, 250)
INK: BGR = (25, 25, 25)
#: Verdict colours (BGR) of the header band: pass green, FAIL red, advisory amber, not judged grey.
VERDICT_COLOURS: dict[str, BGR] = {
    "pass": (40, 140, 30),
    "fail": (40, 40, 210),
    "advisory": (0, 170, 255),
    "n/a": (150, 150, 150),
}
_VERDICT_WORDS = {"pass": "PASS", "fail": "FAIL", "advisory": "ADVISORY", "n/a": "NOT JUDGED"}
_VERDICT_INK = {"pass": (255, 255, 255), "fail": (255, 255, 255), "advisory": INK, "n/a": INK}
#: Height of the verdict-coloured stripe across the top of every header band.
STRIPE_PX = 8
_PAD = 10
_VERDICT_BOX_W = 190


def number(x: float | None) -> str:
    """A value as the reports print it: whole numbers from 10 up, else three significant digits."""
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    x = float(x)
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.3g}"


def judgement(passed: bool | None, required: bool) -> str:
    """``pass``, ``fail`` (a required metric below its threshold) or ``advisory`` (an advisory one); ``n/a`` when not judged."""
    if passed is None:
        return "n/a"
    if passed:
        return "pass"
    return "fail" if required else "advisory"


def ascii_text(text: str) -> str:
    """What the Hershey font can draw: ASCII, other characters as ``?``."""
    return str(text).encode("ascii", "replace").decode("ascii")


def _text_w(text: str, scale: float, thick: int = 1) -> int:
    return cv2.getTextSize(text, FONT, scale, thick)[0][0]


def wrap(text: str, width: int, scale: float = BODY, thick: int = 1) -> list[str]:
    """``text`` broken into lines no wider than ``width`` px (words longer than a line are cut)."""
    lines: list[str] = []
    cur = ""
    for word in ascii_text(text).split():
        while _text_w(word, scale, thick) > width and len(word) > 1:  # a long name: cut it
            cut = len(word)
            while cut > 1 and _text_w(word[:cut], scale, thick) > width:
                cut -= 1
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:cut])
            word = word[cut:]
        trial = f"{cur} {word}".strip()
        if cur and _text_w(trial, scale, thick) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    if cur:
        lines.append(cur)
    return lines or [""]


def _shorten(text: str, width: int, scale: float = BODY) -> str:
    """``text`` cut to ``width`` px, ending in ``...`` when cut."""
    if _text_w(text, scale) <= width:
        return text
    while text and _text_w(text + "...", scale) > width:
        text = text[:-1]
    return text + "..."


def _line_h(scale: float) -> int:
    return round(40 * scale)


def text_block(
    lines: list[str],
    width: int,
    *,
    scale: float = BODY,
    thick: int = 1,
    colour: BGR = INK,
    bg: BGR = PAPER,
    pad: int = _PAD,
) -> np.ndarray:
    """A band ``width`` px wide holding ``lines`` (each wrapped to fit)."""
    wrapped = [w for line in lines for w in wrap(line, width - 2 * pad, scale, thick)]
    lh = _line_h(scale)
    band = np.full((len(wrapped) * lh + pad, width, 3), bg, np.uint8)
    for k, text in enumerate(wrapped):
        cv2.putText(
            band, text, (pad, pad // 2 + (k + 1) * lh - round(lh * 0.3)), FONT, scale, colour, thick, cv2.LINE_AA
        )
    return band


def header_band(verdict: str, metric: str, details: list[str], width: int) -> np.ndarray:
    """The band above a picture: a stripe and a box in the verdict's colour with its word, then the metric and details.

    ``metric`` is the value against its threshold (``"track line score 12 < 60"``);
    ``details`` the chip, stain and image, and anything else worth a line.
    """
    colour = VERDICT_COLOURS[verdict]
    text_w = max(width - _VERDICT_BOX_W, 200)
    body = stack([text_block([metric], text_w, scale=TITLE, thick=2), text_block(details, text_w)], text_w)
    h = max(body.shape[0] + _PAD, 70)
    band = np.full((STRIPE_PX + h, width, 3), PAPER, np.uint8)
    band[:STRIPE_PX] = colour
    band[STRIPE_PX:, : _VERDICT_BOX_W - _PAD] = colour
    word = _VERDICT_WORDS[verdict]
    scale = 1.1 if _text_w(word, 1.1, 2) < _VERDICT_BOX_W - 3 * _PAD else 0.8
    tw, th = cv2.getTextSize(word, FONT, scale, 2)[0]
    x = max(4, (_VERDICT_BOX_W - _PAD - tw) // 2)
    y = STRIPE_PX + (h + th) // 2
    cv2.putText(band, word, (x, y), FONT, scale, _VERDICT_INK[verdict], 2, cv2.LINE_AA)
    band[STRIPE_PX + _PAD // 2 : STRIPE_PX + _PAD // 2 + body.shape[0], _VERDICT_BOX_W : _VERDICT_BOX_W + text_w] = (
        body[:, : width - _VERDICT_BOX_W]
    )
    return band


def stack(parts: list[np.ndarray], width: int | None = None, *, bg: BGR = PAPER, gap: int = 0) -> np.ndarray:
    """Parts one below the other, left-aligned on ``bg``, ``width`` px wide (default the widest)."""
    parts = [p for p in parts if p is not None and p.size]
    width = width or max(p.shape[1] for p in parts)
    h = sum(p.shape[0] for p in parts) + gap * max(len(parts) - 1, 0)
    out = np.full((h, width, 3), bg, np.uint8)
    y = 0
    for p in parts:
        w = min(p.shape[1], width)
        out[y : y + p.shape[0], :w] = p[:, :w]
        y += p.shape[0] + gap
    return out


def side_by_side(parts: list[np.ndarray], *, bg: BGR = PAPER, gap: int = 12) -> np.ndarray:
    """Parts left to right, top-aligned on ``bg``."""
    h = max(p.shape[0] for p in parts)
    w = sum(p.shape[1] for p in parts) + gap * (len(parts) - 1)
    out = np.full((h, w, 3), bg, np.uint8)
    x = 0
    for p in parts:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


@dataclass
class Legend:
    """The colours a picture draws, each with what it means, in the order first used."""

    entries: dict[BGR, str] = field(default_factory=dict)

    def use(self, colour: BGR, meaning: str) -> BGR:
        """Record ``colour`` as drawn with ``meaning``; returns it (to draw with)."""
        colour = tuple(int(c) for c in colour)  # type: ignore[assignment]
        self.entries.setdefault(colour, meaning)
        return colour

    def band(self, width: int, *, notes: list[str] | None = None) -> np.ndarray:
        """The legend band: a swatch of each colour (exactly as drawn) and its meaning, then ``notes``."""
        sw, sh, lh = 26, 18, 30
        room = width - 2 * _PAD - sw - 8
        items = [(c, _shorten(ascii_text(m), room)) for c, m in self.entries.items()]
        if not items:
            return stack(
                [
                    text_block(["Legend: nothing is drawn over the image."], width),
                    *([text_block(notes, width)] if notes else []),
                ],
                width,
            )
        rows: list[list[tuple[int, BGR, str]]] = [[]]
        x = _PAD + _text_w("Legend:", BODY, 2) + 12
        for colour, meaning in items:
            need = sw + 8 + _text_w(meaning, BODY) + 24
            if rows[-1] and x + need > width - _PAD:
                rows.append([])
                x = _PAD
            rows[-1].append((x, colour, meaning))
            x += need
        band = np.full((len(rows) * lh + _PAD, width, 3), PAPER, np.uint8)
        cv2.putText(band, "Legend:", (_PAD, _PAD + 18), FONT, BODY, INK, 2, cv2.LINE_AA)
        for r, row in enumerate(rows):
            y = _PAD + r * lh
            for x0, colour, meaning in row:
                cv2.rectangle(band, (x0 - 1, y - 1), (x0 + sw, y + sh), INK, 1)
                band[y : y + sh, x0 : x0 + sw] = colour
                cv2.putText(band, meaning, (x0 + sw + 8, y + 15), FONT, BODY, INK, 1, cv2.LINE_AA)
        if notes:
            band = stack([band, text_block(notes, width)], width)
        return band


@dataclass(frozen=True)
class Picture:
    """A drawn picture and what it shows.

    Attributes
    ----------
    image : ndarray
        BGR, uint8.
    verdict : str
        ``pass``, ``fail``, ``advisory`` or ``n/a`` (the header's word and colour).
    legend : dict
        Every colour drawn (BGR) and its meaning.
    header_rows, legend_rows : (int, int)
        Rows ``[start, stop)`` of the header band and of the legend band.
    insets : tuple of (x, y, w, h)
        Where full-resolution crops sit in ``image`` (drawn 1:1).
    """

    image: np.ndarray
    verdict: str
    legend: dict[BGR, str]
    header_rows: tuple[int, int]
    legend_rows: tuple[int, int]
    insets: tuple[tuple[int, int, int, int], ...] = ()


def compose(
    header: np.ndarray,
    body: np.ndarray,
    legend: np.ndarray,
    verdict: str,
    entries: dict[BGR, str],
    insets: tuple[tuple[int, int, int, int], ...] = (),
) -> Picture:
    """Header above ``body`` above the legend band; ``insets`` are given in ``body``'s coordinates."""
    width = max(header.shape[1], body.shape[1], legend.shape[1])
    image = stack([header, body, legend], width)
    h0, h1 = header.shape[0], header.shape[0] + body.shape[0]
    moved = tuple((x, y + h0, w, h) for x, y, w, h in insets)
    return Picture(image, verdict, dict(entries), (0, h0), (h1, image.shape[0]), moved)
