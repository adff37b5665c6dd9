"""Clarity classifier models: the spec (what a model file is) and its loaded session.

A :class:`ClarityModel` describes an ONNX window classifier: where the file is,
which of our categories each output index means, the window size, how a
window is turned into the model's input tensor, and how RGB images are made
grey. The same keys describe a model in three places:

* the JSON sidecar beside a shipped model (``qc/models/clarity_v1.json``),
* the daemon config (``[qc.clarity]`` table: ``path``, ``classes`` or
  ``class_map``, ...), read with :meth:`ClarityModel.from_mapping`,
* Python code, building :class:`ClarityModel` directly.

:func:`load_clarity_model` builds the onnxruntime session at the edge (bounded
threads, sequential execution, no spinning) and checks the file against the
spec with one probe inference; metrics then take the returned
:class:`LoadedClarityModel`. Nothing here downloads anything.

Mapping keys (all but ``path`` optional)::

    path        model file (.onnx); relative paths resolve against base_dir
    classes     list: the category of each output index, in output order, e.g.
                ["background", "severe_blur", "good", "severe_overexposure"]
    class_map   table {model's own label: category}, in output order
                (alternative to ``classes``; keeps the model's labels for reports)
    name        name printed in reports (default: the file's stem)
    window      window side in pixels (default 64)
    channels    input channels, 1 or 3 (grey copied to all three); default 1
    mean, std   per-channel normalisation in 8-bit units: x = (v - mean) / std;
                default 0 and 255 (x in [0, 1])
    input, output   tensor names (default: the model's first input / output)
    rgb         how an RGB image becomes grey: "reject" (default),
                "luminance", or "inverted_luminance" (bright-field: stained
                nuclei become bright, glass becomes dark background)

Categories: ``good``, ``mild_blur``, ``severe_blur``, ``mild_overexposure``,
``severe_overexposure``, plus ``background`` (empty chip surface or black:
not scored).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qc.errors import ModelError

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "RGB_MODES",
    "SHIPPED_SIDECAR",
    "STOMICS_4CLASS",
    "ClarityModel",
    "LoadedClarityModel",
    "import_onnxruntime",
    "load_clarity_model",
]

#: Window categories that enter the score, StereoMap's clarity classes.
CATEGORIES = ("good", "mild_blur", "severe_blur", "mild_overexposure", "severe_overexposure")
#: Windows with no tissue (empty chip surface, black): counted, never scored.
BACKGROUND = "background"
#: Ways to turn an RGB image into the grey image the models read.
RGB_MODES = ("reject", "luminance", "inverted_luminance")
#: The sidecar of the model shipped with imageqc (the default model).
SHIPPED_SIDECAR = Path(__file__).resolve().parents[1] / "models" / "clarity_v1.json"

#: STOmics' published 4-class clarity model (STCellbin ``src/weights``), as a
#: mapping without ``path``: add ``path`` to the .onnx file and pass it to
#: :meth:`ClarityModel.from_mapping`. It flags blur only when strong, so its
#: ``blur`` maps to ``severe_blur``.
STOMICS_4CLASS: Mapping[str, Any] = {
    "name": "stomics-clarity-mobilenetv3-4class",
    "class_map": {
        "black": "background",
        "blur": "severe_blur",
        "good": "good",
        "over_exposed": "severe_overexposure",
    },
    "window": 64,
    "channels": 3,
    "mean": [123.675, 116.28, 103.53],
    "std": [58.395, 57.12, 57.375],
    "input": "input0",
    "output": "output0",
    "rgb": "reject",
}

_MAPPING_KEYS = frozenset(
    {"path", "classes", "class_map", "name", "window", "channels", "mean", "std", "input", "output", "rgb"}
)


def _as_floats(value: Any, key: str, channels: int) -> tuple[float, ...]:
    vals = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        msg = f"clarity model: {key} must be a number or a list of numbers, got {value!r}"
        raise ModelError(msg) from None
    if len(out) == 1:
        out = out * channels
    if len(out) != channels:
        msg = f"clarity model: {key} has {len(out)} values but the model has {channels} channel(s)"
        raise ModelError(msg, hint=f"Give one value or {channels}")
    return out


@dataclass(frozen=True)
class ClarityModel:
    """What a clarity model file is and how to feed it (no session; cheap to build).

    Parameters
    ----------
    path : Path
        The ONNX file.
    classes : tuple of str
        The category of each output index: one of :data:`CATEGORIES` or
        :data:`BACKGROUND`.
    name : str
        Name printed in reports; default the file's stem.
    class_names : tuple of str
        The model's own label of each output index; default ``classes``.
    window : int
        Window side in pixels.
    channels : int
        1, or 3 (the grey window copied to three channels).
    mean, std : tuple of float
        Per-channel input normalisation in 8-bit units, ``(v - mean) / std``.
    input_name, output_name : str or None
        Tensor names; ``None`` takes the model's first input/output.
    rgb : str
        One of :data:`RGB_MODES`.
    info : mapping
        Everything else the sidecar says (training data, validation accuracy...).
    """

    path: Path
    classes: tuple[str, ...]
    name: str = ""
    class_names: tuple[str, ...] = ()
    window: int = 64
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (255.0,)
    input_name: str | None = None
    output_name: str | None = None
    rgb: str = "reject"
    info: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.name:
            object.__setattr__(self, "name", self.path.stem)
        if not self.class_names:
            object.__setattr__(self, "class_names", self.classes)
        allowed = (*CATEGORIES, BACKGROUND)
        bad = [c for c in self.classes if c not in allowed]
        if bad:
            msg = f"clarity model {self.name}: unknown categories {bad} in classes"
            raise ModelError(msg, hint=f"Map each output to one of {', '.join(allowed)}")
        if not any(c in CATEGORIES for c in self.classes):
            msg = f"clarity model {self.name}: classes {list(self.classes)} contain no scored category"
            raise ModelError(msg, hint=f"Map at least one output to one of {', '.join(CATEGORIES)}")
        if len(self.class_names) != len(self.classes):
            msg = f"clarity model {self.name}: {len(self.class_names)} class names for {len(self.classes)} classes"
            raise ModelError(msg)
        if not isinstance(self.window, int) or not 8 <= self.window <= 1024:
            msg = f"clarity model {self.name}: window must be an integer from 8 to 1024, got {self.window!r}"
            raise ModelError(msg)
        if self.channels not in (1, 3):
            msg = f"clarity model {self.name}: channels must be 1 or 3, got {self.channels!r}"
            raise ModelError(msg)
        object.__setattr__(self, "mean", _as_floats(self.mean, "mean", self.channels))
        object.__setattr__(self, "std", _as_floats(self.std, "std", self.channels))
        if min(self.std) <= 0:
            msg = f"clarity model {self.name}: std must be positive, got {list(self.std)}"
            raise ModelError(msg)
        if self.rgb not in RGB_MODES:
            msg = f"clarity model {self.name}: rgb must be one of {', '.join(RGB_MODES)}, got {self.rgb!r}"
            raise ModelError(msg)

    @property
    def supports_colour(self) -> bool:
        """Whether RGB (H&E) images can be evaluated with this model."""
        return self.rgb != "reject"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, base_dir: str | Path | None = None) -> ClarityModel:
        """Build a spec from config-like keys (see the module docstring).

        Parameters
        ----------
        mapping : mapping
            ``path`` plus optional keys. Unknown keys raise :class:`ModelError`.
        base_dir : path, optional
            Directory that a relative ``path`` is relative to (the config file's).
        """
        unknown = sorted(set(mapping) - _MAPPING_KEYS)
        if unknown:
            msg = f"clarity model: unknown keys {unknown}"
            raise ModelError(msg, hint=f"Use only {', '.join(sorted(_MAPPING_KEYS))}")
        return cls._build(mapping, base_dir=base_dir, info={})

    @classmethod
    def from_sidecar(cls, sidecar: str | Path) -> ClarityModel:
        """Read a model's JSON sidecar: mapping keys plus ``file`` and metadata."""
        sidecar = Path(sidecar)
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            msg = f"clarity model sidecar {sidecar}: file not found"
            raise ModelError(msg, hint="Reinstall imageqc or point qc.model in the config at a model") from None
        except (OSError, ValueError) as exc:
            msg = f"clarity model sidecar {sidecar}: not readable JSON ({exc})"
            raise ModelError(msg) from None
        if "file" not in data:
            msg = f"clarity model sidecar {sidecar}: missing key 'file'"
            raise ModelError(msg)
        spec = {k: v for k, v in data.items() if k in _MAPPING_KEYS}
        spec["path"] = data["file"]
        info = {k: v for k, v in data.items() if k not in _MAPPING_KEYS}
        return cls._build(spec, base_dir=sidecar.parent, info=info)

    @classmethod
    def shipped(cls) -> ClarityModel:
        """The model shipped in ``qc/models`` (package data)."""
        return cls.from_sidecar(SHIPPED_SIDECAR)

    @classmethod
    def _build(cls, m: Mapping[str, Any], *, base_dir: str | Path | None, info: dict[str, Any]) -> ClarityModel:
        if "path" not in m:
            msg = "clarity model: missing key 'path' (the .onnx file)"
            raise ModelError(msg)
        path = Path(m["path"])
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if ("classes" in m) == ("class_map" in m):
            msg = f"clarity model {path.name}: give exactly one of 'classes' (list) or 'class_map' (table)"
            raise ModelError(msg)
        if "classes" in m:
            classes = tuple(m["classes"])
            names: tuple[str, ...] = ()
        else:
            cmap = m["class_map"]
            if not isinstance(cmap, Mapping):
                msg = f"clarity model {path.name}: class_map must be a table {{label: category}}"
                raise ModelError(msg)
            names, classes = tuple(cmap.keys()), tuple(cmap.values())
        channels = m.get("channels", 1)
        return cls(
            path=path,
            classes=classes,
            name=m.get("name", ""),
            class_names=names,
            window=m.get("window", 64),
            channels=channels,
            mean=m.get("mean", 0.0),
            std=m.get("std", 255.0),
            input_name=m.get("input"),
            output_name=m.get("output"),
            rgb=m.get("rgb", "reject"),
            info=info,
        )


@dataclass(frozen=True, eq=False)
class LoadedClarityModel:
    """A :class:`ClarityModel` with its onnxruntime session (build with :func:`load_clarity_model`)."""

    spec: ClarityModel
    session: Any = field(repr=False)
    threads: int = 1
    input_name: str = ""
    output_name: str = ""

    def predict_proba(self, windows: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of grey 8-bit windows.

        Parameters
        ----------
        windows : ndarray, shape (N, window, window), uint8
            Grey windows after intensity normalisation.

        Returns
        -------
        ndarray, shape (N, len(spec.classes)), float32
            Softmax of the model's logits; rows sum to 1.
        """
        spec = self.spec
        if windows.ndim != 3 or windows.shape[1:] != (spec.window, spec.window):
            msg = f"windows must have shape (N, {spec.window}, {spec.window}), got {windows.shape}"
            raise ValueError(msg)
        x = windows.astype(np.float32)[:, None, :, :]
        mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
        x = (np.broadcast_to(x, (x.shape[0], spec.channels, *x.shape[2:])) - mean) / std
        logits = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        logits = np.asarray(logits, np.float32)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        result: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return result


#: onnxruntime's own switch: when set before the library loads, it neither
#: creates its telemetry store (``~/.cache/Microsoft/DeveloperTools/.onnxruntime``
#: on Linux, written at import) nor sends events.
ORT_TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def import_onnxruntime() -> Any:
    """Import onnxruntime with its telemetry off; every use of onnxruntime goes through here.

    onnxruntime's official builds write a device id and an event database under
    the user's home when the library loads (recent Linux builds) and send trace
    events (Windows). The service must not write outside its configured folders,
    so the environment switch is set before the first import, and the API switch
    (:func:`onnxruntime.disable_telemetry_events`) is called after it, which also
    covers a process that imported onnxruntime earlier by another route.

    Returns
    -------
    module
        The ``onnxruntime`` module.
    """
    if "onnxruntime" not in sys.modules:
        os.environ[ORT_TELEMETRY_ENV] = "1"
    import onnxruntime as ort

    disable = getattr(ort, "disable_telemetry_events", None)
    if disable is not None:  # absent in some minimal builds
        disable()
    return ort


def load_clarity_model(spec: ClarityModel | None = None, *, threads: int = 1) -> LoadedClarityModel:
    """Open a clarity model with bounded threads and check it against its spec.

    Parameters
    ----------
    spec : ClarityModel, optional
        Default: the shipped model (:meth:`ClarityModel.shipped`).
    threads : int
        onnxruntime intra-op threads (inter-op is 1, execution sequential,
        worker threads do not spin). Keep at or below the cores QC may use.

    Returns
    -------
    LoadedClarityModel

    Raises
    ------
    ModelError
        The file is missing or not an ONNX model, its tensors are not the
        declared ones, or its class count differs from ``spec.classes``.
    """
    ort = import_onnxruntime()  # imported here: only sessions need it

    if spec is None:
        spec = ClarityModel.shipped()
    if not isinstance(threads, int) or threads < 1:
        msg = f"clarity model {spec.name}: threads must be a positive integer, got {threads!r}"
        raise ModelError(msg)
    if not spec.path.is_file():
        msg = f"clarity model {spec.name}: file not found: {spec.path}"
        raise ModelError(
            msg,
            hint="Set qc.model in the config to an existing .onnx or sidecar .json file, or leave it empty to use the shipped model",
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(spec.path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own hierarchy; all mean "unusable file"
        msg = f"clarity model {spec.name}: {spec.path} is not a loadable ONNX model ({exc})"
        raise ModelError(msg, hint="Check the file is complete and is an .onnx classifier") from None
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    in_name = spec.input_name or session.get_inputs()[0].name
    out_name = spec.output_name or session.get_outputs()[0].name
    if in_name not in inputs or out_name not in outputs:
        msg = (
            f"clarity model {spec.name}: tensors {in_name!r} -> {out_name!r} not in the model "
            f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})"
        )
        raise ModelError(msg, hint="Fix input/output in the model's config or sidecar")
    shape = inputs[in_name].shape
    expect = (None, spec.channels, spec.window, spec.window)
    if len(shape) != 4 or any(
        isinstance(d, int) and e is not None and d != e for d, e in zip(shape, expect, strict=False)
    ):
        msg = f"clarity model {spec.name}: input {in_name} has shape {shape}, expected [N, {spec.channels}, {spec.window}, {spec.window}]"
        raise ModelError(msg, hint="Fix channels/window in the model's config or sidecar")
    loaded = LoadedClarityModel(spec=spec, session=session, threads=threads, input_name=in_name, output_name=out_name)
    try:
        probe = loaded.predict_proba(np.zeros((1, spec.window, spec.window), np.uint8))
    except Exception as exc:
        msg = f"clarity model {spec.name}: a probe inference failed ({exc})"
        raise ModelError(msg, hint="Check channels, window and tensor names against the model") from None
    if probe.shape != (1, len(spec.classes)):
        msg = (
            f"clarity model {spec.name}: the model outputs {probe.shape[1:]} values per window "
            f"but {len(spec.classes)} classes are declared ({', '.join(spec.class_names)})"
        )
        raise ModelError(msg, hint="List one category per model output, in output order")
    return loaded
