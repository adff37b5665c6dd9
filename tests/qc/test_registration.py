"""Registration primitives: known shifts recovered, quality measures, "no information"."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy.ndimage import fourier_shift

from qc.registration import overlap_ncc, phase_correlate, structure_snr, to_gray_float
from qc.testing.tiles import mosaic_texture
from tests.qc.stitching_helpers import shared_data


@pytest.fixture(scope="module")
def dapi_texture() -> np.ndarray:
    crop = tifffile.imread(next((shared_data() / "stereo_crops" / "DAPI" / "input").glob("*.tif")))
    return mosaic_texture([crop], (700, 700), seed=11).astype(np.float32)


def _shifted(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``img`` with its content moved by (dx, dy) px (periodic, exact for sub-pixel shifts)."""
    return np.fft.ifft2(fourier_shift(np.fft.fft2(img), (dy, dx))).real.astype(np.float32)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("shift", [(0.0, 0.0), (3.3, -5.7), (-12.25, 10.5), (0.5, 0.5), (-30.8, 20.2)])
def test_known_subpixel_shift_is_recovered(dapi_texture, dtype, shift):
    dx, dy = shift
    moved = _shifted(dapi_texture, dx, dy)
    rng = np.random.default_rng(0)
    scale = 250.0 / dapi_texture.max() if dtype == np.uint8 else 1.0

    def prep(a: np.ndarray) -> np.ndarray:
        a = (a * scale + rng.normal(0, 2.0 * scale * 50, a.shape))[60:-60, 60:-60]
        return np.clip(a, 0, None).astype(dtype) if dtype != np.float32 else a.astype(dtype)

    est = phase_correlate(prep(dapi_texture), prep(moved), max_shift=40)
    assert est.dx == pytest.approx(dx, abs=0.15)
    assert est.dy == pytest.approx(dy, abs=0.15)
    assert est.peak_ratio > 10
    assert est.ncc > 0.9
    assert not est.at_search_limit


def test_sign_convention_matches_cropping(dapi_texture):
    """A feature at (x, y) in the reference appears at (x + dx, y + dy) in the moving view."""
    ref = dapi_texture[100:400, 100:400]
    mov = dapi_texture[100 - 7 : 400 - 7, 100 + 12 : 400 + 12]  # content moved by dx=-12, dy=+7
    est = phase_correlate(ref, mov, max_shift=30)
    assert (round(est.dx), round(est.dy)) == (-12, 7)
    assert overlap_ncc(ref, mov, (-12, 7)) == pytest.approx(1.0, abs=1e-6)


def test_shift_beyond_search_range_is_flagged(dapi_texture):
    ref = dapi_texture[100:400, 100:400]
    mov = dapi_texture[100:400, 60:360]  # content moved by dx=+40
    est = phase_correlate(ref, mov, max_shift=20)
    assert est.at_search_limit or est.ncc < 0.5
    wide = phase_correlate(ref, mov, max_shift=50)
    assert round(wide.dx) == 40 and not wide.at_search_limit


def test_rgb_views_are_registered(dapi_texture):
    rgb = np.stack([dapi_texture, dapi_texture * 0.5, dapi_texture * 0.2], axis=2)
    ref, mov = rgb[50:350, 50:350], rgb[45:345, 53:353]
    est = phase_correlate(ref, mov, max_shift=20)
    assert (round(est.dx), round(est.dy)) == (-3, 5)
    assert to_gray_float(rgb).shape == rgb.shape[:2]


def test_structure_snr_separates_texture_noise_and_flat(dapi_texture):
    rng = np.random.default_rng(1)
    noise = rng.normal(1000, 30, (300, 300)).astype(np.uint16)
    assert structure_snr(dapi_texture.astype(np.uint16)) > 3
    assert structure_snr(noise) < 0.3
    assert structure_snr(np.full((100, 100), 7, np.uint8)) == pytest.approx(0.0, abs=1e-3)
    vignetted = 1000 + 0.02 * (np.arange(300)[None, :] - 150) ** 2 + rng.normal(0, 5, (300, 300))
    assert structure_snr(vignetted.astype(np.uint16)) < 0.5  # smooth shading is not structure


def test_noise_gives_no_distinct_peak():
    rng = np.random.default_rng(2)
    est = phase_correlate(rng.normal(0, 1, (256, 256)), rng.normal(0, 1, (256, 256)), max_shift=50)
    assert est.peak_ratio < 1.5
    assert abs(est.ncc) < 0.1


def test_single_line_is_ambiguous_but_agrees():
    """One straight line fixes the offset across it only: no distinct peak, yet a good NCC."""
    rng = np.random.default_rng(3)
    a = np.zeros((400, 200), np.float32)
    b = np.zeros((400, 200), np.float32)
    a[:, 100:103] = 100
    b[:, 105:108] = 100
    est = phase_correlate(a + rng.normal(0, 5, a.shape), b + rng.normal(0, 5, b.shape), max_shift=50)
    assert est.peak_ratio < 2
    assert est.ncc > 0.8
    assert round(est.dx) == 5


def test_overlap_ncc_values(dapi_texture):
    a = dapi_texture[:200, :200]
    assert overlap_ncc(a, a, (0, 0)) == pytest.approx(1.0)
    assert overlap_ncc(a, -a, (0, 0)) == pytest.approx(-1.0)
    assert overlap_ncc(a, np.ones_like(a), (0, 0)) == 0.0
    assert overlap_ncc(a, a, (500, 0)) == 0.0


def test_bad_inputs_explain_themselves():
    with pytest.raises(ValueError, match="same shape"):
        phase_correlate(np.zeros((10, 10)), np.zeros((10, 12)))
    bad = np.zeros((20, 20))
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        phase_correlate(bad, np.zeros((20, 20)))
    with pytest.raises(ValueError, match="too small"):
        phase_correlate(np.zeros((3, 3)), np.zeros((3, 3)))
