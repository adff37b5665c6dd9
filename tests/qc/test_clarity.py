"""Clarity (issue 6): real ONNX inference on real stain crops.

Proves: the shipped model loads from package data and matches its sidecar;
scores of real DAPI/ssDNA/mIF crops start high and fall steadily as Gaussian
blur grows and as exposure saturates; empty images are reported as having no
tissue; uint8 and uint16 agree; STOmics' published model works through a
config-like mapping; bad models fail with clear ModelErrors; sessions use
bounded threads; window sampling reads a memmap on a bounded grid.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import qc
from qc import clarity
from qc.clarity import (
    BACKGROUND,
    CATEGORIES,
    MAP_LABELS,
    STOMICS_4CLASS,
    ClarityModel,
    evaluate_clarity,
    load_clarity_model,
    window_grid,
)
from qc.errors import ModelError
from tests.helpers import require_shared_data

STAINS = ("DAPI", "ssDNA", "mIF")
SIGMAS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
GAINS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
TOLERANCE = 5.0  # score points a series may rise between steps (sampling noise on 16 windows)
STOMICS_FILE = "clarity_eval_mobilev3small05064_DAPI_20230202_pytorch.onnx"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return require_shared_data("stereo_crops")


def read_crop(data_dir: Path, stain: str) -> np.ndarray:
    (path,) = sorted((data_dir / "stereo_crops" / stain / "input").glob("*.tif"))
    return tifffile.imread(path)


@pytest.fixture(scope="module")
def shipped():
    return load_clarity_model(threads=2)


@pytest.fixture(scope="module")
def stomics(data_dir: Path):
    spec = ClarityModel.from_mapping({**STOMICS_4CLASS, "path": STOMICS_FILE}, base_dir=data_dir / "models")
    return load_clarity_model(spec, threads=2)


def blurred(img: np.ndarray, sigma: float) -> np.ndarray:
    return img if sigma == 0 else cv2.GaussianBlur(img, (0, 0), sigma)


def exposed(img: np.ndarray, gain: float) -> np.ndarray:
    full = np.iinfo(img.dtype).max
    return np.clip(np.rint(img.astype(np.float64) * gain), 0, full).astype(img.dtype)


def assert_falls_steadily(scores: list[float], *, start: float, end: float) -> None:
    assert scores[0] >= start, scores
    for a, b in itertools.pairwise(scores):
        assert b <= a + TOLERANCE, scores
    assert scores[-1] <= end, scores


# ---- the shipped model ---------------------------------------------------------------------------


def test_shipped_model_loads_from_package_data_and_matches_its_sidecar(shipped):
    spec = shipped.spec
    models_dir = Path(qc.__file__).resolve().parent / "models"  # package data of qc, beside the subpackages
    assert spec.path.parent == models_dir and spec.path.suffix == ".onnx"
    sidecar = json.loads((models_dir / "clarity_v1.json").read_text(encoding="utf-8"))
    assert hashlib.sha256(spec.path.read_bytes()).hexdigest() == sidecar["sha256"]
    assert spec.path.stat().st_size < 1_000_000
    assert spec.classes == tuple(sidecar["classes"]) and set(spec.classes) == {*CATEGORIES, BACKGROUND}
    # the session's tensors are the ones the sidecar declares
    (inp,) = shipped.session.get_inputs()
    (out,) = shipped.session.get_outputs()
    assert (inp.name, out.name) == (sidecar["input"], sidecar["output"])
    assert inp.shape[1:] == [sidecar["channels"], sidecar["window"], sidecar["window"]]
    assert out.shape[1] == len(sidecar["classes"])
    # the validation record is internally consistent and says something
    val = sidecar["validation"]
    matrix = np.array(val["confusion"]["matrix"])
    assert matrix.shape == (len(spec.classes),) * 2 and matrix.sum() == val["windows"]
    assert val["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-3)
    assert set(val["sources"]).isdisjoint(sidecar["training"]["sources"])
    assert val["accuracy"] >= 0.75
    assert sidecar["training"]["commit"] not in ("", "unknown")


def test_shipped_model_reproduces_its_recorded_validation_accuracy(shipped, data_dir, monkeypatch):
    """Fresh windows from the held-back sources, made by the training data code (no torch needed)."""
    monkeypatch.setenv("IMAGEQC_SHARED_DATA", str(data_dir))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "training"))
    import clarity_data

    sidecar = shipped.spec.info["validation"]
    val = [s for s in clarity_data.load_sources() if s.split == "val"]
    assert [s.name for s in val] == sidecar["sources"]
    x, y, _ = clarity_data.build_split(val, 60, np.random.default_rng(12345))
    assert shipped.spec.classes == clarity_data.CLASSES
    pred = shipped.predict_proba(x).argmax(axis=1)
    assert np.mean(pred == y) == pytest.approx(sidecar["accuracy"], abs=0.08)


def test_probabilities_are_a_distribution_per_window(shipped, data_dir):
    img = clarity.to_uint8(read_crop(data_dir, "DAPI"), 0, 65535)
    wins = np.stack([img[y : y + 64, x : x + 64] for y in (0, 64) for x in (0, 128)])
    p = shipped.predict_proba(wins)
    assert p.shape == (4, 6) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def overexposed(res) -> int:
    return res.counts["mild_overexposure"] + res.counts["severe_overexposure"]


@pytest.mark.parametrize("stain", STAINS)
def test_score_falls_steadily_as_blur_grows(shipped, data_dir, stain):
    img = read_crop(data_dir, stain)
    results = [evaluate_clarity(blurred(img, s), shipped) for s in SIGMAS]
    scores = [r.score for r in results]
    assert scores[0] >= 80.0 and scores[-1] <= 30.0, scores
    blur = [r.counts["mild_blur"] + r.counts["severe_blur"] for r in results]
    assert blur == sorted(blur), blur  # blur is detected more, never less, as it grows
    assert blur[-1] >= 0.75 * (results[-1].windows_evaluated - results[-1].counts["background"])
    for a, b in itertools.pairwise(results):
        if b.score > a.score + TOLERANCE:
            # Only where slight blur removes clipping the original has: the DAPI crop has
            # 0.23 % of its pixels at 65535 (small saturated nuclei), none left at sigma 1.
            assert overexposed(b) < overexposed(a), (scores, [overexposed(r) for r in results])


@pytest.mark.parametrize("stain", STAINS)
def test_score_falls_steadily_as_exposure_saturates(shipped, data_dir, stain):
    img = read_crop(data_dir, stain)
    results = [evaluate_clarity(exposed(img, g), shipped) for g in GAINS]
    assert_falls_steadily([r.score for r in results], start=80.0, end=30.0)
    last = results[-1].counts
    assert last["mild_overexposure"] + last["severe_overexposure"] > last["good"]


def test_blurred_windows_are_classed_as_blur(shipped, data_dir):
    res = evaluate_clarity(blurred(read_crop(data_dir, "ssDNA"), 8.0), shipped)
    blur = res.counts["mild_blur"] + res.counts["severe_blur"]
    assert blur >= 0.75 * (res.windows_evaluated - res.counts["background"])
    assert res.class_map.shape == res.grid.shape == (4, 4)
    assert {MAP_LABELS[i] for i in np.unique(res.class_map)} <= set(MAP_LABELS)


def test_real_empty_area_is_reported_as_background(shipped, data_dir):
    from pylibCZIrw import czi as pyczi

    with pyczi.open_czi(str(data_dir / "czi" / "mosaic_test.czi")) as czi:
        empty = czi.read()[0:256, 0:512, 0]  # sensor background left of the specimen
    res = evaluate_clarity(empty, shipped)
    assert res.score is None
    assert res.problem is not None and "background" in res.problem
    assert res.counts["background"] == res.windows_evaluated == 32
    assert res.background_share == 1.0
    assert res.to_dict()["score"] is None


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_synthetic_empty_chip_and_black_are_background(shipped, dtype):
    rng = np.random.default_rng(6)
    full = np.iinfo(dtype).max
    chip = 0.04 * full + rng.normal(0, 0.003 * full, (512, 512))
    chip[::150, :] *= 0.6  # dark track lines
    chip[:, ::150] *= 0.6
    for img in (np.clip(chip, 0, full).astype(dtype), np.zeros((256, 256), dtype)):
        res = evaluate_clarity(img, shipped)
        assert res.score is None and res.background_share == 1.0, res.counts


def test_tissue_next_to_empty_chip_scores_the_tissue_only(shipped, data_dir):
    crop = read_crop(data_dir, "DAPI")
    canvas = np.full((256, 512), int(np.percentile(crop, 1)), np.uint16)
    canvas[:, 256:] = crop
    res = evaluate_clarity(canvas, shipped)
    alone = evaluate_clarity(crop, shipped)
    assert 0.3 <= res.background_share <= 0.6
    assert res.score == pytest.approx(alone.score, abs=8)


@pytest.mark.parametrize("stain", ["DAPI", "ssDNA"])
def test_uint16_and_uint8_agree(shipped, data_dir, stain):
    img16 = read_crop(data_dir, stain)
    for sigma in (0.0, 3.0):
        a = blurred(img16, sigma)
        b = (a >> 8).astype(np.uint8)
        ra, rb = evaluate_clarity(a, shipped), evaluate_clarity(b, shipped)
        assert ra.score == pytest.approx(rb.score, abs=6)
        assert np.mean(ra.class_map == rb.class_map) >= 0.8


def test_rgb_he_uses_inverted_luminance(shipped, data_dir):
    he = read_crop(data_dir, "HE")
    assert he.ndim == 3 and shipped.spec.supports_colour
    sharp = evaluate_clarity(he, shipped).score
    soft = evaluate_clarity(blurred(he, 6.0), shipped).score
    assert sharp >= 70 and soft <= sharp - 40


# ---- STOmics' published model through the config mapping ----------------------------------------


def test_stomics_model_loads_through_a_config_mapping(stomics):
    spec = stomics.spec
    assert spec.classes == ("background", "severe_blur", "good", "severe_overexposure")
    assert spec.class_names == ("black", "blur", "good", "over_exposed")
    assert (stomics.input_name, stomics.output_name) == ("input0", "output0")
    assert not spec.supports_colour


def test_stomics_model_scores_real_crops_sensibly(stomics, data_dir):
    good, blur = [], []
    for stain in STAINS:
        img = read_crop(data_dir, stain)
        good.append(evaluate_clarity(img, stomics).score)
        blur.append(evaluate_clarity(blurred(img, 8.0), stomics).score)
    assert min(good) >= 80
    assert all(b < g for g, b in zip(good, blur, strict=False))
    assert np.mean(good) - np.mean(blur) >= 20


def test_stomics_model_rejects_rgb(stomics, data_dir):
    with pytest.raises(ModelError, match="grey images only"):
        evaluate_clarity(read_crop(data_dir, "HE"), stomics)


# ---- errors and limits ---------------------------------------------------------------------------


def test_missing_model_file_is_a_clear_model_error(tmp_path):
    spec = ClarityModel.from_mapping({**STOMICS_4CLASS, "path": "nope.onnx"}, base_dir=tmp_path)
    with pytest.raises(ModelError, match=r"file not found: .*nope\.onnx.*Set qc\.model in the config"):
        load_clarity_model(spec)


def test_not_an_onnx_file_is_a_model_error(tmp_path):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        load_clarity_model(ClarityModel(path=bad, classes=("good", "severe_blur")))


def test_wrong_class_count_is_a_model_error(data_dir):
    spec = ClarityModel.from_mapping(
        {
            "path": str(data_dir / "models" / STOMICS_FILE),
            "classes": list(MAP_LABELS),
            "channels": 3,
            "mean": STOMICS_4CLASS["mean"],
            "std": STOMICS_4CLASS["std"],
        }
    )
    with pytest.raises(ModelError, match=r"outputs .*4.* but 6 classes are declared"):
        load_clarity_model(spec)


def test_wrong_channel_count_is_a_model_error(data_dir):
    spec = ClarityModel(
        path=data_dir / "models" / STOMICS_FILE, classes=("background", "severe_blur", "good", "severe_overexposure")
    )
    with pytest.raises(ModelError, match=r"input input0 has shape .* expected \[N, 1, 64, 64\]"):
        load_clarity_model(spec)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"path": "m.onnx", "classes": ["good", "blurry"]}, "unknown categories"),
        ({"path": "m.onnx", "classes": ["background"]}, "no scored category"),
        ({"path": "m.onnx", "classes": ["good"], "colour": "rgb"}, "unknown keys"),
        ({"path": "m.onnx"}, "exactly one of 'classes'"),
        ({"classes": ["good"]}, "missing key 'path'"),
        ({"path": "m.onnx", "classes": ["good"], "channels": 2}, "channels must be 1 or 3"),
        ({"path": "m.onnx", "classes": ["good"], "channels": 3, "mean": [1, 2]}, "mean has 2 values"),
        ({"path": "m.onnx", "classes": ["good"], "rgb": "colour"}, "rgb must be one of"),
    ],
)
def test_bad_config_mappings_are_model_errors(mapping, message):
    with pytest.raises(ModelError, match=message):
        ClarityModel.from_mapping(mapping)


@pytest.mark.parametrize("threads", [1, 2])
def test_sessions_use_bounded_threads(threads):
    from qc.clarity.model import import_onnxruntime

    ort = import_onnxruntime()
    loaded = load_clarity_model(threads=threads)
    opts = loaded.session.get_session_options()
    assert opts.intra_op_num_threads == threads
    assert opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ModelError, match="threads must be a positive integer"):
        load_clarity_model(threads=0)


def test_bad_inputs_are_value_errors(shipped):
    with pytest.raises(ValueError, match="uint8 or uint16"):
        evaluate_clarity(np.zeros((128, 128), np.float32), shipped)
    with pytest.raises(ValueError, match="smaller than one 64x64 window"):
        evaluate_clarity(np.zeros((32, 128), np.uint8), shipped)
    with pytest.raises(ValueError, match="weights must give each"):
        evaluate_clarity(np.zeros((128, 128), np.uint8), shipped, weights={"good": 1.0})


def test_weights_are_applied(shipped, data_dir):
    img = blurred(read_crop(data_dir, "mIF"), 6.0)
    default = evaluate_clarity(img, shipped).score
    lenient = evaluate_clarity(img, shipped, weights=dict.fromkeys(CATEGORIES, 1.0)).score
    assert lenient == pytest.approx(100.0) and default < 50


# ---- window sampling -----------------------------------------------------------------------------


def test_window_grid_bounds_a_20k_image():
    g = window_grid(20000, 20000, window=64, max_windows=4096)
    assert g.size <= 4096 and g.shape == (64, 64)
    assert min(g.ys) >= 0 and max(g.ys) + 64 <= 20000
    steps = np.diff(g.ys)
    assert steps.min() >= 312 and steps.max() <= 313
    wide = window_grid(1000, 30000, window=64, max_windows=900)
    assert wide.size <= 900 and wide.shape[1] > 10 * wide.shape[0]


def test_small_images_are_tiled_completely():
    g = window_grid(256, 300, window=64)
    assert g.shape == (4, 4) and g.ys == (0, 64, 128, 192) and g.xs[0] == 22


def test_memmap_tiff_is_sampled_on_the_grid(shipped, data_dir, tmp_path):
    crop = read_crop(data_dir, "DAPI")
    path = tmp_path / "chip.tif"
    mm = tifffile.memmap(path, shape=(3000, 2560), dtype=np.uint16)
    mm[:] = np.tile(crop, (12, 10))[:3000]
    mm.flush()
    del mm
    image = tifffile.memmap(path, mode="r")
    res = evaluate_clarity(image, shipped, max_windows=100, batch_size=7)
    assert res.windows_evaluated == res.grid.size <= 100
    assert res.score is not None and res.score >= 80
