"""Tile-folder conventions: row and column from file names, grid completeness.

Pure and cheap: looks at names and small metadata files only, never pixels.
The discovery code calls :func:`inspect_tile_folder` to decide whether a
folder's grid is complete; the tile-folder reader uses the same result.

Conventions (checked in this order; the first that names most files wins):

``motic``
    ``*_RRRR_CCCC_*`` (4-digit row then column), with ``1.ini`` / ``info.ini``.
``go_optical``
    STOmics Go Optical: same names, with ``info.json`` (rows, cols, overlap).
``rowcol``
    The same ``_RRRR_CCCC_`` names without a known metadata file.
``grid_at``
    ``name[Grid@A B].ext``: column A, row B (stitch2d, some camera software).
``leica_stage``
    Leica DM6 B ``...--StageNN...``: linear index, row-major.
``leica_snake``
    Leica DM6 B ``..._sNN_...``: linear index in snake order (row 0 left to
    right, row 1 right to left, ...). The column count comes from a Leica
    XML (``<Tile FieldX= FieldY=>``), else from ``cols=``, else the most
    square grid that holds every index (a guess, reported as such).
``custom``
    A regular expression with named groups ``row`` and ``col`` (or
    ``index`` plus ``cols=``, row-major), passed as ``pattern``.
``tile_configuration``
    Any names, positioned by a Fiji ``TileConfiguration.txt`` (or a
    ``TileConfiguration*.txt`` such as ``.registered``) that lists more of
    the folder's images than any naming convention matches (2-D; comments and
    ``dim =`` lines are skipped). The layout need not be a grid: the tiles
    are listed in the file's order as row 0, column ``i`` (index ``i``), and
    the reader, which knows the tile size, lays out rows and columns from
    the positions; the stitching pairs tiles whose nominal footprints overlap.
    The folder is complete when every listed file exists
    (:attr:`TileFolderInfo.missing_files`).

Indices are 0-based; a folder whose rows (or columns) start at 1 is shifted
to 0. Fiji's ``TileConfiguration.txt`` is read for positions whenever present.
"""

from __future__ import annotations

import configparser
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qc.errors import QCError
from qc.io.regular import open_regular

__all__ = [
    "TILE_SUFFIXES",
    "GridMetadata",
    "TileFolderInfo",
    "TileName",
    "inspect_tile_folder",
    "parse_tile_name",
    "read_grid_metadata",
    "read_tile_configuration",
    "snake_to_grid",
]

#: File suffixes taken as tiles (case-insensitive).
TILE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp")

_ROWCOL = re.compile(r"_(?P<row>\d{4})_(?P<col>\d{4})(?=[_.])")
_GRID_AT = re.compile(r"\[Grid@(?P<col>\d+)\s+(?P<row>\d+)\]")
_STAGE = re.compile(r"--Stage(?P<index>\d+)", re.IGNORECASE)
_SNAKE = re.compile(r"_s(?P<index>\d+)(?=[_.])")
_MAX_INDEX = 10**6


@dataclass(frozen=True)
class TileName:
    """What a tile's file name says: its grid cell (0-based) and, for linear names, its index."""

    file: str
    row: int
    col: int
    index: int | None = None


@dataclass(frozen=True)
class GridMetadata:
    """What a folder's metadata file says; any field may be unknown (``None``)."""

    file: Path | None = None
    rows: int | None = None
    cols: int | None = None
    overlap: float | None = None
    pixel_size_um: float | None = None


@dataclass(frozen=True)
class TileFolderInfo:
    """The result of :func:`inspect_tile_folder`.

    Attributes
    ----------
    convention : str or None
        Which naming convention matched (see module docstring), ``None`` if none.
    rows, cols : int
        Grid size: from the metadata file when it says, else from the names.
    present, missing : tuple of (row, col)
        Cells that have a tile, and cells of the grid that have none.
    duplicates : tuple of (row, col)
        Cells named by more than one file.
    metadata_file : Path or None
        The metadata file read (``info.json``, ``info.ini``, a Leica XML).
    tiles : tuple of TileName
        Every tile file that matched, sorted by (row, col).
    ignored : tuple of str
        Image files in the folder whose names did not match.
    overlap : float or None
        Fractional overlap from the metadata.
    tile_configuration : Path or None
        Fiji ``TileConfiguration*.txt`` when present.
    cols_guessed : bool
        True when a snake-order grid's column count was guessed.
    missing_files : tuple of str
        For the ``tile_configuration`` convention: files the
        ``TileConfiguration`` lists that the folder lacks.
    """

    convention: str | None
    rows: int
    cols: int
    present: tuple[tuple[int, int], ...]
    missing: tuple[tuple[int, int], ...]
    duplicates: tuple[tuple[int, int], ...]
    metadata_file: Path | None
    tiles: tuple[TileName, ...]
    ignored: tuple[str, ...] = ()
    overlap: float | None = None
    tile_configuration: Path | None = None
    cols_guessed: bool = False
    metadata: GridMetadata = field(default_factory=GridMetadata, repr=False)
    missing_files: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Every cell of a non-empty grid has exactly one tile."""
        return bool(self.present) and not self.missing and not self.duplicates


def snake_to_grid(index: int, cols: int) -> tuple[int, int]:
    """``(row, col)`` of a linear index in snake order over ``cols`` columns."""
    row, k = divmod(index, cols)
    return row, (k if row % 2 == 0 else cols - 1 - k)


def _small_int(text: str) -> int | None:
    if len(text) > 7:
        return None
    value = int(text)
    return value if value <= _MAX_INDEX else None


def parse_tile_name(name: str, convention: str, *, pattern: str | re.Pattern[str] | None = None) -> TileName | None:
    """Parse one file name under ``convention``; ``None`` when it does not match.

    Linear conventions (``leica_stage``, ``leica_snake``, ``custom`` with an
    ``index`` group) return ``row=-1, col=-1`` and the index; the caller maps
    indices to cells once it knows the column count. Never raises on a name.
    """
    try:
        if convention in ("motic", "go_optical", "rowcol"):
            m = _ROWCOL.search(name)
        elif convention == "grid_at":
            m = _GRID_AT.search(name)
        elif convention == "leica_stage":
            m = _STAGE.search(name)
        elif convention == "leica_snake":
            m = _SNAKE.search(name)
        elif convention == "custom" and pattern is not None:
            m = re.compile(pattern).search(name)
        else:
            return None
        if m is None:
            return None
        groups = m.groupdict()
        if groups.get("row") is not None and groups.get("col") is not None:
            row, col = _small_int(groups["row"]), _small_int(groups["col"])
            if row is None or col is None:
                return None
            return TileName(name, row, col)
        if groups.get("index") is not None:
            index = _small_int(groups["index"])
            return None if index is None else TileName(name, -1, -1, index)
    except (re.error, ValueError, TypeError, IndexError):
        return None
    return None


_TC_LINE = re.compile(r"^\s*([^;#]+?)\s*;\s*[^;]*;\s*\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)")


#: A TileConfiguration larger than this is not read (a million tiles take about 50 MB).
_TC_MAX_BYTES = 64 * 1024**2


def read_tile_configuration(path: Path) -> dict[str, tuple[float, float]]:
    """Positions ``{file name: (x, y)}`` from a Fiji ``TileConfiguration.txt``, in the file's order.

    Lines are ``name; ; (x, y)`` (a 3-D ``(x, y, z)`` keeps x and y); comments
    (``#``), ``dim =`` and blank lines are skipped; a name with folders keeps
    its file name (the tiles sit beside the file). Only a regular file is
    read (:func:`qc.io.regular.open_regular`: a FIFO of that name never
    blocks), and at most 64 MiB of it.
    """
    with open_regular(path) as fh:
        text = fh.read(_TC_MAX_BYTES).decode("utf-8", errors="replace")
    positions: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        m = _TC_LINE.match(line)
        if m:
            try:
                x, y = float(m.group(2)), float(m.group(3))
            except ValueError:
                continue
            if math.isfinite(x) and math.isfinite(y):
                positions[Path(m.group(1).replace("\\", "/")).name] = (x, y)
    return positions


def _tile_configuration_names(path: Path | None) -> list[str]:
    """The image files a TileConfiguration lists, in order; [] when unreadable."""
    if path is None:
        return []
    try:
        return [n for n in read_tile_configuration(path) if Path(n).suffix.lower() in TILE_SUFFIXES]
    except (OSError, QCError):  # unreadable, or not a regular file: the names alone decide
        return []


def _num(value: object) -> float | None:
    try:
        out = float(str(value).strip().rstrip("%"))
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _overlap(value: object) -> float | None:
    v = _num(value)
    if v is None or v < 0:
        return None
    v = v / 100.0 if v >= 1 else v  # "10" or "10%" means 10 %
    return v if v < 1 else None


def _from_mapping(items: Iterable[tuple[str, object]]) -> tuple[int | None, int | None, float | None, float | None]:
    rows = cols = None
    overlap = pixel = None
    for key, value in items:
        k = re.sub(r"[^a-z]", "", key.lower())
        if k in ("rows", "row", "rowcount", "tilerows", "numrows", "ytiles", "fovrows"):
            rows = int(_num(value) or 0) or rows
        elif k in ("cols", "col", "columns", "colcount", "columncount", "tilecols", "numcols", "xtiles", "fovcols"):
            cols = int(_num(value) or 0) or cols
        elif k in ("overlap", "overlapratio", "overlaprate", "overlappercent"):
            overlap = _overlap(value)
        elif k in ("pixelsize", "pixelsizeum", "umperpixel", "micronsperpixel", "scale"):
            v = _num(value)
            pixel = v if v is not None and 0 < v < 100 else pixel
    return rows, cols, overlap, pixel


def _walk_json(obj: object) -> Iterable[tuple[str, object]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                yield from _walk_json(v)
            else:
                yield str(k), v
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_json(v)


def read_grid_metadata(folder: Path) -> GridMetadata:
    """Rows, cols and overlap from the folder's metadata file, if any.

    Reads ``info.json`` (Go Optical), ``info.ini`` / ``1.ini`` (Motic; keys
    such as ``rows``, ``cols``, ``overlap`` in any section) or a Leica XML with
    ``<Tile FieldX= FieldY=>`` elements (in the folder or ``MetaData/``).
    Unreadable files are ignored: the names still give the grid.
    """
    info_json = folder / "info.json"
    if info_json.is_file():
        try:
            data = json.loads(info_json.read_text(encoding="utf-8", errors="replace"))
            return GridMetadata(info_json, *_from_mapping(_walk_json(data)))
        except (json.JSONDecodeError, OSError, RecursionError):
            return GridMetadata(info_json)
    for ini_name in ("info.ini", "1.ini"):
        ini = folder / ini_name
        if ini.is_file():
            parser = configparser.ConfigParser(strict=False, interpolation=None)
            try:
                text = ini.read_text(encoding="utf-8", errors="replace")
                try:
                    parser.read_string(text)
                except configparser.MissingSectionHeaderError:
                    parser.read_string("[_]\n" + text)
            except (configparser.Error, OSError):
                return GridMetadata(ini)
            items = [(k, v) for s in parser.sections() for k, v in parser.items(s)]
            return GridMetadata(ini, *_from_mapping(items))
    for xml in sorted([*folder.glob("*.xml"), *(folder / "MetaData").glob("*.xml")]):
        meta = _leica_xml(xml)
        if meta is not None:
            return meta
    return GridMetadata()


def _leica_xml(path: Path) -> GridMetadata | None:
    try:
        if path.stat().st_size > 50 * 1024**2:
            return None
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return None
    cells = []
    for tile in root.iter("Tile"):
        fx, fy = _num(tile.get("FieldX")), _num(tile.get("FieldY"))
        if fx is not None and fy is not None:
            cells.append((int(fy), int(fx)))
    if not cells:
        return None
    return GridMetadata(path, max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1, None)


def _image_files(folder: Path) -> list[str]:
    """Tile-image names directly in ``folder``: regular files only (a link is never followed, a FIFO never opened)."""
    with os.scandir(folder) as it:
        return sorted(
            e.name
            for e in it
            if Path(e.name).suffix.lower() in TILE_SUFFIXES
            and not e.name.startswith((".", "~"))
            and e.is_file(follow_symlinks=False)
        )


def _square_cols(n: int) -> int:
    """The column count of the most square grid (cols >= rows) holding ``n`` cells exactly, else ceil(sqrt)."""
    for rows in range(math.isqrt(n), 0, -1):
        if n % rows == 0:
            return n // rows
    return max(1, math.ceil(math.sqrt(n)))


def _configured(listed: list[str], names: list[str], meta: GridMetadata, tile_config: Path) -> TileFolderInfo:
    """The ``tile_configuration`` convention: the listed files in order, as row 0, column i."""
    have = set(names)
    tiles = tuple(TileName(n, 0, i, i) for i, n in enumerate(listed) if n in have)
    missing = tuple((0, i) for i, n in enumerate(listed) if n not in have)
    ignored = tuple(n for n in names if n not in set(listed))
    return TileFolderInfo(
        "tile_configuration",
        1,
        len(listed),
        tuple((0, t.col) for t in tiles),
        missing,
        (),
        meta.file,
        tiles,
        ignored,
        meta.overlap,
        tile_config,
        False,
        meta,
        tuple(n for n in listed if n not in have),
    )


def inspect_tile_folder(
    path: str | Path,
    *,
    pattern: str | re.Pattern[str] | None = None,
    cols: int | None = None,
) -> TileFolderInfo:
    """Which convention a folder follows, its grid, and which cells are missing.

    Parameters
    ----------
    path : str or Path
        The tile folder.
    pattern : str or re.Pattern, optional
        A custom regex with named groups ``row`` and ``col`` (or ``index``,
        row-major over ``cols``). Used instead of the built-in conventions.
    cols : int, optional
        Column count for linear (index) names when no metadata gives it.

    Returns
    -------
    TileFolderInfo
        ``convention`` is ``None`` and the grid empty when no name matched.
    """
    folder = Path(path)
    names = _image_files(folder)
    meta = read_grid_metadata(folder)
    with os.scandir(folder) as it:  # regular files only, as for the tiles
        configs = sorted(
            folder / e.name
            for e in it
            if e.name.startswith("TileConfiguration")
            and e.name.lower().endswith(".txt")
            and e.is_file(follow_symlinks=False)
        )
    tile_config = next(
        (p for p in configs if p.name.lower() == "tileconfiguration.txt"), configs[0] if configs else None
    )
    candidates = ["custom"] if pattern is not None else ["rowcol", "grid_at", "leica_stage", "leica_snake"]
    best: tuple[str, list[TileName]] | None = None
    for conv in candidates:
        parsed = [t for t in (parse_tile_name(n, conv, pattern=pattern) for n in names) if t is not None]
        if parsed and (best is None or len(parsed) > len(best[1])):
            best = (conv, parsed)
    listed = _tile_configuration_names(tile_config)
    if (
        listed
        and tile_config is not None
        and (best is None or len(best[1]) < sum(1 for n in listed if n in set(names)))
    ):
        return _configured(listed, names, meta, tile_config)
    if best is None:
        return TileFolderInfo(
            None, 0, 0, (), (), (), meta.file, (), tuple(names), meta.overlap, tile_config, False, meta
        )
    conv, parsed = best
    if conv == "rowcol" and meta.file is not None:
        conv = "go_optical" if meta.file.name == "info.json" else "motic" if meta.file.suffix == ".ini" else conv
    guessed = False
    if parsed[0].index is not None:
        indices = [t.index for t in parsed if t.index is not None]
        base = 1 if 0 not in indices and 1 in indices else 0
        n = max(indices) - base + 1
        ncols = meta.cols or cols
        if ncols is None:
            ncols, guessed = _square_cols(n), True
        out = []
        for t in parsed:
            i = (t.index or 0) - base
            rc = snake_to_grid(i, ncols) if conv == "leica_snake" else divmod(i, ncols)
            out.append(TileName(t.file, rc[0], rc[1], t.index))
        parsed = out
        rows_from_names, cols_from_names = math.ceil(n / ncols), ncols
    else:
        rbase = 1 if all(t.row >= 1 for t in parsed) and any(t.row == 1 for t in parsed) else 0
        cbase = 1 if all(t.col >= 1 for t in parsed) and any(t.col == 1 for t in parsed) else 0
        if conv == "grid_at" or rbase != cbase:  # shift only when both axes agree, or never for Grid@
            rbase = cbase = 0 if conv == "grid_at" else min(rbase, cbase)
        parsed = [TileName(t.file, t.row - rbase, t.col - cbase, t.index) for t in parsed]
        rows_from_names = max(t.row for t in parsed) + 1
        cols_from_names = max(t.col for t in parsed) + 1
    rows = max(meta.rows or 0, rows_from_names)
    ncols = max(meta.cols or 0, cols_from_names)
    cells: dict[tuple[int, int], int] = {}
    for t in parsed:
        cells[(t.row, t.col)] = cells.get((t.row, t.col), 0) + 1
    present = tuple(sorted(cells))
    missing = tuple((r, c) for r in range(rows) for c in range(ncols) if (r, c) not in cells)
    duplicates = tuple(sorted(k for k, v in cells.items() if v > 1))
    matched = {t.file for t in parsed}
    ignored = tuple(n for n in names if n not in matched)
    parsed.sort(key=lambda t: (t.row, t.col, t.file))
    return TileFolderInfo(
        conv,
        rows,
        ncols,
        present,
        missing,
        duplicates,
        meta.file,
        tuple(parsed),
        ignored,
        meta.overlap,
        tile_config,
        guessed,
        meta,
    )
