"""Grid geometry conventions (qc.track.grid): the contract shared by track detection, the generator and overlays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qc.chip import TEMPLATES
from qc.track import GridModel

SS2 = TEMPLATES["SS2"]


def test_maps_are_inverse():
    g = GridModel(SS2, 7.3, (1.1, 0.9), (123.4, -56.7))
    rng = np.random.default_rng(0)
    u, v = rng.uniform(-5000, 5000, (2, 100))
    xy = g.chip_to_image(u, v)
    back = g.image_to_chip(xy[:, 0], xy[:, 1])
    assert np.allclose(back[:, 0], u) and np.allclose(back[:, 1], v)


def test_origin_scale_and_angle_sign():
    g = GridModel(SS2, 10.0, (2.0, 3.0), (100.0, 200.0))
    assert np.allclose(g.chip_to_image(0, 0), (100.0, 200.0))
    # one DNB along chip x moves sx px along (cos a, sin a): a positive angle goes down-right (y down)
    step = g.chip_to_image(1, 0) - g.chip_to_image(0, 0)
    a = math.radians(10.0)
    assert np.allclose(step, (2.0 * math.cos(a), 2.0 * math.sin(a)))
    assert step[1] > 0
    step = g.chip_to_image(0, 1) - g.chip_to_image(0, 0)
    assert np.allclose(step, (-3.0 * math.sin(a), 3.0 * math.cos(a)))


def test_line_positions_follow_the_template():
    g = GridModel(SS2, 0.0, (1.0, 1.0), (0.0, 0.0))
    k = np.arange(-2, 11)
    assert list(g.line_positions(k)) == [
        2280 - 2940,
        2520 - 2940,
        0,
        240,
        540,
        870,
        1260,
        1650,
        1980,
        2280,
        2520,
        2940,
        3180,
    ]
    assert list(g.line_index_range(500, 1300)) == [2, 3, 4]


def test_canonical_origin_is_the_period_crossing_nearest_the_corner():
    g = GridModel(SS2, -4.0, (0.7, 0.8), (9000.0, 7000.0))
    c = g.canonical()
    assert (c.angle_deg, c.scale) == (g.angle_deg, g.scale)
    # same grid: the new origin is a crossing of two index-0 lines of the old one
    uv = g.image_to_chip(*c.origin_px) / SS2.period
    assert np.allclose(uv, np.round(uv), atol=1e-9)
    # and no other period crossing is nearer (0, 0)
    m, n = np.meshgrid(np.arange(-3, 4), np.arange(-3, 4))
    others = c.chip_to_image(m.ravel() * SS2.period, n.ravel() * SS2.period)
    assert np.hypot(*c.origin_px) <= np.hypot(others[:, 0], others[:, 1]).min() + 1e-9
    assert c.canonical() == c
    assert g.period_shift(c) == tuple(round(t) for t in uv)


def test_grid_lines_are_clipped_segments_on_the_lines():
    g = GridModel(SS2, 3.0, (0.5, 0.5), (40.0, 30.0))
    w, h = 3000, 2000
    lines = g.grid_lines(w, h)
    assert len(lines) == lines.segments.shape[0] == lines.axis.size == lines.index.size
    seg = lines.segments
    assert seg[:, [0, 2]].min() >= -0.5 - 1e-9 and seg[:, [0, 2]].max() <= w - 0.5 + 1e-9
    assert seg[:, [1, 3]].min() >= -0.5 - 1e-9 and seg[:, [1, 3]].max() <= h - 0.5 + 1e-9
    for end in (seg[:, :2], seg[:, 2:]):
        uv = g.image_to_chip(end[:, 0], end[:, 1])
        fam = uv[np.arange(len(uv)), lines.axis]
        assert np.allclose(fam, g.line_positions(lines.index), atol=1e-6)
    # every line family index crossing the image is there, and only those
    for axis in (0, 1):
        assert set(lines.index[lines.axis == axis]) == set(g.lines_in_image(axis, w, h))
    # about 1500 DNB across at 0.5 px/DNB: 3000 px wide shows 6000 DNB, ~2 periods of 9 lines
    assert 17 <= (lines.axis == 0).sum() <= 20


@pytest.mark.parametrize("angle", [-44.0, 0.0, 30.0])
def test_lines_in_image_margin(angle):
    g = GridModel(SS2, angle, (1.0, 1.0), (0.0, 0.0))
    all_lines = g.lines_in_image(0, 4000, 4000)
    inner = g.lines_in_image(0, 4000, 4000, margin=500)
    assert set(inner) <= set(all_lines)
    assert len(g.lines_in_image(0, 100, 100, margin=60)) == 0
