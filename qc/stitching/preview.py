"""The fused view of a tile set at a picture's resolution, from tiles reduced while QC read them.

:func:`fused_preview` places each tile's reduced view (``Image.tile_views``)
at its registered position divided by the reduction factor and blends the
overlaps as :func:`qc.stitching.fuse_tiles` does (weights falling to the
tiles' edges), so the stitching picture shows the chip as it fuses rather
than at the nominal positions, where a stage error shows as a doubled edge.
It reads no pixels: at 20 x 20 tiles of 2048^2 it costs a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qc.stitching.fusion import _ramp

__all__ = ["fused_preview"]


def fused_preview(
    views: Mapping[str, np.ndarray],
    positions: Mapping[str, tuple[float, float]],
    factor: int,
    like: np.ndarray,
) -> np.ndarray | None:
    """The tiles' ``views`` (reduced by ``factor``) blended at ``positions`` / ``factor``, shaped like ``like``.

    ``positions`` are the tiles' top-left corners in full-resolution pixels
    (the frame of the nominal positions, as
    :attr:`StitchingResult.registered_positions` gives them); parts falling
    outside ``like``'s shape are cut off, pixels no tile covers are 0. Returns
    ``None`` when a tile of ``positions`` has no view (the image was not read
    whole with views kept).
    """
    if not positions or any(name not in views for name in positions):
        return None
    h, w = like.shape[:2]
    extra = like.shape[2:]
    acc = np.zeros((h, w, *extra), dtype=np.float32)
    weight = np.zeros((h, w), dtype=np.float32)
    ramps: dict[tuple[int, int], np.ndarray] = {}
    for name, (x, y) in positions.items():
        view = views[name]
        vh, vw = view.shape[:2]
        x0, y0 = round(x / factor), round(y / factor)
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + vw, w), min(y0 + vh, h)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        wts = ramps.get((vh, vw))
        if wts is None:
            wts = ramps[(vh, vw)] = np.multiply.outer(_ramp(vh), _ramp(vw))  # the fusion's own weights
        part = wts[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        pix = view[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].astype(np.float32)
        acc[cy0:cy1, cx0:cx1] += pix * (part[..., None] if extra else part)
        weight[cy0:cy1, cx0:cx1] += part
    covered = weight > 0
    out = np.zeros(like.shape, dtype=like.dtype)
    mean = acc[covered] / (weight[covered][:, None] if extra else weight[covered])
    if np.issubdtype(like.dtype, np.integer):
        info = np.iinfo(like.dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    out[covered] = mean.astype(like.dtype)
    return out
