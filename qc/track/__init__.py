"""Track lines: find a chip's track-line grid in an image and fit the chip's template.

>>> from qc.track import find_track_lines
>>> result = find_track_lines(image, "SS200000135TL_D1")  # doctest: +SKIP
>>> result.score, result.angle_deg, result.scale, result.origin_px  # doctest: +SKIP

Modules (the public names are the ones below; the modules' other names are internal):

- :mod:`qc.track.detect`: :func:`find_track_lines`, the driver: coarse search, fine refinement, score;
- :mod:`qc.track.coarse`: the coarse grid search on a downsampled image (angle, line profiles, template fit);
- :mod:`qc.track.fine`: full-resolution refinement at predicted line crossings;
- :mod:`qc.track.grid`: the grid geometry and its conventions (:class:`GridModel`), shared with the
  synthetic chips of :mod:`qc.testing.chips`, the pictures and the IPR writer.
"""

from qc.track.detect import PASS_SCORE, TrackResult, find_track_lines
from qc.track.grid import GridLines, GridModel

__all__ = ["PASS_SCORE", "GridLines", "GridModel", "TrackResult", "find_track_lines"]
