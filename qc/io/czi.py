"""Zeiss CZI images: single planes, several channels, mosaics, several scenes.

- Metadata: channel names (``Information/Image/Dimensions/Channels``, else
  ``DisplaySetting/Channels``) and pixel size (``Scaling/Items/Distance``)
  from the XML document.
- Composited reads (:meth:`CziImage.plane`, :meth:`CziImage.read_region`) go
  through pylibCZIrw (libCZI), which decodes only the subblocks a region
  touches.
- Tiles come from the subblock directory (:mod:`qc.io.czidir`): one per
  full-resolution subblock of the channel, positioned at its logical
  rectangle shifted so the mosaic's top-left is (0, 0), decoded on demand.
- :meth:`CziImage.downsampled` reduces subblock by subblock, so a sparse
  mosaic with a huge bounding box is never allocated whole; the result
  equals the area mean of the composited plane.

Only the first plane of other dimensions (Z, T, ...) is read. Every scene is
part of the one image (tiles are named ``S=<scene> M=<index>`` when there
are several scenes). ``tiles`` is ``tiles_for(0)``; use
``tiles_for("GFP")`` for another channel.
"""

from __future__ import annotations

import functools
import hashlib
import math
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qc.errors import CorruptImageError, UnsupportedFormatError
from qc.io._mosaic import grid_indices, reduce_tiles
from qc.io._reduce import check_factor, reduce_array, reduced_shape
from qc.io.czidir import PIXEL_TYPES, CziDirectory, SubBlockEntry
from qc.io.detect import default_name, default_role
from qc.io.limits import ReadLimits, check_dimensions, check_plane_bytes
from qc.io.model import Image, Tile
from qc.io.regular import open_regular

__all__ = ["CziImage"]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find_all(root: ET.Element, path: str) -> list[ET.Element]:
    nodes = [root]
    for part in path.split("/"):
        nodes = [c for n in nodes for c in n if _local(c.tag) == part]
    return nodes


def _metadata(xml: str, nch: int) -> tuple[list[str], float | None]:
    """Channel names (may be shorter than ``nch``) and the X pixel size in um."""
    if not xml:
        return [], None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return [], None
    names: list[str] = []
    for path in ("Metadata/Information/Image/Dimensions/Channels/Channel", "Metadata/DisplaySetting/Channels/Channel"):
        found = [c.get("Name") or "" for c in _find_all(root, path)]
        if len(found) >= nch and all(found[:nch]):
            names = found[:nch]
            break
    size = None
    for d in _find_all(root, "Metadata/Scaling/Items/Distance"):
        if d.get("Id") == "X":
            try:
                value = float((d.findtext("Value") or d.findtext("{*}Value") or "").strip())
            except ValueError:
                continue
            if math.isfinite(value) and value > 0:
                size = value * 1e6
    return names, size


class CziImage(Image):
    """A CZI file; see the module docstring.

    Parameters
    ----------
    path : str or Path
        The file (pylibCZIrw needs a real path).
    name, role : str, optional
        Override the defaults (file stem; ``IF``/``HE``/``nuclear``).
    limits : ReadLimits
        Checked against the subblock count and every subblock's size.
    """

    format = "czi"

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        role: str | None = None,
        limits: ReadLimits = ReadLimits(),  # noqa: B008 - frozen
        display_path: str | Path | None = None,
    ) -> None:
        self._file = Path(path)
        self.path = Path(display_path) if display_path is not None else self._file
        self.limits = limits
        try:
            self._fh = open_regular(self._file)
        except OSError as exc:
            raise CorruptImageError(self.path, f"cannot be opened ({exc.strerror or exc})") from exc
        self._reader = None
        try:
            self._directory = CziDirectory(self._fh, self.path, limits)
            self._directory.check()
            self._setup(name, role)
        except Exception:
            self._fh.close()
            raise

    def _setup(self, name: str | None, role: str | None) -> None:
        entries = [e for e in self._directory.entries if e.is_layer0]
        if not entries:
            raise CorruptImageError(self.path, "the CZI holds no full-resolution subblock")
        firsts: dict[str, int] = {}
        for e in entries:
            for k, v in e.other_planes:
                firsts[k] = min(firsts.get(k, v), v)
        self._plane_coords = {k: v for k, v in firsts.items() if k in "ZTRIHVB"}
        entries = [e for e in entries if all(v == firsts[k] for k, v in e.other_planes)]
        unknown = {e.pixel_type for e in entries} - set(PIXEL_TYPES)
        if unknown:
            raise UnsupportedFormatError(self.path, f"CZI pixel type(s) {sorted(unknown)} are not supported")
        cs = sorted({e.c for e in entries})
        self._c_values = cs
        check_dimensions(self.path, 0, 0, self.limits, channels=len(cs), tiles=len(entries))
        self._by_channel: dict[int, list[SubBlockEntry]] = {
            c: sorted(
                (e for e in entries if e.c == c), key=lambda e: (e.scene, e.m if e.m is not None else -1, e.index)
            )
            for c in cs
        }
        first = self._by_channel[cs[0]][0]
        dtype, samples, _ = PIXEL_TYPES[first.pixel_type]
        self.dtype = np.dtype(dtype).newbyteorder("=")
        rgb = samples == 3
        if rgb and len(cs) > 1:
            raise UnsupportedFormatError(self.path, f"{len(cs)} colour (BGR) channels in one CZI are not supported")
        self._samples = 3 if rgb else None
        self._x0 = min(e.x for e in entries)
        self._y0 = min(e.y for e in entries)
        self.width = max(e.x + e.width for e in entries) - self._x0
        self.height = max(e.y + e.height for e in entries) - self._y0
        names, pixel_size = _metadata(self._directory.metadata_xml(), len(cs))
        if rgb:
            self.channels = ("R", "G", "B")
        else:
            self.channels = tuple(names) if names else tuple(f"C{c}" for c in cs)
            if len(set(self.channels)) != len(self.channels):
                self.channels = tuple(f"{n} ({i})" for i, n in enumerate(self.channels))
        self.pixel_size_um = pixel_size
        self.scenes = tuple(sorted({e.scene for e in entries}))
        self.name = name or default_name(self.path)
        self.role = role or default_role(self.name, rgb=rgb)
        ref = self._by_channel[cs[0]]
        rows, cols = grid_indices([e.x for e in ref], [e.y for e in ref], first.width, first.height)
        self._cells = {
            (e.scene, e.m, i if e.m is None else -1): (r, c)
            for i, (e, r, c) in enumerate(zip(ref, rows, cols, strict=True))
        }
        self._tile_cache: dict[int, list[Tile]] = {}
        self._decoded: dict[int, weakref.ref[np.ndarray]] = {}
        st = self._file.stat()
        self._stat_id = f"{self._file}|{st.st_size}|{st.st_mtime_ns}"

    # ---- tiles ------------------------------------------------------------------------------------

    @property
    def is_mosaic(self) -> bool:
        """More than one full-resolution subblock per channel."""
        return len(self._by_channel[self._c_values[0]]) > 1

    def _tile(self, entry: SubBlockEntry, i: int) -> Tile:
        key = (entry.scene, entry.m, i if entry.m is None else -1)
        row, col = self._cells.get(key, (0, i))
        label = f"M={entry.m}" if entry.m is not None else f"#{i}"
        if len(self.scenes) > 1:
            label = f"S={entry.scene} {label}"
        directory = self._directory

        def digest(entry: SubBlockEntry = entry) -> str:
            h = hashlib.sha256(
                repr((entry.pixel_type, entry.compression, entry.stored_width, entry.stored_height)).encode()
            )
            h.update(directory.raw_data(entry))
            return h.hexdigest()

        return Tile(
            name=label,
            row=row,
            col=col,
            x=float(entry.x - self._x0),
            y=float(entry.y - self._y0),
            width=entry.width,
            height=entry.height,
            loader=functools.partial(directory.decode, entry),
            digest_fn=digest,
            identity=f"{self._stat_id}|{entry.file_position}",
        )

    def _all_tiles(self, c: int) -> list[Tile]:
        if c not in self._tile_cache:
            self._tile_cache[c] = [self._tile(e, i) for i, e in enumerate(self._by_channel[self._c_values[c]])]
        return self._tile_cache[c]

    @property
    def tiles(self) -> Sequence[Tile] | None:
        return self._all_tiles(0) if self.is_mosaic else None

    def tiles_for(self, channel: int | str = 0) -> Sequence[Tile] | None:
        c = self.channel_index(channel)
        return self._all_tiles(c) if self.is_mosaic else None

    # ---- pixels -----------------------------------------------------------------------------------

    def _czi(self) -> Any:  # a pylibCZIrw CziReader (the library ships no types)
        if self._reader is None:
            from pylibCZIrw import czi as pyczi

            try:
                self._reader = pyczi.CziReader(str(self._file))
            except Exception as exc:
                raise CorruptImageError(self.path, f"libCZI cannot open the file ({exc})") from exc
        return self._reader

    def _composite(self, c: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        plane = {"C": self._c_values[c], **self._plane_coords}
        try:
            arr = self._czi().read(roi=(self._x0 + x, self._y0 + y, w, h), plane=plane, background_pixel=(0, 0, 0))
        except Exception as exc:
            raise CorruptImageError(self.path, f"libCZI cannot read region ({x}, {y}, {w}, {h}) ({exc})") from exc
        if self._samples:
            return np.ascontiguousarray(arr[..., ::-1])
        return np.ascontiguousarray(arr[..., 0])

    def plane(self, channel: int | str = 0) -> np.ndarray:
        c = self.channel_index(channel)
        shape = (self.height, self.width) + ((3,) if self._samples else ())
        check_plane_bytes(self.path, shape, self.dtype, self.limits)
        out = self._composite(c, 0, 0, self.width, self.height)
        self._decoded[c] = weakref.ref(out)  # downsampled() reduces it while the caller holds it
        return out

    def read_region(self, x: int, y: int, width: int, height: int, channel: int | str = 0) -> np.ndarray:
        c = self.channel_index(channel)
        self._check_region(x, y, width, height)
        return self._composite(c, x, y, width, height)

    def downsampled(self, factor: int, channel: int | str = 0) -> np.ndarray:
        factor = check_factor(factor)
        c = self.channel_index(channel)
        oh, ow = reduced_shape(self.height, self.width, factor)
        check_plane_bytes(self.path, (oh, ow) + ((3,) if self._samples else ()), self.dtype, self.limits)
        held = self._decoded.get(c)
        plane = held() if held is not None else None
        if plane is not None:  # composited already: the same area mean without decoding again
            return reduce_array(plane, factor, threads=self.threads)
        return reduce_tiles(self._all_tiles(c), self.width, self.height, factor, self.dtype, self._samples)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._fh.close()
