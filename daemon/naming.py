"""File and folder names -> scan-set identity.

The grammar (ARCHITECTURE.md, from the StereoMap Image QC manual):

- nuclear stain or H&E: ``<chip>`` as a file ``<chip>.tif|.tiff|.czi`` (any
  case, ``.ome.tif`` too) or a folder ``<chip>/`` of tiles;
- immunofluorescence: ``<chip>_<IFname>_IF``, same forms; the IF name is
  letters, digits and ``-``;
- a QC output archive ``<chip>.tar.gz`` or ``<chip>_<YYYYMMDD>_<HHMMSS>[_<version>].tar.gz``
  (imageqc's), or ``<chip>_SC_<YYYYMMDD>_<HHMMSS>_<version>.tar.gz`` (StereoMap's)
  (re-QC of an earlier run).

The chip part is validated by :func:`qc.chip.parse_chip`. A name that has
the shape of a member but whose chip part is not a serial is ``not_serial``:
with ``naming = "strict"`` it is reported once and ignored, with
``"lenient"`` it is accepted with a warning. Temporary and hidden names
(``~*``, ``.*``, ``*.tmp``, ``*.part``...) and everything else are
``ignored``. :func:`parse_name` never raises, whatever it is given.

A chip's members in one folder group into one scan set: its nuclear image
plus its IF images. An archive is a scan set on its own.

Names are bytes on POSIX: a folder written by a PC set to another code page
is not valid UTF-8, and Python hands it over with the undecodable bytes as
lone surrogates (``"Run\udcff"``). :func:`stored_name` and :func:`loaded_name`
carry such a name through the database losslessly (as its bytes, a BLOB);
:func:`shown_name` is how it is printed and logged (``Run\xff``).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from dataclasses import dataclass
from enum import Enum

from qc.chip import ChipSerial, parse_chip

__all__ = [
    "IF",
    "NUCLEAR",
    "TEMP_PATTERNS",
    "MarkerTemplate",
    "MemberName",
    "NameInfo",
    "NameStatus",
    "glob_regex",
    "is_displayable",
    "is_temporary",
    "loaded_name",
    "looks_like_tile",
    "parse_name",
    "shown_name",
    "stored_name",
]

#: Role of a chip's nuclear-stain (DAPI, ssDNA) or H&E image.
NUCLEAR = "nuclear"
#: Role of an immunofluorescence image.
IF = "IF"

#: Names that are never candidates, whatever the config says: partial and hidden files.
TEMP_PATTERNS = (
    "~*",
    ".*",
    "*.tmp",
    "*.temp",
    "*.part",
    "*.partial",
    "*.filepart",
    "*.crdownload",
    "*.download",
    "*.!sync",
)

_IMAGE_EXTENSIONS = {".tif": "tiff", ".tiff": "tiff", ".czi": "czi"}
_ARCHIVE = ".tar.gz"
_IF_SUFFIX = re.compile(r"(?P<chip>.+)_(?P<stain>[A-Za-z0-9-]+)_IF")
_ARCHIVE_STEM = re.compile(r"(?P<chip>.+?)(?P<stamp>(?:_SC)?_[0-9]{8}_[0-9]{6}(?:_[0-9A-Za-z.+-]+)?)?")
# Tile-naming conventions (Motic/Go Optical rows and columns, Leica linear
# indices, Grid@); a name like these is a tile, never a chip.
_TILE_LIKE = re.compile(r"_[0-9]{3,4}_[0-9]{3,4}(?=[_.]|$)|\[Grid@|--Stage[0-9]|_s[0-9]+(?=[_.]|$)", re.IGNORECASE)
_MAX_NAME = 255


class NameStatus(str, Enum):
    """What a name is to discovery."""

    MEMBER = "member"  #: a scan-set member whose chip part is a chip serial
    NOT_SERIAL = "not_serial"  #: member-shaped, but the chip part is not a serial
    IGNORED = "ignored"  #: not a candidate at all

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class MemberName:
    """What a member's name says.

    Attributes
    ----------
    name : str
        The member name: the file name without its extension, or the folder
        name (``"SS200000135TL_D1_CD31_IF"``).
    chip : str
        The chip part (``"SS200000135TL_D1"``).
    role : str
        ``"nuclear"`` or ``"IF"`` (an archive holds a whole set: ``"nuclear"``).
    stain : str or None
        The IF name (``"CD31"``) of an IF member.
    format : str
        ``"tiff"``, ``"czi"``, ``"tiles"`` (a folder) or ``"tar.gz"``.
    extension : str
        The extension exactly as written (``".TIF"``, ``".ome.tiff"``, ``""`` for folders).
    serial : ChipSerial or None
        The parsed chip serial; ``None`` when the chip part is not one.
    """

    name: str
    chip: str
    role: str
    stain: str | None
    format: str
    extension: str
    serial: ChipSerial | None

    @property
    def file_name(self) -> str:
        """The name on disk (``name + extension``): parsing it gives this member back."""
        return self.name + self.extension

    @property
    def chip_size_cm(self) -> tuple[float, float] | None:
        """Nominal chip size ``(width, height)`` in cm from the serial, if it is one."""
        return None if self.serial is None else self.serial.size_cm


@dataclass(frozen=True)
class NameInfo:
    """The result of :func:`parse_name`.

    ``member`` is set for ``member`` and ``not_serial`` names; ``reason``
    says why a name is not a (serial) member.
    """

    status: NameStatus
    member: MemberName | None = None
    reason: str = ""

    def accepted(self, naming: str = "strict") -> bool:
        """True when discovery takes this name as a member under ``naming`` (strict or lenient)."""
        if self.status is NameStatus.MEMBER:
            return True
        return self.status is NameStatus.NOT_SERIAL and naming == "lenient"


@functools.lru_cache(maxsize=64)
def glob_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled regex for glob patterns, case-insensitive (as Windows matches names)."""
    if not patterns:
        return re.compile(r"(?!)")
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.IGNORECASE)


_TEMP_RE = glob_regex(TEMP_PATTERNS)


def is_temporary(name: str) -> bool:
    """True for partial, temporary and hidden names (:data:`TEMP_PATTERNS`)."""
    return _TEMP_RE.match(name) is not None


def looks_like_tile(stem: str) -> bool:
    """True when a name follows a tile-naming convention (``_RRRR_CCCC``, ``_sNN``, ``--StageNN``, ``[Grid@``)."""
    return bool(_TILE_LIKE.search(stem)) or stem.isdigit()


def _plausible_chip(chip: str) -> bool:
    """Could a person have meant this as a chip name? (lenient naming accepts these)."""
    if not chip or len(chip) > 100 or chip[0] in " .~-_" or chip[-1] in " ." or looks_like_tile(chip):
        return False
    return all(ch.isprintable() and ch not in '/\\:*?"<>|' for ch in chip)


def _split(name: str, is_dir: bool) -> tuple[str, str, str] | None:
    """``(stem, extension, format)`` or None when the extension is not an input format."""
    if is_dir:
        return name, "", "tiles"
    low = name.lower()
    if low.endswith(_ARCHIVE) and len(name) > len(_ARCHIVE):
        return name[: -len(_ARCHIVE)], name[-len(_ARCHIVE) :], "tar.gz"
    dot = name.rfind(".")
    if dot <= 0:
        return None
    ext = low[dot:]
    fmt = _IMAGE_EXTENSIONS.get(ext)
    if fmt is None:
        return None
    stem = name[:dot]
    if fmt == "tiff" and stem.lower().endswith(".ome") and len(stem) > 4:
        return stem[:-4], name[dot - 4 :], fmt
    return stem, name[dot:], fmt


def parse_name(name: object, *, is_dir: bool = False) -> NameInfo:
    """Classify one file or folder name (the last path part, not a path).

    Parameters
    ----------
    name : str
        A file name (``"SS200000135TL_D1.TIF"``) or, with ``is_dir``, a folder name.
    is_dir : bool
        The name is a folder: a tile folder when it has a member's shape.

    Returns
    -------
    NameInfo
        Never raises: any object, any text gives a result.
    """
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        return NameInfo(NameStatus.IGNORED, reason="not a file name")
    if any(ch in name for ch in "/\\\x00") or not name.isprintable():
        return NameInfo(NameStatus.IGNORED, reason="not a plain file name")
    if is_temporary(name):
        return NameInfo(NameStatus.IGNORED, reason="temporary or hidden name")
    parts = _split(name, is_dir)
    if parts is None:
        return NameInfo(NameStatus.IGNORED, reason="not a .tif, .tiff, .czi or .tar.gz file")
    stem, ext, fmt = parts
    stain: str | None = None
    role = NUCLEAR
    if fmt == "tar.gz":
        m = _ARCHIVE_STEM.fullmatch(stem)
        chip = m["chip"] if m else stem  # the shortest prefix that a time stamp may follow
    else:
        m = _IF_SUFFIX.fullmatch(stem)
        if m:
            chip, stain, role = m["chip"], m["stain"], IF
        else:
            chip = stem
    serial = parse_chip(chip)
    member = MemberName(name=stem, chip=chip, role=role, stain=stain, format=fmt, extension=ext, serial=serial)
    if serial is not None:
        return NameInfo(NameStatus.MEMBER, member)
    if not _plausible_chip(chip):
        return NameInfo(NameStatus.IGNORED, reason=f"{chip!r} is neither a chip serial nor a plausible chip name")
    return NameInfo(NameStatus.NOT_SERIAL, member, reason=f"{chip!r} is not a chip serial")


class MarkerTemplate:
    """A site's marker-file name, e.g. ``"{chip}.done"``: when it exists, the chip's set is complete.

    The marker lives in the scan set's folder. ``{chip}`` is the only field.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        if template:
            head, _, tail = template.partition("{chip}")
            self._re = re.compile(re.escape(head) + r"(?P<chip>.+)" + re.escape(tail), re.IGNORECASE) if _ else None
        else:
            self._re = None

    def __bool__(self) -> bool:
        return bool(self.template)

    def name_for(self, chip: str) -> str:
        """The marker's file name for ``chip``."""
        return self.template.replace("{chip}", chip)

    def chip_of(self, name: str) -> str | None:
        """The chip a marker file name announces, or None when ``name`` is no marker."""
        if not self.template:
            return None
        if self._re is None:
            return "" if name.lower() == self.template.lower() else None
        m = self._re.fullmatch(name)
        return m["chip"] if m else None


# -- names whose bytes are not UTF-8 -------------------------------------------------


def is_displayable(name: str) -> bool:
    """True when ``name`` is valid Unicode (no lone surrogates standing for undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def stored_name(name: str) -> str | bytes:
    """``name`` as the database keeps it: the text itself, or its file-system bytes when it is not UTF-8.

    SQLite refuses text that is not valid UTF-8; the bytes (a BLOB) are what
    the file system has, so :func:`loaded_name` gives the same ``str`` back
    and the path still opens.
    """
    return name if is_displayable(name) else os.fsencode(name)


def loaded_name(value: str | bytes | memoryview | None) -> str | None:
    """The inverse of :func:`stored_name` (None stays None)."""
    if value is None or isinstance(value, str):
        return value
    return os.fsdecode(bytes(value))


def shown_name(text: str) -> str:
    """``text`` for people (logs, ``imageqc status``/``show``, messages): undecodable bytes as ``\\xNN``."""
    if is_displayable(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
