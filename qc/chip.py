"""Stereo-seq chip serials, chip sizes and track-line templates.

A chip serial names one Stereo-seq chip. Two forms are in use (public STOmics
sources: CellBin ``iqc/qc_util.py`` and cellbin2 ``utils/stereo_chip.py``):

Long serials, ``<prefix><8 digits>[<corner>]_<position>``
    ``SS200000135TL_D1``, ``FP200009107_E414``, ``SS200000108BR_A3A4``,
    ``DP8400000006BL_E4``. The prefix is the product family followed by the
    template generation: ``SS2``/``FP2`` (500 nm pitch), ``SS1``/``FP1``
    (600 nm), ``DP84``/``SS84`` and the older ``DP8`` (715 nm, "T1").
    The optional corner (``TL``, ``TR``, ``BL``, ``BR``) names the quarter of
    the wafer the chip was cut from.

Short serials, ``<letter><5 digits><position>``
    ``C02533C``, ``A02677B5``, ``B03210C211``, ``D02070C3D3``, ``Y00035MD``.
    They always use the SS2 template.

The position is where the chip sat on the wafer grid: rows are letters,
columns are digits ``1-9`` then letters (``A``, ``B``...), one grid cell is
1 cm. A 2-character position (``D1``, ``MD``) or a single letter (``C``) is
a 1 x 1 cm chip; 4 characters ending in ``11``-``14`` (``E414``) is a
quarter of the cell, a 0.5 x 0.5 cm chip; otherwise 4 characters are the
first and last cell of a block (``A3A4``, ``C3D3``), which spans
(row-letter difference + 1) cells in height and (column difference + 1)
cells in width.

Templates list the distances between consecutive track lines, in DNB
(one DNB = ``pitch_nm`` on the chip); the pattern repeats every ``period``
DNB and is the same in x and y.

Serials are matched exactly (upper case, no surrounding spaces): this module
decides what the service treats as a chip, so it is strict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from qc.errors import ChipSerialError

__all__ = [
    "PREFIX_TEMPLATES",
    "TEMPLATES",
    "ChipSerial",
    "ChipTemplate",
    "chip_size_px",
    "chip_size_um",
    "is_chip_serial",
    "parse_chip",
    "template_for",
]


@dataclass(frozen=True)
class ChipTemplate:
    """The track-line template of a chip family.

    Parameters
    ----------
    name : str
        ``"SS2"``, ``"SS1"`` or ``"DP84"``.
    offsets : tuple of int
        Distances between consecutive track lines, in DNB. Line 0 is at chip
        coordinate 0, line ``k + 1`` at ``offsets[0] + ... + offsets[k]``.
    pitch_nm : float
        DNB pitch on the chip, in nanometres.
    """

    name: str
    offsets: tuple[int, ...]
    pitch_nm: float

    @property
    def period(self) -> int:
        """Length of one template repeat, in DNB (2940 for SS2)."""
        return int(sum(self.offsets))

    @property
    def positions(self) -> tuple[int, ...]:
        """Chip coordinates of lines 0..len(offsets)-1 within one period, in DNB."""
        out = [0]
        for step in self.offsets[:-1]:
            out.append(out[-1] + step)
        return tuple(out)

    def line_position(self, index: int) -> int:
        """Chip coordinate (DNB) of track line ``index`` (any integer; 0 is at 0)."""
        return int(self.line_positions(np.asarray([index]))[0])

    def line_positions(self, indices: np.ndarray) -> np.ndarray:
        """Chip coordinates (DNB, float64) of track lines ``indices`` (any integers): the one place
        the template's repeat is unrolled."""
        k = np.asarray(indices, dtype=np.int64)
        pos = np.asarray(self.positions, dtype=np.float64)
        n = len(pos)
        return (k // n) * float(self.period) + pos[k % n]

    def line_indices(self, lo: float, hi: float) -> np.ndarray:
        """Indices of the lines with chip coordinate in ``[lo, hi]`` (DNB), ascending."""
        n, p = len(self.offsets), self.period
        k = np.arange((math.floor(lo / p) - 1) * n, (math.ceil(hi / p) + 1) * n + 1)
        u = self.line_positions(k)
        return k[(u >= lo) & (u <= hi)]

    def px_per_dnb(self, um_per_px: float) -> float:
        """Expected image scale (image px per DNB) for a pixel size in um/px."""
        return (self.pitch_nm / 1000.0) / float(um_per_px)


#: The known templates, by name.
TEMPLATES: dict[str, ChipTemplate] = {
    "SS2": ChipTemplate("SS2", (240, 300, 330, 390, 390, 330, 300, 240, 420), 500.0),
    "SS1": ChipTemplate("SS1", (192, 240, 288, 312, 312, 288, 240, 192, 384), 600.0),
    "DP84": ChipTemplate("DP84", (112, 144, 208, 224, 224, 208, 144, 112, 160), 715.0),
}

#: Long-serial prefix -> template name. Short serials use ``"SS2"``.
PREFIX_TEMPLATES: dict[str, str] = {
    "SS2": "SS2",
    "FP2": "SS2",
    "SS1": "SS1",
    "FP1": "SS1",
    "DP84": "DP84",
    "SS84": "DP84",
    "DP8": "DP84",
}

# Longest prefixes first so that DP84 wins over DP8 when both could match.
_PREFIX_RE = "|".join(sorted(PREFIX_TEMPLATES, key=len, reverse=True))
_LONG = re.compile(
    rf"(?P<prefix>{_PREFIX_RE})(?P<number>[0-9]{{8}})(?P<corner>TL|TR|BL|BR)?"
    r"_(?P<position>[A-Z0-9]{2}|[A-Z0-9]{4})"
)
#: First letters of short serials (cellbin2's list of chip title letters).
SHORT_LETTERS = "ABCDEFGHJKLMNPQSY"
_SHORT = re.compile(
    rf"(?P<prefix>[{SHORT_LETTERS}])(?P<number>[0-9]{{5}})(?P<position>[A-Z][A-Z0-9]?|[A-Z][A-Z0-9][A-Z0-9]{{2}})"
)
_COLUMNS = "123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ChipSerial:
    """A parsed chip serial.

    Attributes
    ----------
    serial : str
        The serial as given, e.g. ``"SS200000135TL_D1"``.
    kind : str
        ``"long"`` or ``"short"``.
    prefix : str
        Long serials: the family and generation (``"SS2"``, ``"FP1"``,
        ``"DP84"``...). Short serials: the first letter (``"A"``..``"Y"``).
    number : str
        The production number: 8 digits (long) or 5 digits (short).
    corner : str or None
        Long serials only: ``"TL"``, ``"TR"``, ``"BL"``, ``"BR"`` or ``None``.
    position : str
        The wafer position suffix: ``"D1"``, ``"A3A4"``, ``"E414"``, ``"C"``.
    template : str
        Name of the track-line template (a key of :data:`TEMPLATES`).
    pitch_nm : float
        DNB pitch of that template, in nm.
    size_cm : tuple of float
        Nominal chip size ``(width, height)`` in cm: columns across, rows down.
    """

    serial: str
    kind: str
    prefix: str
    number: str
    corner: str | None
    position: str
    template: str
    pitch_nm: float
    size_cm: tuple[float, float]


def _column_index(ch: str) -> int:
    return _COLUMNS.index(ch)


def _position_size(position: str) -> tuple[float, float] | None:
    """Chip size (w, h) in cm from a position suffix, or None if malformed."""
    n = len(position)
    if n == 1:
        return (1.0, 1.0) if position.isalpha() else None
    if n == 2:
        row, col = tuple(position)
        return (1.0, 1.0) if row.isalpha() and col in _COLUMNS else None
    if n != 4:
        return None
    if position[2:] in ("11", "12", "13", "14"):
        row, col = tuple(position[:2])
        return (0.5, 0.5) if row.isalpha() and col in _COLUMNS else None
    r1, c1, r2, c2 = tuple(position)
    if not (r1.isalpha() and r2.isalpha() and c1 in _COLUMNS and c2 in _COLUMNS):
        return None
    rows = ord(r2) - ord(r1) + 1
    cols = _column_index(c2) - _column_index(c1) + 1
    if rows < 1 or cols < 1:
        return None
    return (float(cols), float(rows))


def parse_chip(name: object) -> ChipSerial | None:
    """Parse a chip serial; ``None`` when ``name`` is not one.

    Never raises, whatever ``name`` is (any object, any text).

    Parameters
    ----------
    name : str
        A candidate serial, e.g. a file or folder name without extension.

    Returns
    -------
    ChipSerial or None
    """
    if not isinstance(name, str) or not 7 <= len(name) <= 20:
        return None
    m = _LONG.fullmatch(name)
    if m is not None:
        size = _position_size(m["position"])
        if size is None:
            return None
        tname = PREFIX_TEMPLATES[m["prefix"]]
        return ChipSerial(
            serial=name,
            kind="long",
            prefix=m["prefix"],
            number=m["number"],
            corner=m["corner"],
            position=m["position"],
            template=tname,
            pitch_nm=TEMPLATES[tname].pitch_nm,
            size_cm=size,
        )
    m = _SHORT.fullmatch(name)
    if m is not None:
        size = _position_size(m["position"])
        if size is None:
            return None
        return ChipSerial(
            serial=name,
            kind="short",
            prefix=m["prefix"],
            number=m["number"],
            corner=None,
            position=m["position"],
            template="SS2",
            pitch_nm=TEMPLATES["SS2"].pitch_nm,
            size_cm=size,
        )
    return None


def is_chip_serial(name: object) -> bool:
    """True when :func:`parse_chip` recognises ``name``. Never raises."""
    return parse_chip(name) is not None


def template_for(chip: ChipSerial | str) -> ChipTemplate:
    """The track-line template of a chip.

    Parameters
    ----------
    chip : ChipSerial or str
        A parsed serial, a serial string, or a template name (``"SS2"``,
        ``"SS1"``, ``"DP84"``).

    Raises
    ------
    ChipSerialError
        When a string is neither a template name nor a chip serial.
    """
    if isinstance(chip, ChipSerial):
        return TEMPLATES[chip.template]
    if isinstance(chip, str):
        if chip in TEMPLATES:
            return TEMPLATES[chip]
        parsed = parse_chip(chip)
        if parsed is not None:
            return TEMPLATES[parsed.template]
    msg = f"{chip!r} is neither a chip serial nor a template name"
    raise ChipSerialError(
        msg,
        hint=f"Name the scan after its chip (e.g. SS200000135TL_D1) or pass one of {sorted(TEMPLATES)}",
    )


def chip_size_um(chip: ChipSerial) -> tuple[float, float]:
    """Nominal chip size ``(width, height)`` in micrometres."""
    w, h = chip.size_cm
    return (w * 1e4, h * 1e4)


def chip_size_px(chip: ChipSerial, *, um_per_px: float) -> tuple[float, float]:
    """Nominal chip size ``(width, height)`` in image pixels.

    Parameters
    ----------
    chip : ChipSerial
    um_per_px : float
        Image pixel size in micrometres (about 0.5 at 10x).
    """
    if not um_per_px > 0:
        msg = f"um_per_px must be positive, got {um_per_px!r}"
        raise ValueError(msg)
    w, h = chip_size_um(chip)
    return (w / um_per_px, h / um_per_px)
