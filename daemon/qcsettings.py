"""QC settings from the service config: what the service's jobs and ``imageqc qc`` by hand both pass to QC.

Kept apart from :mod:`daemon.jobs` so the hand command does not import the
service's job machinery (uploads, logging) just to build its settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.config import Config

__all__ = ["clarity_spec", "qc_settings"]


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
