"""TIFF, BigTIFF and OME-TIFF images (tifffile).

Grey 8/16-bit (and float) or RGB 24/48-bit, striped or tiled, compressed or
not, with pyramid levels (SubIFDs or reduced pages) when present.

- :meth:`TiffImage.plane` memory-maps uncompressed contiguous data, else
  decodes once into one array, with tifffile's decoder on
  :attr:`~qc.io.model.Image.threads` threads (as ``tifffile.imread`` does).
- :meth:`TiffImage.read_region` decodes only the strips or tiles the window
  touches.
- :meth:`TiffImage.downsampled` reduces the plane :meth:`plane` returned
  while the caller still holds it (never decoding twice); otherwise it
  streams strip- or tile-rows through an area-mean reducer, starting from
  the coarsest pyramid level that divides the factor, and the
  full-resolution plane is never held.
"""

from __future__ import annotations

import math
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

from qc.errors import CorruptImageError, UnsupportedFormatError
from qc.io._reduce import BandReducer, check_factor, reduce_array, reduced_shape
from qc.io._tiffpage import PageReader
from qc.io.detect import default_name, default_role
from qc.io.limits import ReadLimits, check_dimensions, check_plane_bytes
from qc.io.model import Image
from qc.io.tiffcheck import walk_tiff

__all__ = ["TiffImage"]

_UNIT_UM = {"m": 1e6, "mm": 1e3, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "cm": 1e4}
#: Pixel sizes outside this range (um) are taken as unset (e.g. a default 72 dpi).
_PLAUSIBLE_UM = (1e-3, 100.0)


def _fix_shape(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop or edge-pad the first two axes to ``shape`` (pyramid levels may round differently)."""
    h, w = shape
    arr = arr[:h, :w]
    ph, pw = h - arr.shape[0], w - arr.shape[1]
    if ph or pw:
        arr = np.pad(arr, [(0, ph), (0, pw)] + [(0, 0)] * (arr.ndim - 2), mode="edge")
    return arr


class TiffImage(Image):
    """A TIFF (or BigTIFF, OME-TIFF) image; see the module docstring.

    Parameters
    ----------
    path : str or Path
        The file; also the name used in messages.
    fileobj : binary file object, optional
        Read from this instead of ``path`` (an archive member in memory).
    name, role : str, optional
        Override the defaults (file stem; ``IF``/``HE``/``nuclear``).
    limits : ReadLimits
        Checked against every IFD before anything is allocated.
    display_path : str or Path, optional
        The path shown in messages and :attr:`path` when ``path`` is a
        temporary copy (an archive member).
    """

    format = "tiff"

    def __init__(
        self,
        path: str | Path,
        *,
        fileobj: BinaryIO | None = None,
        name: str | None = None,
        role: str | None = None,
        limits: ReadLimits = ReadLimits(),  # noqa: B008 - frozen
        display_path: str | Path | None = None,
    ) -> None:
        self.path = Path(display_path) if display_path is not None else Path(path)
        self.limits = limits
        source = fileobj if fileobj is not None else Path(path)
        walk_tiff(source, limits=limits, name=self.path)
        try:
            self._tif = (
                tifffile.TiffFile(source, name=self.path.name) if fileobj is not None else tifffile.TiffFile(source)
            )
        except MemoryError as exc:
            raise CorruptImageError(self.path, "the TIFF header asks for more memory than is available") from exc
        except Exception as exc:
            raise CorruptImageError(self.path, f"the TIFF structure cannot be read ({exc})") from exc
        try:
            self._setup(name, role)
        except Exception:
            self._tif.close()
            raise

    # ---- header parsing ----------------------------------------------------------------------

    def _setup(self, name: str | None, role: str | None) -> None:
        tif = self._tif
        try:
            series_list = list(tif.series)
        except Exception as exc:
            raise CorruptImageError(self.path, f"the TIFF pages cannot be parsed ({exc})") from exc
        if not series_list:
            raise CorruptImageError(self.path, "the TIFF holds no image")
        self._series_index, series = max(
            enumerate(series_list), key=lambda s: (s[1].keyframe.imagewidth * s[1].keyframe.imagelength, -s[0])
        )
        key = series.keyframe
        if key.dtype is None or np.dtype(key.dtype).kind not in "uif" or key.bitspersample not in (8, 16, 32, 64):
            problem = f"pixel type {key.bitspersample}-bit {key.sampleformat!r} is not supported (8/16-bit grey or RGB)"
            raise UnsupportedFormatError(self.path, problem)
        samples = int(key.samplesperpixel)
        # JPEG-compressed RGB is usually stored as YCbCr; the JPEG decoder hands back RGB
        ycbcr_jpeg = samples == 3 and key.photometric == 6 and key.compression in (6, 7)
        rgb = (samples in (3, 4) and key.photometric == 2) or ycbcr_jpeg
        if samples > 1 and not rgb:
            problem = f"{samples} samples per pixel with photometric {key.photometric!r} (expected grey or RGB)"
            raise UnsupportedFormatError(self.path, problem)
        if samples == 4:
            raise UnsupportedFormatError(self.path, "RGBA images are not supported; export RGB without alpha")
        page_ndim = len(key.shape)
        lead_axes, lead_shape = (
            series.axes[: len(series.shape) - page_ndim],
            series.shape[: len(series.shape) - page_ndim],
        )
        self._lead_shape = tuple(int(n) for n in lead_shape)
        self._channel_axis: int | None = None
        if "C" in lead_axes:
            self._channel_axis = lead_axes.index("C")
        elif len(lead_axes) == 1 and lead_axes in ("I", "Q") and lead_shape[0] > 1:
            self._channel_axis = 0
        nch = self._lead_shape[self._channel_axis] if self._channel_axis is not None else 1
        self.width, self.height = int(key.imagewidth), int(key.imagelength)
        check_dimensions(self.path, self.width, self.height, self.limits, channels=max(nch, len(series.pages)))
        self.dtype = np.dtype(key.dtype).newbyteorder("=")
        self._levels = list(series.levels)
        for level in self._levels:
            lk = level.keyframe
            check_dimensions(self.path, int(lk.imagewidth), int(lk.imagelength), self.limits, what="pyramid level")
        names, pixel_size = self._ome_info(nch)
        if rgb:
            self.channels: tuple[str, ...] = ("R", "G", "B")
        elif nch == 1:
            self.channels = (names[0],) if names else ("gray",)
        else:
            self.channels = tuple(names) if len(names) == nch else tuple(f"C{i}" for i in range(nch))
        self.pixel_size_um = pixel_size if pixel_size is not None else self._resolution_um(key)
        self.name = name or default_name(self.path)
        self.role = role or default_role(self.name, rgb=rgb)
        self._readers: dict[tuple[int, int], PageReader] = {}
        self._decoded: dict[int, weakref.ref[np.ndarray]] = {}

    def _ome_info(self, nch: int) -> tuple[list[str], float | None]:
        if not self._tif.is_ome:
            return [], None
        try:
            root = ET.fromstring(self._tif.ome_metadata or "")
        except ET.ParseError:
            return [], None
        images = [e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Image"]
        if not images:
            return [], None
        image = images[min(self._series_index, len(images) - 1)]
        pixels = next((e for e in image.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
        if pixels is None:
            return [], None
        names = [c.get("Name", "") for c in pixels if c.tag.rsplit("}", 1)[-1] == "Channel"]
        names = names if len(names) == nch and all(names) else []
        size = None
        try:
            value = float(pixels.get("PhysicalSizeX", "nan"))
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            if math.isfinite(value) and unit in _UNIT_UM:
                size = value * _UNIT_UM[unit]
        except ValueError:
            size = None
        return names, self._plausible(size)

    def _resolution_um(self, key: tifffile.TiffPage) -> float | None:
        tag = key.tags.get("XResolution")
        if tag is None:
            return None
        try:
            num, den = tag.value
            per_unit = num / den
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        if per_unit <= 0:
            return None
        unit = int(key.resolutionunit)
        if unit == 2:
            return self._plausible(25400.0 / per_unit)
        if unit == 3:
            return self._plausible(10000.0 / per_unit)
        if unit == 4:
            return self._plausible(1000.0 / per_unit)
        if unit == 5:
            return self._plausible(1.0 / per_unit)
        meta = self._tif.imagej_metadata or {}
        factor = _UNIT_UM.get(str(meta.get("unit", "")).replace("\\u00B5", "µ"))
        return self._plausible(factor / per_unit) if factor else None

    @staticmethod
    def _plausible(um: float | None) -> float | None:
        if um is None or not (_PLAUSIBLE_UM[0] <= um <= _PLAUSIBLE_UM[1]):
            return None
        return float(um)

    # ---- page access ----------------------------------------------------------------------------

    @property
    def levels(self) -> list[tuple[int, int]]:
        """``(width, height)`` of each pyramid level, full resolution first."""
        return [(int(lv.keyframe.imagewidth), int(lv.keyframe.imagelength)) for lv in self._levels]

    def _reader(self, channel: int, level: int = 0) -> PageReader:
        key = (channel, level)
        if key not in self._readers:
            idx = [0] * len(self._lead_shape)
            if self._channel_axis is not None:
                idx[self._channel_axis] = channel
            page_index = int(np.ravel_multi_index(idx, self._lead_shape)) if idx else 0
            series = self._levels[level]
            try:
                page = series.pages[page_index]
                keyframe = series.keyframe
                if page is None:
                    raise CorruptImageError(self.path, f"page {page_index} of level {level} is missing")
                self._readers[key] = PageReader(self._tif, page, keyframe, self.path)
            except CorruptImageError:
                raise
            except Exception as exc:
                raise CorruptImageError(self.path, f"page {page_index} cannot be parsed ({exc})") from exc
        return self._readers[key]

    # ---- Image API --------------------------------------------------------------------------------

    def plane(self, channel: int | str = 0) -> np.ndarray:
        c = self.channel_index(channel)
        reader = self._reader(c)
        if reader.memmappable and self._tif.filehandle.is_file:
            out = reader.memmap()
        else:
            check_plane_bytes(self.path, reader.shape, self.dtype, self.limits)
            out = reader.decode_all(self.threads)
        self._decoded[c] = weakref.ref(out)  # downsampled() reduces it while the caller holds it
        return out

    def read_region(self, x: int, y: int, width: int, height: int, channel: int | str = 0) -> np.ndarray:
        c = self.channel_index(channel)
        self._check_region(x, y, width, height)
        return self._reader(c).window(x, y, width, height)

    def downsampled(self, factor: int, channel: int | str = 0) -> np.ndarray:
        factor = check_factor(factor)
        c = self.channel_index(channel)
        target = reduced_shape(self.height, self.width, factor)
        level, step = 0, 1
        for i, (w, h) in enumerate(self.levels[1:], start=1):
            r = round(self.width / w)
            fits = abs(w - self.width / r) <= 1 and abs(h - self.height / r) <= 1
            if r > step and fits and factor % r == 0:
                level, step = i, r
        held = self._decoded.get(c)
        plane = held() if held is not None and level == 0 else None
        if plane is not None:  # decoded already: never decode twice
            return _fix_shape(reduce_array(plane, factor, threads=self.threads), target)
        reader = self._reader(c, level)
        rest = factor // step
        samples = reader.samples if reader.samples > 1 else None
        reducer = BandReducer(reader.height, reader.width, rest, self.dtype, samples)
        for band in reader.bands():
            reducer.feed(band)
        return _fix_shape(reducer.finish(), target)

    def close(self) -> None:
        self._readers.clear()
        self._decoded.clear()
        self._tif.close()
