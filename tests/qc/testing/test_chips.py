"""The synthetic chip generator (qc.testing.chips): seeded pixels that match their ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
from skimage.registration import phase_cross_correlation

from qc.testing.chips import (
    MAX_IF_OFFSET,
    REAL_LOOKING,
    ChipTruth,
    generate_chip,
    generate_if,
    real_looking,
    shared_data_dir,
    write_chip_tiff,
)
from qc.track import GridModel

SMALL = dict(width=900, height=700)


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = generate_chip(**SMALL, angle_deg=3.0, seed=5)
    b = generate_chip(**SMALL, angle_deg=3.0, seed=5)
    c = generate_chip(**SMALL, angle_deg=3.0, seed=6)
    assert np.array_equal(a.image, b.image)
    assert a.truth == b.truth
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize(
    ("stain", "dtype", "shape", "out_dtype"),
    [
        ("DAPI", "uint8", (700, 900), np.uint8),
        ("DAPI", "uint16", (700, 900), np.uint16),
        ("ssDNA", "uint16", (700, 900), np.uint16),
        ("HE", "uint8", (700, 900, 3), np.uint8),
    ],
)
def test_dtypes_and_shapes(stain, dtype, shape, out_dtype):
    chip = generate_chip(**SMALL, stain=stain, dtype=dtype, tissue_fraction=0.5, seed=1)
    assert chip.image.shape == shape
    assert chip.image.dtype == out_dtype
    top = np.iinfo(out_dtype).max
    # a usable dynamic range, not saturated by default
    assert chip.image.max() > 0.3 * top
    assert np.mean(chip.image == top) < 0.01
    assert chip.truth.dtype == np.dtype(out_dtype).name
    assert chip.truth.stain == stain


def _line_vs_beside(image: np.ndarray, grid: GridModel, offset_px: float) -> tuple[float, float]:
    """Mean intensity on the x-family lines and ``offset_px`` beside them (inside the image)."""
    h, w = image.shape[:2]
    uv_max = grid.image_to_chip(np.array([0, w, 0, w]), np.array([0, 0, h, h]))
    ks = grid.lines_in_image(0, w, h)
    vs = np.linspace(uv_max[:, 1].min(), uv_max[:, 1].max(), 400)
    on, off = [], []
    for k in ks:
        u = grid.line_positions(np.array([k]))[0]
        p = grid.chip_to_image(np.full_like(vs, u), vs)
        q = grid.chip_to_image(np.full_like(vs, u + offset_px / grid.scale[0]), vs)
        for pts, acc in ((p, on), (q, off)):
            x, y = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
            ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            acc.extend(image[y[ok], x[ok]].astype(float))
    return float(np.mean(on)), float(np.mean(off))


def test_track_lines_are_where_the_truth_says():
    params = dict(**SMALL, angle_deg=7.0, scale=0.8, tissue_fraction=0.0, line_contrast=0.5, noise=0.003, seed=2)
    chip = generate_chip(**params)
    on, beside = _line_vs_beside(chip.image, chip.truth.grid, 12.0)
    assert on < 0.7 * beside  # contrast 0.5 at the centre of 2.4 px wide lines
    plain = generate_chip(**{**params, "lines": False})
    on, beside = _line_vs_beside(plain.image, chip.truth.grid, 12.0)
    assert on == pytest.approx(beside, rel=0.1)


def test_truth_origin_is_canonical_and_follows_qc_grid():
    chip = generate_chip(**SMALL, angle_deg=-6.0, scale=(1.2, 1.3), origin_px=(5000.0, -4000.0), seed=3)
    t = chip.truth
    assert isinstance(t, ChipTruth)
    g = t.grid
    assert g.canonical() == g
    # the requested origin and the reported one are the same grid, whole periods apart
    shift = np.array(g.image_to_chip(5000.0, -4000.0)) / g.template.period
    assert np.allclose(shift, np.round(shift), atol=1e-9)
    assert t.scale == (1.2, 1.3)
    assert t.line_width_px == pytest.approx(3.0 * math.sqrt(1.2 * 1.3))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7])
def test_tissue_fraction(fraction):
    chip = generate_chip(**SMALL, tissue_fraction=fraction, seed=4)
    assert chip.truth.tissue_fraction == pytest.approx(fraction, abs=0.04)


def test_tissue_is_brighter_than_chip_surface_in_dapi_and_darker_in_he():
    dapi = [generate_chip(**SMALL, tissue_fraction=f, lines=False, seed=4).image.mean() for f in (0.0, 0.8)]
    he = [generate_chip(**SMALL, stain="HE", tissue_fraction=f, lines=False, seed=4).image.mean() for f in (0.0, 0.8)]
    assert dapi[1] > 1.5 * dapi[0]
    assert he[1] < 0.9 * he[0]


def _laplacian_energy(a: np.ndarray) -> float:
    f = a.astype(float)
    lap = f[1:-1, 1:-1] * 4 - f[:-2, 1:-1] - f[2:, 1:-1] - f[1:-1, :-2] - f[1:-1, 2:]
    return float(np.mean(lap**2))


def test_blur_noise_gain_illumination():
    base = dict(**SMALL, tissue_fraction=0.6, noise=0.0, seed=7)
    sharp = generate_chip(**base).image
    blurred = generate_chip(**base, blur_sigma=3.0).image
    assert _laplacian_energy(blurred) < 0.2 * _laplacian_energy(sharp)
    noisy = generate_chip(**{**base, "noise": 0.05}).image
    assert np.std(noisy.astype(float) - sharp) == pytest.approx(0.05 * 255, rel=0.2)
    bright = generate_chip(**base, gain=8.0).image
    assert np.mean(bright == 255) > 0.05
    empty = {**base, "lines": False, "tissue_fraction": 0.0}
    flat = generate_chip(**empty).image.astype(float)
    uneven = generate_chip(**empty, illumination=1.0).image.astype(float)

    def spread(a: np.ndarray) -> float:
        q = [a[:350, :450].mean(), a[:350, 450:].mean(), a[350:, :450].mean(), a[350:, 450:].mean()]
        return (max(q) - min(q)) / np.mean(q)

    assert spread(uneven) > 0.15 > spread(flat)


def test_real_looking_chip_looks_like_a_real_stitched_scan():
    """The issue #12 description: dark surface, shallow lines, FOV seams, saturated tissue, debris."""
    n, fov = 4000, 2000
    chip = generate_chip(width=n, height=n, seed=8, **real_looking(angle_deg=0.0))
    img = chip.image.astype(float)
    assert chip.truth.background == pytest.approx(10 / 255) and chip.truth.fov_px == fov
    g = chip.truth.grid
    # the surface (outside tissue, away from lines) is about 10 grey levels
    bare = generate_chip(
        width=n, height=n, seed=8, **real_looking(angle_deg=0.0, lines=False, fov_gain=0.0, vignetting=0.0, debris=0)
    )
    surface = bare.image < 40
    assert 7 <= np.median(bare.image[surface]) <= 13
    # tissue is far brighter than the surface and often saturated
    tissue = chip.image > 40
    assert 0.25 < tissue.mean() < 0.5
    assert np.median(chip.image[tissue]) > 5 * np.median(bare.image[surface])
    assert np.mean(chip.image[tissue] == 255) > 0.1
    # lines are a few grey levels darker than the surface next to them
    k = g.lines_in_image(0, n, n)[2]
    x = round(g.chip_to_image(g.line_positions(k), 0.0)[0])
    rows = surface[:, x] & surface[:, x - 8] & surface[:, x + 8]
    depth = np.median(img[rows, x - 8] + img[rows, x + 8]) / 2 - np.median(img[rows, x])
    assert 1.5 <= depth <= 6
    # per-FOV brightness steps: FOV surface medians differ by more than noise
    seams = generate_chip(width=n, height=n, seed=8, **real_looking(lines=False, debris=0, vignetting=0.0))
    med = [
        np.median(seams.image[r : r + fov, c : c + fov][surface[r : r + fov, c : c + fov]])
        for r in (0, fov)
        for c in (0, fov)
    ]
    assert max(med) - min(med) >= 2
    # vignetting darkens FOV corners against FOV centres
    flat = dict(lines=False, debris=0, fov_gain=0.0, tissue_fraction=0.0, noise=0.0)
    v = generate_chip(width=n, height=n, seed=8, **real_looking(**flat)).image.astype(float)
    v0 = generate_chip(width=n, height=n, seed=8, **real_looking(**flat, vignetting=0.0)).image.astype(float)
    ratio = v / np.maximum(v0, 1)
    assert ratio[900:1100, 900:1100].mean() == pytest.approx(1.0, abs=0.03)
    assert ratio[:150, :150].mean() == pytest.approx(0.83, abs=0.04)
    # debris: dark spots where the surface would be
    clean = generate_chip(width=n, height=n, seed=8, **real_looking(angle_deg=0.0, debris=0))
    darker = (clean.image.astype(int) - chip.image.astype(int)) >= 3
    assert darker.mean() > 0.005


def test_real_looking_he_has_lines_lighter_than_the_surface():
    n = 2000
    chip = generate_chip(width=n, height=n, seed=9, **real_looking("HE", angle_deg=0.0, tissue_fraction=0.0, noise=0.0))
    assert chip.image.shape == (n, n, 3) and chip.truth.line_polarity == "bright"
    g = chip.truth.grid
    x = round(g.chip_to_image(g.line_positions(g.lines_in_image(0, n, n)[1]), 0.0)[0])
    grey = chip.image.mean(axis=2)
    assert np.median(grey[:, x]) > np.median(grey[:, x - 8]) + 5


def test_real_looking_overrides_and_bad_values():
    assert real_looking(noise=0.0)["noise"] == 0.0 and REAL_LOOKING["noise"] == 1.5 / 255
    with pytest.raises(ValueError, match="line_polarity"):
        generate_chip(**SMALL, line_polarity="grey")
    with pytest.raises(ValueError, match="fov_gain"):
        generate_chip(**SMALL, fov_px=100, fov_gain=1.5)
    with pytest.raises(ValueError, match="background"):
        generate_chip(**SMALL, background=2.0)


@pytest.mark.parametrize("tile", [(256, 256), None])
def test_write_chip_tiff_matches_generate_chip(tmp_path, tile):
    params = dict(width=1100, height=1030, angle_deg=1.5, tissue_fraction=0.4, seed=9)
    path = tmp_path / "chip.tif"
    truth = write_chip_tiff(path, tile=tile, **params)
    chip = generate_chip(**params)
    assert truth == chip.truth
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert page.shape == (1030, 1100)
        assert page.is_tiled == (tile is not None)
        assert np.array_equal(page.asarray(), chip.image)
    if tile is None:
        mm = tifffile.memmap(path)
        assert np.array_equal(mm, chip.image)


def test_write_rgb_tiff_and_out_memmap(tmp_path):
    params = dict(width=600, height=520, stain="HE", seed=10)
    path = tmp_path / "he.tif"
    write_chip_tiff(path, tile=(128, 128), compression="zlib", **params)
    chip = generate_chip(**params)
    assert np.array_equal(tifffile.imread(path), chip.image)
    out = np.lib.format.open_memmap(tmp_path / "he.npy", mode="w+", dtype=np.uint8, shape=(520, 600, 3))
    filled = generate_chip(out=out, **params)
    assert filled.image is out
    assert np.array_equal(out, chip.image)


def test_if_image_is_the_nuclear_tissue_shifted_by_the_offset():
    ref = generate_chip(width=768, height=640, tissue_fraction=0.8, lines=False, seed=11)
    dx, dy = 13.0, -7.5
    related = generate_if(ref.truth, offset_px=(dx, dy), seed=2)
    assert related.truth.offset_px == (dx, dy)
    assert related.image.shape == ref.image.shape
    # IF(x, y) = nuclear(x - dx, y - dy): registering IF onto the nuclear image needs (-dy, -dx)
    shift, _, _ = phase_cross_correlation(ref.image.astype(float), related.image.astype(float), upsample_factor=10)
    assert shift == pytest.approx([-dy, -dx], abs=0.3)
    # exactly a shift of the same IF content: compare with the unshifted IF
    plain = generate_if(ref.truth, offset_px=(0.0, 0.0), seed=2, noise=0.0, dtype="uint16").image
    moved = generate_if(ref.truth, offset_px=(13.0, -7.0), seed=2, noise=0.0, dtype="uint16").image
    assert np.array_equal(moved[20:-20, 20:-20], plain[27:-13, 7:-33])
    # the same tissue: strongly correlated once aligned; an unrelated IF is not
    unrelated = generate_if(ref.truth, offset_px=(dx, dy), related=False, seed=2)
    assert not unrelated.truth.related

    def aligned_corr(moving: np.ndarray) -> float:
        a = ref.image[20:-20, 20:-20].astype(float)
        b = moving[20 + int(dy) : moving.shape[0] - 20 + int(dy), 20 + int(dx) : moving.shape[1] - 20 + int(dx)]
        b = b.astype(float)
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert aligned_corr(related.image) > 0.3
    assert abs(aligned_corr(unrelated.image)) < 0.15


def test_missing_data_dir_says_where_to_look(tmp_path):
    with pytest.raises(FileNotFoundError, match="IMAGEQC_SHARED_DATA"):
        generate_chip(**SMALL, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="stereo_crops"):
        shared_data_dir(tmp_path)


def test_bad_parameters():
    with pytest.raises(TypeError, match="unknown parameters"):
        generate_chip(**SMALL, colour="red")
    with pytest.raises(ValueError, match="stain"):
        generate_chip(**SMALL, stain="PAS")
    with pytest.raises(ValueError, match="dtype"):
        generate_chip(**SMALL, dtype="float32")
    ref = generate_chip(**SMALL, seed=1).truth
    with pytest.raises(ValueError, match="offset_px"):
        generate_if(ref, offset_px=(MAX_IF_OFFSET + 1, 0))
    he = generate_chip(**SMALL, stain="HE", seed=1).truth
    with pytest.raises(ValueError, match="H&E"):
        generate_if(he)
