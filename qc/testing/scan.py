"""A microscope in a box for live QC: a real-looking chip cut into FOVs, written tile by tile at a scan's pace.

:func:`scan_tiles` returns ``(row, col, pixels)`` in acquisition order (row-major), cut from a generated
chip that looks like a real stitched one (:data:`qc.testing.chips.REAL_LOOKING`: dark surface, lines a
few grey levels deep, FOV seams, saturated tissue, debris) with a few pixels of stage jitter. Kinds:
``good``; ``blurred_rows`` (the first :data:`BLURRED_ROWS` rows out of focus); ``no_lines`` (a chip
without track lines).

:class:`ScanWriter` writes such tiles as Motic or Leica scans do: the folder's ``info.json`` (grid and
overlap) first, then one tile after another, each file in a few chunks with pauses between (so a
reader can meet a half-written TIFF), at a steady pace; optionally it writes an earlier tile again (a
re-acquired FOV). Live QC's tests and ``benchmarks/bench_live.py`` use both.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from qc.testing.chips import real_looking
from qc.testing.fovs import chip_tile_set

__all__ = ["BLURRED_ROWS", "BLUR_SIGMA", "ScanTile", "ScanWriter", "scan_tiles", "tiff_bytes"]

#: ``(row, col, pixels)``
ScanTile = tuple[int, int, np.ndarray]

BLURRED_ROWS = 3
BLUR_SIGMA = 6.0
#: Parameters of the chip the scans are cut from: real-looking (qc.testing.chips.REAL_LOOKING) but for size, seed, lines
_CHIP = {k: v for k, v in real_looking().items() if k not in ("width", "height", "seed", "lines", "angle_deg", "scale")}


def scan_tiles(
    kind: str, *, rows: int = 10, cols: int = 10, tile: int = 1024, overlap: float = 0.1, seed: int = 0
) -> list[ScanTile]:
    """The tiles of one scan, row-major (:func:`qc.testing.fovs.chip_tile_set` on a real-looking chip)."""
    if kind not in ("good", "blurred_rows", "no_lines"):
        msg = f"unknown kind {kind!r}"
        raise ValueError(msg)
    cut = chip_tile_set(
        rows=rows,
        cols=cols,
        tile_size=tile,
        overlap=overlap,
        angle_deg=0.4,
        no_lines=kind == "no_lines",
        blurred_rows=range(BLURRED_ROWS) if kind == "blurred_rows" else (),
        blur_sigma=BLUR_SIGMA,
        jitter_px=3,
        seed=seed,
        **_CHIP,  # type: ignore[arg-type]
    )
    return [(t.row, t.col, np.ascontiguousarray(t.read())) for t in cut.tiles]


def tiff_bytes(arr: np.ndarray) -> bytes:
    """One uncompressed TIFF page of ``arr``, as bytes."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="rgb" if arr.ndim == 3 else "minisblack")
    return buf.getvalue()


@dataclass
class ScanWriter:
    """Writes ``tiles`` (``(row, col, pixels)``, in acquisition order) into ``folder`` over ``seconds``.

    ``rewrite`` maps an acquisition index ``k`` to ``(row, col, pixels)``: right after tile ``k`` is
    written, that (earlier) tile's file is written again with the new pixels (a re-acquired FOV).
    ``written`` gets ``(row, col, time.time())`` after each file is complete. Call :meth:`start`,
    then :meth:`join`.
    """

    folder: Path
    tiles: Sequence[ScanTile]
    seconds: float
    info: dict[str, object]
    chunks: int = 4
    prefix: str = "FOV"
    rewrite: dict[int, ScanTile] = field(default_factory=dict)
    on_tile: Callable[[int], None] | None = None
    written: list[tuple[int, int, float]] = field(default_factory=list)
    error: BaseException | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def name(self, row: int, col: int) -> str:
        return f"{self.prefix}_{row:04d}_{col:04d}_20261203120000.tif"

    def start(self) -> ScanWriter:
        self._thread = threading.Thread(target=self._run, name=f"scan-writer-{self.folder.name}", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            msg = f"the scan writer of {self.folder} did not finish in {timeout} s ({len(self.written)} tiles written)"
            raise AssertionError(msg)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()

    def _write(self, row: int, col: int, pixels: np.ndarray, pause: float) -> None:
        data = tiff_bytes(pixels)
        step = -(-len(data) // self.chunks)
        with (self.folder / self.name(row, col)).open("wb") as fh:
            for i in range(0, len(data), step):
                fh.write(data[i : i + step])
                fh.flush()
                if pause and i + step < len(data):
                    self._stop.wait(pause)
        self.written.append((row, col, time.time()))  # wall clock, like the service's records

    def _run(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "info.json").write_text(json.dumps(self.info), encoding="utf-8")
            per_tile = self.seconds / max(1, len(self.tiles))
            start = time.monotonic()
            for k, (row, col, pixels) in enumerate(self.tiles):
                if self._stop.is_set():
                    return
                self._write(row, col, pixels, per_tile / (2 * self.chunks))
                if k in self.rewrite:
                    r, c, again = self.rewrite[k]
                    self._write(r, c, again, 0.0)
                if self.on_tile is not None:
                    self.on_tile(k)
                wait = start + (k + 1) * per_tile - time.monotonic()  # keep the scan's pace
                if wait > 0:
                    self._stop.wait(wait)
        except BaseException as e:  # reported by join()
            self.error = e
