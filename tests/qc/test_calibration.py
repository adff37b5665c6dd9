"""DAPI vs IF calibration: offsets up to 200 px within 1 px, similarity, pass/fail."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from qc.calibration import calibrate, downsample_area
from tests.qc.stitching_helpers import stain_texture

N, PAD = 2048, 210


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A DAPI-like uint16 reference and an IF-like uint8 rendering of the same tissue.

    The IF image has another stain's look: square-root response, extra blur,
    another background level and its own noise.
    """
    tex = stain_texture("DAPI", (N + 2 * PAD, N + 2 * PAD), 41).astype(np.float32)
    rng = np.random.default_rng(4)
    dapi = np.clip(tex + rng.normal(0, 300, tex.shape), 0, 65535).astype(np.uint16)
    ifr = 25 + 190 * np.sqrt(tex / tex.max())
    ifr = cv2.GaussianBlur(ifr.astype(np.float32), (0, 0), 1.3) + rng.normal(0, 5, tex.shape)
    return dapi, np.clip(ifr, 0, 255).astype(np.uint8)


def _pair(scene, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference crop and the IF crop whose content sits at reference + (dx, dy)."""
    dapi, ifr = scene
    ref = dapi[PAD : PAD + N, PAD : PAD + N]
    mov = ifr[PAD - dy : PAD - dy + N, PAD - dx : PAD - dx + N]
    return ref, mov


@pytest.mark.parametrize(
    "offset",
    [(0, 0), (7, -3), (-19, 12), (200, 0), (0, -200), (-200, 200), (200, -200), (143, 61), (-87, -166)],
)
def test_offsets_up_to_200px_recovered_within_1px(scene, offset):
    ref, mov = _pair(scene, *offset)
    res = calibrate(ref, mov, reference_name="SS200000135TL_D1", moving_name="SS200000135TL_D1_CD31_IF")
    assert res.offset_px[0] == pytest.approx(offset[0], abs=1.0)
    assert res.offset_px[1] == pytest.approx(offset[1], abs=1.0)
    assert res.similarity > 0.3
    assert res.windows_used >= 1  # refined at full resolution
    assert res.passed == (np.hypot(*offset) <= 20)
    assert res.reference == "SS200000135TL_D1"


def test_pass_threshold_is_offset_length_20px(scene):
    near = calibrate(*_pair(scene, 12, 16))  # length exactly 20
    far = calibrate(*_pair(scene, 15, 16))
    assert near.offset_length_px == pytest.approx(20.0, abs=0.5) and near.similarity >= 0.01
    assert far.offset_length_px > 21 and not far.passed
    assert calibrate(*_pair(scene, 3, -4)).passed


def test_unrelated_image_falls_below_similarity_threshold(scene):
    ref, _ = _pair(scene, 0, 0)
    other = stain_texture("mIF", (N, N), 42)
    res = calibrate(ref, other)
    assert res.similarity < 0.01
    assert not res.passed
    noise = np.random.default_rng(5).normal(100, 10, (N, N)).astype(np.float32)
    assert calibrate(ref, noise).similarity < 0.01


def test_memmap_inputs_and_coarser_views(scene, tmp_path):
    ref, mov = _pair(scene, -57, 33)
    mm_ref = np.lib.format.open_memmap(tmp_path / "dapi.npy", mode="w+", dtype=ref.dtype, shape=ref.shape)
    mm_ref[:] = ref
    mm_mov = np.lib.format.open_memmap(tmp_path / "if.npy", mode="w+", dtype=mov.dtype, shape=mov.shape)
    mm_mov[:] = mov
    res = calibrate(mm_ref, mm_mov, downsample=4, window_px=512)
    assert res.downsample == 4
    assert res.offset_px == pytest.approx((-57, 33), abs=1.0)
    assert res.coarse_offset_px == pytest.approx((-57, 33), abs=4.0)
    summary = res.summary()
    assert set(summary) == {"reference", "offset_px", "similarity", "passed"}


def test_different_image_sizes_use_the_common_extent(scene):
    ref, mov = _pair(scene, 9, -14)
    res = calibrate(ref, mov[:1900, :2000])
    assert res.offset_px == pytest.approx((9, -14), abs=1.0) and res.passed


def test_downsample_area_matches_block_mean():
    a = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
    d = downsample_area(a, 4, band_rows=8)
    assert d.shape == (10, 15) and d.dtype == np.float32
    assert np.allclose(d, a.reshape(10, 4, 15, 4).mean(axis=(1, 3)), atol=0.5)  # integer: rounded
    f = downsample_area(a.astype(np.float64), 4, band_rows=8)
    assert np.allclose(f, a.reshape(10, 4, 15, 4).mean(axis=(1, 3)), atol=1e-4)


def test_bad_inputs_explain_themselves():
    with pytest.raises(ValueError, match="single-channel"):
        calibrate(np.zeros((100, 100, 3)), np.zeros((100, 100)))
    with pytest.raises(ValueError, match="too small"):
        calibrate(np.zeros((30, 30)), np.zeros((30, 30)))


def test_the_reference_is_reduced_once_for_several_if_images(scene):
    ref, mov = _pair(scene, 7, -3)
    _, mov2 = _pair(scene, -19, 12)
    views: dict = {}
    first = calibrate(ref, mov, reference_views=views)
    second = calibrate(ref, mov2, reference_views=views)
    assert len(views) == 1  # one reduced view served both
    for cached, plain in ((first, calibrate(ref, mov)), (second, calibrate(ref, mov2))):  # and changes no result
        assert cached.offset_px == pytest.approx(plain.offset_px, abs=1e-9)
        assert cached.similarity == pytest.approx(plain.similarity, abs=1e-9)
        assert cached.peak_ratio == pytest.approx(plain.peak_ratio, rel=1e-9)
