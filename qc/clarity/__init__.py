"""Clarity: classify windows of an image (good, blurred, over-exposed) with an ONNX model and score it.

>>> from qc.clarity import evaluate_clarity, load_clarity_model
>>> model = load_clarity_model()  # doctest: +SKIP
>>> # (the shipped model; the onnxruntime session is built here, at the edge, and passed in)
>>> result = evaluate_clarity(image, model)  # doctest: +SKIP

Modules (the public names are the ones below; the modules' other names are internal):

- :mod:`qc.clarity.evaluate`: :func:`evaluate_clarity`, the window grid, the intensity mapping shared
  with training (:func:`intensity_range`, :func:`to_uint8`) and the score;
- :mod:`qc.clarity.model`: what a model file is (:class:`ClarityModel`, its JSON sidecar) and its loaded
  session (:func:`load_clarity_model`); the shipped model is ``qc/models/clarity_v1.onnx``.
"""

from qc.clarity.evaluate import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_WINDOWS,
    DEFAULT_WEIGHTS,
    GOOD_SCORE,
    INTENSITY_PERCENTILES,
    MAP_LABELS,
    MIN_RANGE_FRACTION,
    ClarityResult,
    WindowGrid,
    evaluate_clarity,
    intensity_range,
    to_uint8,
    window_grid,
)
from qc.clarity.model import (
    BACKGROUND,
    CATEGORIES,
    RGB_MODES,
    SHIPPED_SIDECAR,
    STOMICS_4CLASS,
    ClarityModel,
    LoadedClarityModel,
    load_clarity_model,
)

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_WINDOWS",
    "DEFAULT_WEIGHTS",
    "GOOD_SCORE",
    "INTENSITY_PERCENTILES",
    "MAP_LABELS",
    "MIN_RANGE_FRACTION",
    "RGB_MODES",
    "SHIPPED_SIDECAR",
    "STOMICS_4CLASS",
    "ClarityModel",
    "ClarityResult",
    "LoadedClarityModel",
    "WindowGrid",
    "evaluate_clarity",
    "intensity_range",
    "load_clarity_model",
    "to_uint8",
    "window_grid",
]
