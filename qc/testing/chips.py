"""Synthetic Stereo-seq chip images with known ground truth, for tests and benchmarks.

Images are built from the real stain crops in ``shared/data/stereo_crops``
(DAPI and ssDNA 256x256 uint16, H&E 512x512 RGB, mIF 256x256 uint8): the crops
are resized to the chip scale, turned (the 8 flips and quarter turns), given
random gains and laid edge to edge with narrow cross-faded overlaps that sum
exactly to one, so large images have real nuclei texture and no seams or
brightness steps that could pass for track lines. On top come a dim textured chip surface where there is no tissue,
smooth tissue blobs covering a chosen fraction, track lines at the template
spacing (angle, scale, origin, width and contrast as asked), uneven
illumination, Gaussian blur, exposure gain with clipping, and noise.

Geometry follows :mod:`qc.track.grid` exactly: ``ChipTruth.grid`` is the
:class:`~qc.track.grid.GridModel` that :func:`qc.track.find_track_lines` should
recover. Everything is seeded: the same arguments give the same pixels, and
:func:`write_chip_tiff` writes the same pixels as :func:`generate_chip`.

Images are rendered in strips of 512 rows, so a 20000 x 20000 chip can be
written to a TIFF (or into an ``out`` memmap) with a few hundred MB of memory.

The crops are found under ``data_dir``, else ``$IMAGEQC_SHARED_DATA``, else
``<repo>/../shared/data``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from qc.chip import ChipTemplate, template_for
from qc.testing._scene import MAX_IF_OFFSET, STRIP, Mosaic, Scene, load_crops, quantise
from qc.track import GridModel

__all__ = [
    "MAX_IF_OFFSET",
    "REAL_LOOKING",
    "REAL_LOOKING_HE",
    "STAINS",
    "ChipTruth",
    "IFTruth",
    "SyntheticChip",
    "SyntheticIF",
    "generate_chip",
    "generate_if",
    "real_looking",
    "shared_data_dir",
    "write_chip_tiff",
]

#: Stains the generator can imitate.
STAINS = ("DAPI", "ssDNA", "HE")


def shared_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Locate the shared reference data folder (the one holding ``stereo_crops``).

    Raises
    ------
    FileNotFoundError
        With the places searched and how to point at the data.
    """
    if data_dir is not None:
        cand = Path(data_dir)
    elif os.environ.get("IMAGEQC_SHARED_DATA"):
        cand = Path(os.environ["IMAGEQC_SHARED_DATA"])
    else:
        cand = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    if not (cand / "stereo_crops").is_dir():
        msg = (
            f"stain crops not found: {cand / 'stereo_crops'} does not exist. Pass data_dir=..., "
            "or set IMAGEQC_SHARED_DATA to the shared/data folder (it must hold stereo_crops/)"
        )
        raise FileNotFoundError(msg)
    return cand.resolve()


@dataclass(frozen=True)
class ChipTruth:
    """What a synthetic chip image was made with (its known answers).

    Geometry (``angle_deg``, ``scale``, ``origin_px``) follows :mod:`qc.track.grid`;
    ``origin_px`` is canonical (the period crossing nearest the image's
    top-left corner). ``tissue_fraction`` is the share of the image actually
    covered by tissue. ``noise`` is the standard deviation of the added
    Gaussian noise as a fraction of the dtype's full scale; ``gain`` the
    exposure gain (values above full scale clip). The fields after ``seed``
    describe the acquisition (see :func:`generate_chip`); their defaults give
    the original clean look.
    """

    width: int
    height: int
    stain: str
    dtype: str
    template: str
    angle_deg: float
    scale: tuple[float, float]
    origin_px: tuple[float, float]
    lines: bool
    line_width_px: float
    line_contrast: float
    tissue_fraction: float
    tissue_line_visibility: float
    illumination: float
    blur_sigma: float
    noise: float
    gain: float
    seed: int
    background: float | None = None
    mottle: float = 0.0
    tissue_gain: float = 1.0
    line_polarity: str = "dark"
    fov_px: int = 0
    fov_gain: float = 0.0
    vignetting: float = 0.0
    debris: int = 0
    debris_radius: tuple[float, float] = (15.0, 60.0)

    @property
    def grid(self) -> GridModel:
        """The track-line grid as a :class:`~qc.track.grid.GridModel`."""
        return GridModel(template_for(self.template), self.angle_deg, self.scale, self.origin_px)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class SyntheticChip:
    """A generated image (H x W grey, or H x W x 3 RGB for H&E) and its truth."""

    image: np.ndarray
    truth: ChipTruth


@dataclass(frozen=True)
class IFTruth:
    """Ground truth of a synthetic immunofluorescence image.

    ``offset_px = (dx, dy)``: a structure at ``(x, y)`` in the nuclear image
    appears at ``(x + dx, y + dy)`` in the IF image. ``related`` is False for
    the negative case (an IF image of different tissue).
    """

    width: int
    height: int
    dtype: str
    offset_px: tuple[float, float]
    related: bool
    seed: int
    reference_seed: int


@dataclass(frozen=True)
class SyntheticIF:
    image: np.ndarray
    truth: IFTruth


def _params(
    *,
    width: int,
    height: int,
    stain: str,
    dtype: str,
    template: str | ChipTemplate,
    angle_deg: float,
    scale: float | tuple[float, float],
    origin_px: tuple[float, float] | None,
    lines: bool,
    line_width_px: float | None,
    line_contrast: float,
    tissue_fraction: float,
    tissue_line_visibility: float,
    illumination: float,
    blur_sigma: float,
    noise: float,
    gain: float,
    seed: int,
    background: float | None,
    mottle: float,
    tissue_gain: float,
    line_polarity: str,
    fov_px: int,
    fov_gain: float,
    vignetting: float,
    debris: int,
    debris_radius: tuple[float, float],
) -> tuple[dict[str, Any], ChipTemplate]:
    if stain not in STAINS:
        msg = f"stain must be one of {STAINS}, got {stain!r}"
        raise ValueError(msg)
    if width < 16 or height < 16:
        msg = f"image must be at least 16 x 16 px, got {width} x {height}"
        raise ValueError(msg)
    dt = "uint8" if stain == "HE" else str(np.dtype(dtype))
    if dt not in ("uint8", "uint16"):
        msg = f"dtype must be uint8 or uint16, got {dtype!r}"
        raise ValueError(msg)
    if line_polarity not in ("dark", "bright"):
        msg = f"line_polarity must be 'dark' or 'bright', got {line_polarity!r}"
        raise ValueError(msg)
    if background is not None and not 0 <= background <= 1:
        msg = f"background must be a fraction of full scale in 0..1 (or None), got {background!r}"
        raise ValueError(msg)
    if fov_px < 0 or not 0 <= fov_gain < 1 or not 0 <= vignetting < 1 or debris < 0:
        msg = (
            f"need fov_px >= 0, 0 <= fov_gain < 1, 0 <= vignetting < 1 and debris >= 0, "
            f"got {fov_px}, {fov_gain}, {vignetting}, {debris}"
        )
        raise ValueError(msg)
    if not 0 < debris_radius[0] <= debris_radius[1]:
        msg = f"debris_radius must be (low, high) px with 0 < low <= high, got {debris_radius!r}"
        raise ValueError(msg)
    tmpl = template if isinstance(template, ChipTemplate) else template_for(template)
    sxy = (
        (float(scale[0]), float(scale[1]))
        if isinstance(scale, (tuple, list, np.ndarray))
        else (float(scale), float(scale))
    )
    if not (sxy[0] > 0 and sxy[1] > 0):
        msg = f"scale must be positive, got {scale!r}"
        raise ValueError(msg)
    if origin_px is None:
        rng = np.random.default_rng([seed, 3])
        origin_px = (float(rng.uniform(0, tmpl.period * sxy[0])), float(rng.uniform(0, tmpl.period * sxy[1])))
    grid = GridModel(tmpl, float(angle_deg), sxy, (float(origin_px[0]), float(origin_px[1]))).canonical()
    lw = 3.0 * math.sqrt(sxy[0] * sxy[1]) if line_width_px is None else float(line_width_px)
    p = dict(
        width=int(width), height=int(height), stain=stain, dtype=dt, template=tmpl.name,
        angle_deg=float(angle_deg), scale=sxy, origin_px=grid.origin_px, lines=bool(lines),
        line_width_px=lw, line_contrast=float(line_contrast), tissue_fraction=float(tissue_fraction),
        tissue_line_visibility=float(tissue_line_visibility), illumination=float(illumination),
        blur_sigma=float(blur_sigma), noise=float(noise), gain=float(gain), seed=int(seed),
        background=None if background is None else float(background), mottle=float(mottle),
        tissue_gain=float(tissue_gain), line_polarity=line_polarity, fov_px=int(fov_px), fov_gain=float(fov_gain),
        vignetting=float(vignetting), debris=int(debris),
        debris_radius=(float(debris_radius[0]), float(debris_radius[1])),
    )  # fmt: skip
    return p, tmpl


def _truth(p: dict[str, Any], scene: Scene) -> ChipTruth:
    q = dict(p)
    q["tissue_fraction"] = scene.tissue_fraction
    return ChipTruth(**q)


_DEFAULTS: dict[str, object] = dict(
    width=4000, height=4000, stain="DAPI", dtype="uint8", template="SS2", angle_deg=0.0, scale=1.0,
    origin_px=None, lines=True, line_width_px=None, line_contrast=0.5, tissue_fraction=0.4,
    tissue_line_visibility=1.0, illumination=0.0, blur_sigma=0.0, noise=0.01, gain=1.0, seed=0,
    background=None, mottle=0.0, tissue_gain=1.0, line_polarity="dark", fov_px=0, fov_gain=0.0, vignetting=0.0,
    debris=0, debris_radius=(15.0, 60.0),
)  # fmt: skip

#: A chip as real stitched 10x nuclear-stain scans look (StereoMap's and
#: ImageStudio's screenshots): a chip surface about 10 grey levels of 255 with
#: a gentle mottle, track lines 3 px wide and 30 % darker than it (about 3
#: levels), sensor noise of 1.5 levels, FOVs of 2000 px whose gains vary by
#: +-25 % with 20 % vignetting, tissue over 40 % of the chip, ten times
#: brighter and often saturated (its brightest nuclei clip), hiding the lines under it, and 60 dark debris spots of
#: 15-60 px radius. Pass it to :func:`generate_chip` (override any key), or
#: use :func:`real_looking`.
REAL_LOOKING: dict[str, object] = dict(
    background=10 / 255, mottle=0.15, line_contrast=0.3, line_width_px=None, noise=1.5 / 255,
    fov_px=2000, fov_gain=0.25, vignetting=0.2, tissue_fraction=0.4, tissue_gain=8.0,
    tissue_line_visibility=0.1, debris=60, debris_radius=(15.0, 60.0),
)  # fmt: skip

#: The H&E counterpart: a mid-grey stained surface, tissue darker, and track
#: lines lighter than the surface (as they can be in bright field).
REAL_LOOKING_HE: dict[str, object] = dict(
    REAL_LOOKING, stain="HE", background=0.55, tissue_gain=1.0, line_polarity="bright", line_contrast=0.15,
    noise=2.0 / 255, fov_gain=0.1,
)  # fmt: skip


def real_looking(stain: str = "DAPI", **overrides: object) -> dict[str, object]:
    """Parameters of a real-looking chip (:data:`REAL_LOOKING`, or :data:`REAL_LOOKING_HE`
    for ``stain="HE"``) with ``overrides`` applied, for :func:`generate_chip`."""
    base = REAL_LOOKING_HE if stain == "HE" else dict(REAL_LOOKING, stain=stain)
    return {**base, **overrides}


def _strips(height: int) -> list[tuple[int, int]]:
    return [(r, min(r + STRIP, height)) for r in range(0, height, STRIP)]


def _scene(
    params: dict[str, object], data_dir: str | os.PathLike[str] | None
) -> tuple[dict[str, Any], Scene, np.dtype, tuple[int, ...]]:
    """Validated parameters, the scene that renders them, the dtype and the image shape."""
    unknown = set(params) - set(_DEFAULTS)
    if unknown:
        msg = f"unknown parameters {sorted(unknown)}; known: {sorted(_DEFAULTS)}"
        raise TypeError(msg)
    p, _ = _params(**{**_DEFAULTS, **params})  # type: ignore[arg-type]
    shape = (p["height"], p["width"]) + ((3,) if p["stain"] == "HE" else ())
    return p, Scene(p, shared_data_dir(data_dir)), np.dtype(p["dtype"]), shape


def generate_chip(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    out: np.ndarray | None = None,
    threads: int = 2,
    **params: object,
) -> SyntheticChip:
    """Generate a synthetic chip image and its ground truth.

    Parameters
    ----------
    width, height : int
        Image size in px (default 4000 x 4000).
    stain : {"DAPI", "ssDNA", "HE"}
        Texture source; ``"HE"`` gives an H x W x 3 uint8 RGB image.
    dtype : {"uint8", "uint16"}
        Grey images only; values span the dtype's full range.
    template : str or ChipTemplate
        ``"SS2"`` (default), ``"SS1"``, ``"DP84"`` or a chip serial.
    angle_deg, scale, origin_px :
        Grid placement, conventions of :mod:`qc.track.grid`. ``scale`` is image px
        per DNB, one number or ``(sx, sy)``. ``origin_px=None`` draws one.
    lines : bool
        False gives the same image without track lines.
    line_width_px : float, optional
        Track-line width in px (default ``3 * scale``).
    line_contrast : float
        Fraction of the signal removed at a line's centre, 0..1 (default 0.5).
    tissue_fraction : float
        Share of the image covered by tissue blobs, 0..1 (default 0.4).
    tissue_line_visibility : float
        How much of the line contrast survives under tissue, 0..1 (default 1).
    illumination : float
        Strength of the smooth gradient/vignetting, 0 (flat) .. 1.
    blur_sigma : float
        Gaussian blur sigma in px.
    noise : float
        Gaussian noise sigma as a fraction of full scale (default 0.01).
    gain : float
        Exposure gain; values over full scale clip (saturate).
    seed : int
    background : float, optional
        Level of the chip surface outside tissue as a fraction of full scale
        (e.g. ``10 / 255``); ``None`` (default) keeps the original dim
        textured surface. For H&E, the stained surface's level.
    mottle : float
        Relative strength of the surface's gentle texture (with ``background``).
    tissue_gain : float
        Tissue brightness multiplier (fluorescence, with ``background``); above
        about 2 most tissue saturates.
    line_polarity : {"dark", "bright"}
        Track lines darker (usual) or lighter (some H&E) than their surroundings.
    fov_px, fov_gain, vignetting : int, float, float
        Fields of view of ``fov_px`` px from the top-left corner, each with a
        gain drawn in ``1 +- fov_gain`` and corners ``vignetting`` darker than
        its centre (brightness steps at the seams). ``fov_px=0``: none.
    debris : int
        Number of dark debris spots, radius drawn in ``debris_radius`` px at
        scale 1 (times the scale).
    data_dir : path, optional
        The shared data folder (see :func:`shared_data_dir`).
    out : array, optional
        A writable H x W (x 3) array of the right dtype (e.g. a ``np.memmap``)
        to fill strip by strip instead of allocating the image.
    threads : int
        Strips rendered in parallel.

    Returns
    -------
    SyntheticChip
    """
    p, scene, dt, shape = _scene(params, data_dir)
    if out is None:
        out = np.empty(shape, dt)
    elif out.shape != shape or out.dtype != dt:
        msg = f"out must be {shape} {dt}, got {out.shape} {out.dtype}"
        raise ValueError(msg)

    def work(rows: tuple[int, int]) -> None:
        y0, y1 = rows
        out[y0:y1] = scene.finish(y0, y1, dt)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        list(ex.map(work, _strips(p["height"])))
    return SyntheticChip(out, _truth(p, scene))


def write_chip_tiff(
    path: str | os.PathLike[str],
    *,
    tile: tuple[int, int] | None = (512, 512),
    compression: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    threads: int = 2,
    **params: object,
) -> ChipTruth:
    """Write a synthetic chip to a TIFF without holding the whole image.

    Parameters
    ----------
    path : path
        Output file (BigTIFF when over 2 GB).
    tile : (int, int) or None
        Tile shape; the height must divide 512 and both must be multiples of
        16. ``None`` writes one contiguous uncompressed image that
        ``tifffile.memmap`` can map.
    compression : str, optional
        Tiled files only, e.g. ``"zlib"``.
    **params
        As for :func:`generate_chip`.

    Returns
    -------
    ChipTruth
    """
    p, scene, dt, shape = _scene(params, data_dir)
    rgb = p["stain"] == "HE"
    photometric = "rgb" if rgb else "minisblack"
    big = int(np.prod(shape)) * dt.itemsize > 2**31
    strips = _strips(p["height"])
    if tile is None:
        if compression:
            msg = "compression needs a tiled TIFF (tile=...)"
            raise ValueError(msg)
        mm = tifffile.memmap(path, shape=shape, dtype=dt, photometric=photometric, bigtiff=big)
        try:
            generate_chip(data_dir=data_dir, out=mm, threads=threads, **params)
            mm.flush()
        finally:
            del mm
        return _truth(p, scene)
    th, tw = tile
    if STRIP % th or th % 16 or tw % 16:
        msg = f"tile height must divide {STRIP} and both sides be multiples of 16, got {tile}"
        raise ValueError(msg)

    def render(rows: tuple[int, int]) -> np.ndarray:
        return scene.finish(rows[0], rows[1], dt)

    def tiles() -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
            # render ahead by `threads` strips, in order
            pending = [ex.submit(render, s) for s in strips[:threads]]
            nxt = len(pending)
            while pending:
                strip = pending.pop(0).result()
                if nxt < len(strips):
                    pending.append(ex.submit(render, strips[nxt]))
                    nxt += 1
                for r in range(0, strip.shape[0], th):
                    for c in range(0, p["width"], tw):
                        yield strip[r : r + th, c : c + tw]

    tifffile.imwrite(
        path, tiles(), shape=shape, dtype=dt, tile=(th, tw), photometric=photometric,
        compression=compression, bigtiff=big,
    )  # fmt: skip
    return _truth(p, scene)


def generate_if(
    reference: ChipTruth,
    *,
    offset_px: tuple[float, float] = (0.0, 0.0),
    related: bool = True,
    dtype: str = "uint8",
    seed: int = 1,
    noise: float = 0.01,
    data_dir: str | os.PathLike[str] | None = None,
) -> SyntheticIF:
    """An immunofluorescence image to pair with a generated nuclear image.

    The IF signal mixes a slightly blurred, differently mapped copy of the
    reference's nuclei (same tissue and nuclei layout when ``related``) with
    the mIF membrane texture from the crops, inside the same tissue blobs, and
    has no track lines. Its content is shifted by ``offset_px``: a structure at
    ``(x, y)`` in the reference appears at ``(x + dx, y + dy)`` here. With
    ``related=False`` the nuclei and tissue come from another seed (the
    negative case for calibration).

    Parameters
    ----------
    reference : ChipTruth
        Truth of the nuclear image (``generate_chip(...).truth``); grey stains only.
    offset_px : (float, float)
        ``(dx, dy)`` in px, any sign, sub-pixel allowed.
    related : bool
    dtype : {"uint8", "uint16"}
    seed : int
        Seed of the IF-only texture and noise.
    """
    if reference.stain == "HE":
        msg = "IF images pair with DAPI or ssDNA references, not H&E"
        raise ValueError(msg)
    dx, dy = float(offset_px[0]), float(offset_px[1])
    if max(abs(dx), abs(dy)) > MAX_IF_OFFSET:
        msg = f"offset_px components must be within +-{MAX_IF_OFFSET} px, got {offset_px}"
        raise ValueError(msg)
    ddir = shared_data_dir(data_dir)
    ref_seed = reference.seed if related else reference.seed + 7919 * (seed + 1)
    scene = Scene(reference.as_dict(), ddir, related_seed=ref_seed)
    sx, sy = reference.scale
    W, H = reference.width, reference.height
    mif = Mosaic(load_crops(ddir, "mIF"), math.sqrt(sx * sy), (scene.pad, H, W), np.random.default_rng([seed, 5]))
    dt = np.dtype(dtype)
    blur = 1.0 * math.sqrt(sx * sy)
    halo = math.ceil(3 * blur) + 2
    ix, iy = math.floor(dx), math.floor(dy)
    fx, fy = dx - ix, dy - iy
    out = np.empty((H, W), dt)
    for y0, y1 in _strips(H):
        # IF pixel (x, y) shows scene point (x - dx, y - dy): render the scene band
        # shifted by the integer part (plus a halo), then shift by the fraction
        sy0, sy1 = y0 - iy - 1 - halo, y1 - iy + 1 + halo
        sx0 = -ix - 1 - halo
        ncols = W + 2 + 2 * halo
        m = scene.tissue_cover(sy0, sy1, sx0, ncols)
        nuc = cv2.GaussianBlur(scene.mosaic.rows(sy0, sy1, sx0, ncols) * m, (0, 0), blur)
        sig = 0.04 + m * (0.7 * np.clip(nuc, 0, None) ** 0.8 + 0.3 * mif.rows(sy0, sy1, sx0, ncols))
        # out[i, j] = sig[i + 1 + halo - fy, j + 1 + halo - fx]
        mat = np.array([[1, 0, 1 + halo - fx], [0, 1, 1 + halo - fy]], np.float32)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        block: np.ndarray = cv2.warpAffine(sig, mat, (W, y1 - y0), flags=flags, borderMode=cv2.BORDER_REFLECT)
        rng = np.random.default_rng([seed, 13, y0])
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(noise)
        out[y0:y1] = quantise(block, dt)
    truth = IFTruth(W, H, str(dt), (dx, dy), bool(related), int(seed), int(reference.seed))
    return SyntheticIF(out, truth)
