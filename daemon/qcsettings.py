"""QC settings from the service config: what the service's jobs and ``imageqc qc`` by hand both pass to QC.

Kept apart from :mod:`daemon.jobs` so the hand command does not import the
service's job machinery (uploads, logging) just to build its settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.config import Config

__all__ = ["clarity_spec", "no_huge_page_stalls", "qc_settings"]


def clarity_spec(config: Config) -> Any:
    """The clarity model spec the config asks for (None = the shipped model)."""
    qc = config.qc
    if not qc.model:
        return None
    from qc.clarity import STOMICS_4CLASS, ClarityModel

    path = Path(qc.model)
    if path.suffix.lower() == ".json":
        return ClarityModel.from_sidecar(path)
    mapping: dict[str, Any] = dict(STOMICS_4CLASS) if qc.model_preset == "stomics-4class" else {}
    mapping["path"] = str(path)
    if qc.model_classes:
        mapping["class_map"] = dict(qc.model_classes)
        mapping.setdefault("name", path.stem)
    return ClarityModel.from_mapping(mapping)


def qc_settings(config: Config, *, stain: str = "auto") -> Any:
    """:class:`qc.pipeline.QCSettings` from the service config."""
    from qc.io import ReadLimits
    from qc.pipeline import QCSettings
    from qc.rules import Thresholds

    t = config.qc.thresholds
    return QCSettings(
        stain=stain,
        thresholds=Thresholds(
            track=t.track,
            clarity=t.clarity,
            stitching=t.stitching,
            calibration_offset_px=t.calibration_offset_px,
            calibration_similarity=t.calibration_similarity,
        ),
        stitching_required=config.qc.stitching_required,
        stitching_stage_limit_px=config.qc.stitching_stage_limit_px,
        threads=config.qc.threads,
        limits=ReadLimits(
            max_dimension=config.qc.max_dimension,
            max_pixels=config.qc.max_pixels,
            max_archive_bytes=max(1, int(config.qc.max_archive_gb * 1024**3)),
        ),
        clarity_model=clarity_spec(config),
        site=config.site.name,
        operator=config.site.operator,
    )


def no_huge_page_stalls() -> None:
    """Ask numpy not to request transparent huge pages for large arrays in this process (Linux; no-op elsewhere).

    numpy advises the kernel to back every large array with 2 MiB pages; where THP's defrag setting is
    ``madvise`` (Ubuntu's and Debian's default) and memory is fragmented (a page cache full of tiles), the
    first touch of a QC plane then waits for the kernel to compact memory. Measured on the 2-core VM: 12 s to
    zero a fresh 1.4 GB array (a 37k^2 tile-set plane) and 31 s for 3.6 GB, against 1.0 s and 2.8 s with
    4 KiB pages; the final QC of a live-scanned set spent 12 s "reading" its plane so. QC allocates a plane
    once and walks it a few times, where huge pages save next to nothing.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if callable(setter):
        setter(False)
