"""The pictures stand on their own (issue #15, item 4): verdict header, legend, full-resolution insets, summary sheet.

Small generated chips run through the real pipeline; the checks sample the
written pixels rather than trusting the drawing code's own bookkeeping.
"""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import tifffile

from qc.io import open_scan_set
from qc.pictures import SUMMARY_WIDTH, Picture, draw_summary
from qc.pictures import draw as P
from qc.pictures.parts import STRIPE_PX, VERDICT_COLOURS, judgement
from qc.pipeline import QCSettings, run_qc, write_run_outputs
from qc.stitching import MemoryPairCache
from qc.testing.chips import generate_chip, generate_if
from qc.testing.tiles import make_tile_set, write_tile_folder

CHIP = "SS200000135TL_D1"
GEOM = {"width": 1500, "height": 1500, "scale": (0.5, 0.5), "angle_deg": 1.5}
#: Every colour the pictures module draws with (saturated, so a grey image never has it by chance).
PALETTE = {
    P.GREEN,
    P.RED,
    P.AMBER,
    P.LINE_C,
    P.ORIGIN_C,
    P.INSET_C,
    P.MEASURED_C,
    P.DAPI_C,
    P.IF_C,
    P.LIMIT_C,
    P.OFFSET_C,
    P.CROP_C,
    *(c for c in P.CLARITY_COLOURS.values() if c),
    *VERDICT_COLOURS.values(),
} - {P.GREY, VERDICT_COLOURS["n/a"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    """QC reports (with their artifacts and images) of a passing and a failing DAPI+mIF set and of a tile set."""
    root = tmp_path_factory.mktemp("pictures")
    dapi = generate_chip(data_dir=shared_data, seed=5, **GEOM)
    blurred = generate_chip(data_dir=shared_data, seed=5, lines=False, blur_sigma=4.0, **GEOM)
    sets = {"pass": root / "pass", "fail": root / "fail", "tiles": root / "tiles"}
    for d in sets.values():
        d.mkdir()
    tifffile.imwrite(sets["pass"] / f"{CHIP}.tif", dapi.image)
    tifffile.imwrite(
        sets["pass"] / f"{CHIP}_CD31_IF.tif", generate_if(dapi.truth, offset_px=(12, -7), data_dir=shared_data).image
    )
    tifffile.imwrite(sets["fail"] / f"{CHIP}.tif", blurred.image)
    tifffile.imwrite(
        sets["fail"] / f"{CHIP}_CD31_IF.tif", generate_if(dapi.truth, offset_px=(30, 18), data_dir=shared_data).image
    )
    write_tile_folder(
        make_tile_set(dapi.image, rows=2, cols=2, tile_size=700, overlap=0.1, jitter_px=3, seed=2), sets["tiles"] / CHIP
    )
    out = {}
    for key, folder in sets.items():
        with open_scan_set(sorted(folder.iterdir())) as scan:
            report = run_qc(scan, QCSettings(), MemoryPairCache())
            written = write_run_outputs(report, root / "out" / key, archive=False)
            planes = {img.name: np.array(img.plane(0)) for img in scan.images if img.tiles is None}
        out[key] = SimpleNamespace(report=report, out=written, planes=planes)
    assert out["pass"].report.verdict == "pass", out["pass"].report.reasons
    assert out["fail"].report.verdict == "fail"
    return out


def _pictures(report) -> dict[str, Picture]:
    """Every per-image picture of a run, drawn again as objects (what pictures_from_artifacts writes)."""
    art = report.artifacts
    checks, thumbs, ctx = art["checks"], art["thumbs"], {"chip": art["chip"], "stain": art["stain"]}
    pics = {}
    for name, res in art["track"].items():
        pics[f"{name} track"] = P.draw_track(
            *thumbs[name], res, title=name, check=checks[("track", name)], insets=art["track_insets"][name], **ctx
        )
    for name, res in art["clarity"].items():
        pics[f"{name} clarity"] = P.draw_clarity(
            *thumbs[name], res, art["clarity_labels"], title=name, check=checks[("clarity", name)], **ctx
        )
    for name, res in art["stitching"].items():
        pics[f"{name} stitching"] = P.draw_stitching(
            *thumbs[name], res, art["tile_sizes"][name], title=name, check=checks[("stitching", name)], **ctx
        )
    for name, res in art["calibration"].items():
        nt, f = thumbs[art["nuclear"]]
        pics[f"{name} calibration"] = P.draw_calibration(
            nt,
            thumbs[name][0],
            f,
            res,
            title=name,
            crops=art["calibration_crops"][name],
            check=checks[("calibration", name)],
            **ctx,
        )
    pics["summary"] = draw_summary(report)
    return pics


def _keys(image: np.ndarray) -> np.ndarray:
    b, g, r = (image[..., k].astype(np.int32) for k in range(3))
    return (b << 16) | (g << 8) | r


def _key(colour: tuple[int, int, int]) -> int:
    return (colour[0] << 16) | (colour[1] << 8) | colour[2]


def _stripe(image: np.ndarray) -> tuple[int, int, int]:
    """The one colour of the stripe across the top of the header band."""
    colours = {tuple(int(v) for v in px) for px in image[:STRIPE_PX].reshape(-1, 3)}
    assert len(colours) == 1, colours
    return colours.pop()


def test_the_header_band_is_green_for_a_pass_and_red_for_a_fail(runs):
    for key, word in (("pass", "pass"), ("fail", "fail")):
        folder = runs[key].out.folder / "pictures"
        for name in (f"{CHIP}_track.png", f"{CHIP}_summary.png", f"{CHIP}_CD31_IF_calibration.png"):
            image = cv2.imread(str(folder / name))
            assert _stripe(image) == VERDICT_COLOURS[word], (key, name)
            # the verdict box below the stripe, at the band's left, is the same colour
            box = image[STRIPE_PX + 2 : STRIPE_PX + 12, 2:12].reshape(-1, 3)
            assert {tuple(int(v) for v in px) for px in box} == {VERDICT_COLOURS[word]}, (key, name)


def test_an_advisory_is_amber_never_fail(runs):
    """Clarity below its threshold is advisory: its picture and the summary's row say so, as the CLI does."""
    rep = runs["fail"].report
    (chk,) = [c for c in rep.checks if c["metric"] == "clarity"]
    assert not chk["passed"] and not chk["required"]
    clarity = cv2.imread(str(runs["fail"].out.folder / "pictures" / f"{CHIP}_clarity.png"))
    assert _stripe(clarity) == VERDICT_COLOURS["advisory"]
    assert judgement(False, False) == "advisory" and judgement(False, True) == "fail"
    sheet = _pictures(rep)["summary"]
    assert VERDICT_COLOURS["advisory"] in sheet.legend and VERDICT_COLOURS["fail"] in sheet.legend


def test_every_colour_drawn_is_named_in_the_legend(runs):
    for key, run in runs.items():
        for what, pic in _pictures(run.report).items():
            image = pic.image
            legend_band = image[pic.legend_rows[0] : pic.legend_rows[1]]
            body = image[pic.header_rows[1] : pic.legend_rows[0]]
            for colour, meaning in pic.legend.items():
                assert meaning, (key, what, colour)
                swatch = int((_keys(legend_band) == _key(colour)).sum())
                assert swatch >= 26 * 18, (
                    f"{key} {what}: the swatch of {colour} ({meaning}) is missing from the legend band"
                )
            # sampled: any palette colour found in the picture's body is one the legend names
            keys, counts = np.unique(_keys(body), return_counts=True)
            seen = dict(zip(keys.tolist(), counts.tolist(), strict=False))
            # (the calibration overlays are themselves (IF, DAPI, IF) colours: those cannot be told from drawing)
            palette = {c for c in PALETTE if c[0] != c[2]} if what.endswith("calibration") else PALETTE
            found = {c for c in palette if seen.get(_key(c), 0) >= 3}
            unnamed = found - set(pic.legend)
            assert not unnamed, f"{key} {what}: drawn but not in the legend: {unnamed}"
            assert pic.legend, (key, what)


def test_the_summary_sheet_is_written_about_1600_px_wide_and_is_what_a_notification_attaches(runs):
    from daemon.notify import summary_picture

    for run in runs.values():
        sheet = run.out.folder / "pictures" / f"{CHIP}_summary.png"
        assert run.out.pictures[0] == sheet
        image = cv2.imread(str(sheet))
        assert image.shape[1] == SUMMARY_WIDTH == 1600 and 600 < image.shape[0] < 4000
        assert summary_picture(str(run.out.folder), run.report.as_dict()) == sheet


def test_the_track_insets_are_full_resolution_crops_shown_1_to_1(runs):
    run = runs["pass"]
    art = run.report.artifacts
    insets = art["track_insets"][CHIP]
    assert [i["where"] for i in insets] == ["top left", "top right", "bottom left", "bottom right"]
    plane = run.planes[CHIP]
    for ins in insets:
        x0, y0 = ins["x0"], ins["y0"]
        assert ins["pixels"].shape == (P.INSET_PX, P.INSET_PX)
        assert np.array_equal(ins["pixels"], plane[y0 : y0 + P.INSET_PX, x0 : x0 + P.INSET_PX])
        assert ins["measured"] and abs(ins["crossing"][0] - (x0 + P.INSET_PX / 2)) <= 1
    pic = _pictures(run.report)[f"{CHIP} track"]
    assert len(pic.insets) == 4
    for (x, y, w, h), ins in zip(pic.insets, insets, strict=False):
        assert (w, h) == (P.INSET_PX, P.INSET_PX)
        shown, crop = pic.image[y : y + h, x : x + w], P.to_display(ins["pixels"])
        # pixel for pixel, except the small ring around the measured crossing at the centre
        assert np.array_equal(shown[:60], crop[:60]) and np.array_equal(shown[-60:], crop[-60:])
        assert np.mean(np.any(shown != crop, axis=-1)) < 0.05
    # different parts of the chip: one crossing per quadrant
    w, h = plane.shape[1], plane.shape[0]
    quads = {(i["crossing"][0] >= w / 2, i["crossing"][1] >= h / 2) for i in insets}
    assert len(quads) == 4


def test_without_a_grid_the_insets_still_show_each_quadrant_at_full_resolution(runs):
    """A failed track fit: four full-resolution crops, one per quadrant, with nothing claimed as a crossing."""
    run = runs["fail"]
    assert not run.report.artifacts["track"][CHIP].found
    insets = run.report.artifacts["track_insets"][CHIP]
    plane = run.planes[CHIP]
    w, h = plane.shape[1], plane.shape[0]
    quads = set()
    for ins in insets:
        x0, y0 = ins["x0"], ins["y0"]
        assert ins["crossing"] is None and not ins["measured"]
        assert np.array_equal(ins["pixels"], plane[y0 : y0 + P.INSET_PX, x0 : x0 + P.INSET_PX])
        quads.add((x0 + P.INSET_PX / 2 >= w / 2, y0 + P.INSET_PX / 2 >= h / 2))
    assert len(quads) == 4
    pic = _pictures(run.report)[f"{CHIP} track"]
    assert [(bw, bh) for _, _, bw, bh in pic.insets] == [(P.INSET_PX, P.INSET_PX)] * 4
    assert P.LINE_C not in pic.legend and P.MEASURED_C not in pic.legend  # no grid drawn, nothing claimed


def test_the_calibration_crops_are_full_resolution_and_undo_the_offset(runs):
    run = runs["pass"]
    crops = run.report.artifacts["calibration_crops"][f"{CHIP}_CD31_IF"]
    s, x0, y0 = crops["size"], crops["x0"], crops["y0"]
    assert s == P.CALIBRATION_CROP_PX
    ref, moving = run.planes[CHIP], run.planes[f"{CHIP}_CD31_IF"]
    assert np.array_equal(crops["reference"], ref[y0 : y0 + s, x0 : x0 + s])
    assert np.array_equal(crops["before"], moving[y0 : y0 + s, x0 : x0 + s])
    assert np.array_equal(crops["after"], moving[y0 - 7 : y0 - 7 + s, x0 + 12 : x0 + 12 + s])

    def ncc(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.astype(float) - a.mean(), b.astype(float) - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    # the crop has features, and after undoing the offset the IF lines up with the DAPI much better
    assert (
        crops["reference"].std() > 5
        and ncc(crops["reference"], crops["after"]) > ncc(crops["reference"], crops["before"]) + 0.2
    )


def test_stitching_colours_agree_with_the_score(runs):
    """Green outlines are exactly the FOVs counted as clear and consistent; the header gives the share against 30 %."""
    run = runs["tiles"]
    res = run.report.artifacts["stitching"][CHIP]
    pic = _pictures(run.report)[f"{CHIP} stitching"]
    clear = sum(f.clear_consistent for f in res.fovs)
    assert (P.GREEN in pic.legend) == (clear > 0)
    assert (P.RED in pic.legend) == bool(res.outliers)
    assert _stripe(pic.image) == VERDICT_COLOURS["pass" if res.passed else "advisory"]
