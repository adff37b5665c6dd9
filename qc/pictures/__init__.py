"""Pictures of a QC run that stand on their own: what was measured, against what, what each colour means.

>>> from qc.pictures import pictures_for_run
>>> pictures_for_run(report, out / "pictures")  # doctest: +SKIP

Modules (the public names are the ones below; the modules' other names are internal):

- :mod:`qc.pictures.draw`: one picture per metric (track, clarity, stitching, calibration), the
  full-resolution crops taken while an image is open, and a run's set of pictures;
- :mod:`qc.pictures.fovs`: the per-FOV map of a tiled image (live QC's checks of each field of view);
- :mod:`qc.pictures.parts`: what every picture is built of: header band, legend, text bands, layout;
- :mod:`qc.pictures.summary`: the run's one-page summary sheet that notifications carry.
"""

from qc.pictures.draw import (
    CALIBRATION_CROP_PX,
    INSET_PX,
    THUMB_SIDE,
    draw_calibration,
    draw_clarity,
    draw_stitching,
    draw_track,
    pictures_for_run,
    pictures_from_artifacts,
    safe_name,
    take_calibration_crops,
    take_track_insets,
    thumb_factor,
    to_display,
    write_png,
)
from qc.pictures.fovs import draw_fov_map
from qc.pictures.parts import STRIPE_PX, VERDICT_COLOURS, Legend, Picture
from qc.pictures.summary import SUMMARY_WIDTH, draw_summary

__all__ = [
    "CALIBRATION_CROP_PX",
    "INSET_PX",
    "STRIPE_PX",
    "SUMMARY_WIDTH",
    "THUMB_SIDE",
    "VERDICT_COLOURS",
    "Legend",
    "Picture",
    "draw_calibration",
    "draw_clarity",
    "draw_fov_map",
    "draw_stitching",
    "draw_summary",
    "draw_track",
    "pictures_for_run",
    "pictures_from_artifacts",
    "safe_name",
    "take_calibration_crops",
    "take_track_insets",
    "thumb_factor",
    "to_display",
    "write_png",
]
