#!/usr/bin/env python
"""Benchmark peer: cellbin2 1.2.1's *classical* track-line detector + template matcher.

Run with the separate Python 3.8 venv, NOT the project's interpreter:

    /work/peer-cellbin2-venv/bin/python benchmarks/peer_cellbin2.py IMAGE.tif --fov 2000 [--json]

(venv made with `/root/.pyenv/versions/3.8.18/bin/python -m venv /work/peer-cellbin2-venv`
and `/work/peer-cellbin2-venv/bin/pip install cellbin2==1.2.1`, no pins needed.)
This file imports nothing from imageqc: only numpy and cellbin2 (which brings
tifffile / cv2). No neural weights are loaded and nothing is downloaded.

What it calls (all cellbin2 1.2.1; the script itself is only glue)
------------------------------------------------------------------
cellbin2's own template step is `contrib/template/inference.py::TemplateReference.inference`:
  1. neural track-point detection (YOLO .onnx)   -> NOT used here (needs weights);
  2. `_inference_v2` on those points              -> NOT used here (needs step 1's points);
  3. fallback "line path", only if step 2 failed: `_detect_track_lines` + `_inference_v1`.
This peer runs the line path (3) alone, the same way `_detect_track_lines` /
`_inference_v1` do:

  a. `cellbin2.contrib.template.point_detector.large_split(path, None, h=fov, w=fov,
     overlap=0.0)` reads the image (`cbimread`) and cuts it into the FOV grid
     (`SplitWSI`, edge FOVs are the smaller remainders), and
     `point_detector.image_location(...)` gives the (rows, cols, 2) FOV origins.
  b. `cellbin2.contrib.template.inferencev1.track_line.TrackLineQC(magnification=10,
     scale_range=0.8, channel=-1, chip_template=[SS2, SS2])`, with
     `set_preprocess_func(line_enhance_method.get(stain))` (None for ssDNA/DAPI),
     then `.line_detect({fov: [[y0, y1, x0, x1], None]})` -- per FOV this calls
     `inferencev1.line_detector.TrackLineDetector.generate(fov)` (the per-FOV line
     detector: column/row profiles of 100 px bands, local minima with order=100,
     the modal integer angle of neighbour-band minima, points within 1 deg of it
     grouped into lines and fitted by least squares; RGB is turned grey by
     `f_rgb2gray`), then `.track_match()` -- per FOV
     `inferencev1.template_match.TemplateMatcher.match()` matches the line
     intercepts to the SS2 period (scale search range 1 +- 0.8 px per template unit,
     x/y scales within 10 %, >= 3 matched intercepts per axis) and returns cross
     points [x, y, ind_x, ind_y], x/y scale and rotation; `match_eval()` ranks the
     FOVs and `get_best_match()` takes the best one.
  c. `TemplateReference._inference_v1(best_match)` (called on a TemplateReference
     object built with default params): adds the FOV origin to the best FOV's cross
     points and runs `inferencev1.TemplateReferenceV1`: set_scale / set_rotate /
     set_chipno / set_fov_location / set_qc_points, `first_template_correct`,
     `reference_template(mode='multi')`, then `_get_template_info` ->
     `get_template_eval()` gives `template_recall` and `template_valid_area`.

Glue that replaces the neural step (the only non-cellbin2 logic here):
  * cellbin2 sends the 10 FOVs (`TrackLinesParam.topk`) with the most neural track
    points to the line path; here the line detector runs on every FOV and the top-k
    FOVs are those with the most detected lines (ties: row-major order).
  * cellbin2's QC points (the "detections" the global template is refined against
    and scored on) are the neural points of all FOVs; here they are the
    `TemplateMatcher` cross points of every FOV whose lines matched the template,
    moved to global coordinates -- the same kind of points cellbin2 itself puts into
    `track_points[best_fov]` in `_inference_v1`.

Result mapping (cellbin2's own acceptance rule, inference.py)
-------------------------------------------------------------
  line_score = matched top-k FOVs / top-k FOVs (`TrackLineQC.score`).
  cellbin2 only runs `_inference_v1` when line_score == 1, and then sets
  `trackcross_qc_pass_flag = 1` iff template_recall > 0.1 or
  template_valid_area > 0.1 (`TemplateReferenceV2Param.v2_ssDNA_pass_thr`;
  0.01 for HE).  So:
      found     = line_score == 1 and pass_flag == 1
      score     = max(template_recall, template_valid_area)  (the value thresholded)
      angle_deg = TemplateInfo.rotation, scale = [scale_x, scale_y]
                  (px per SS2 template unit), both null unless found.
  `detail` carries the raw values (also when not found).  With `--no-gate` the
  line_score == 1 condition is dropped (v1 then runs whenever >= 1 top-k FOV matched).

Angle convention: cellbin2's `rotation` is atan of the slope dy/dx of the "horizontal"
track lines in image coordinates (x right, y down), in degrees.  Positive = lines go
down to the right = clockwise on screen, i.e. the same as imageqc's convention
(checked on synthetic images rotated clockwise by +2 deg -> rotation ~ +2), so
angle_deg = rotation unchanged.  Detection is limited to small angles: cellbin2
states "will not work [if] the angle of image is more than 8 degree"; the matcher also
needs scale/cos(angle) within [0.2, 1.8] and every intercept within 15 px of the
template prediction across the FOV.

Output: one JSON line on stdout (with --json; otherwise the same JSON indented):
  {"found", "angle_deg", "scale", "fovs_with_lines", "fovs_total", "score", "seconds",
   "error", "detail"}.  `seconds` is wall time from reading the image to the result.
  cellbin2's log goes to stderr (level WARNING unless --verbose).  Exit code 0 whenever
  the JSON was printed (errors are reported in "error").
"""

import argparse
import json
import math
import sys
import time
import traceback

SS2 = [240, 300, 330, 390, 390, 330, 300, 240, 420]


def _quiet_cellbin2_log(verbose):
    import logging

    from cellbin2.utils import clog

    # clog's StreamHandler writes to stdout; keep stdout for the JSON line only.
    clog.cl.stream_handler.setStream(sys.stderr)
    clog.logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _finite(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run(path, fov, topk=None, stain="ssDNA", gate=True, verbose=False):
    import numpy as np

    _quiet_cellbin2_log(verbose)
    from cellbin2.contrib.param import TrackPointsInfo
    from cellbin2.contrib.template.inference import TemplateReference
    from cellbin2.contrib.template.inferencev1.inference_v1 import TemplateReferenceV1Param
    from cellbin2.contrib.template.inferencev1.track_line import TrackLineQC, TrackLinesParam
    from cellbin2.contrib.template.inferencev2.inference_v2 import TemplateReferenceV2Param
    from cellbin2.contrib.template.point_detector import TrackPointsParam, image_location, large_split
    from cellbin2.image import cbimread
    from cellbin2.image.augmentation import line_enhance_method
    from cellbin2.utils.common import TechType

    out = {
        "found": False,
        "angle_deg": None,
        "scale": None,
        "fovs_with_lines": 0,
        "fovs_total": 0,
        "score": None,
        "seconds": None,
        "error": None,
        "detail": {},
    }
    det = out["detail"]
    t0 = time.perf_counter()
    try:
        stain_type = TechType[stain]
        ref = [list(SS2), list(SS2)]
        lines_cfg = TrackLinesParam()
        v2_cfg = TemplateReferenceV2Param()
        thr = v2_cfg.v2_HE_pass_thr if stain_type == TechType.HE else v2_cfg.v2_ssDNA_pass_thr

        # a. FOV grid, as point_detector.run_detect does it
        img_dict, mosaic = large_split(large_path=path, save_dir=None, h=fov, w=fov, overlap=0.0)
        rows, cols = math.ceil(mosaic.shape[0] / fov), math.ceil(mosaic.shape[1] / fov)
        fov_location = image_location(src_fovs=img_dict, rows=rows, cols=cols)
        out["fovs_total"] = len(img_dict)
        det["image_shape"] = list(mosaic.shape)
        det["grid"] = [rows, cols]

        # b. per-FOV classical line detection + per-FOV template match
        qc = TrackLineQC(magnification=10, scale_range=0.8, channel=lines_cfg.channel, chip_template=ref)
        qc.set_preprocess_func(line_enhance_method.get(stain_type, None))
        qc.buffer = cbimread(mosaic)  # what line_detect(..., buffer=<path>) would read again
        line_fovs = {k: [list(box), None] for k, box in img_dict.items()}  # [y0, y1, x0, x1]
        qc.line_detect(line_fovs, None)
        out["fovs_with_lines"] = len(qc.line_result)
        qc.track_match()  # all FOVs with lines; ranks them (match_eval)
        matched = dict(qc.matching_result) if qc.matching_result else {}
        det["fovs_matched"] = len(matched)

        # top-k FOVs (stand-in for cellbin2's neural ranking): most detected lines
        order = list(img_dict.keys())
        n_lines = {k: len(qc.line_result[k][0]) if k in qc.line_result else 0 for k in order}
        k_use = min(lines_cfg.topk if topk is None else topk, len(order))
        top = sorted(order, key=lambda k: (-n_lines[k], order.index(k)))[:k_use]
        line_score = sum(1 for k in top if k in matched) / float(len(top)) if top else 0.0
        det["topk"] = len(top)
        det["line_score"] = line_score

        best = None  # == TrackLineQC.get_best_match() restricted to the top-k FOVs
        for k, v in qc.matching_result or []:
            if k in top:
                best = [k, v[0], v[1], v[2], v[3]]  # [fov, cross_pts, sx, sy, rot]
                break
        if best is None:
            det["reason"] = "no top-k FOV matched the template"
            return out
        det["best_fov"] = best[0]
        det["fov_rotation"] = _finite(best[4])
        det["fov_scale"] = [_finite(best[2]), _finite(best[3])]
        if gate and line_score != 1:
            det["reason"] = "line_score != 1 (cellbin2 runs inference_v1 only when all top-k FOVs match)"
            return out

        # QC points: matcher cross points of every matched FOV, global coordinates
        track_points = {}
        for k, v in matched.items():
            r, c = map(int, k.split("_"))
            pts = np.asarray(v[0], dtype=float).reshape(-1, 4)
            if len(pts):
                pts[:, :2] += fov_location[r, c]
                track_points[k] = pts

        # c. cellbin2's own _inference_v1 glue
        tr = TemplateReference(
            ref=ref,
            stain_type=stain_type,
            track_points_config=TrackPointsParam(),
            track_lines_config=lines_cfg,
            template_v1_config=TemplateReferenceV1Param(),
            template_v2_config=v2_cfg,
        )
        tr.fov_w = tr.fov_h = fov
        tr.points_info = TrackPointsInfo(
            track_points=track_points, good_fov_count=len(track_points), score=line_score, fov_location=fov_location
        )
        info = tr._inference_v1(best)
        recall = _finite(info.template_recall)
        area = _finite(info.template_valid_area)
        pass_flag = int((recall is not None and recall > thr) or (area is not None and area > thr))
        sc = max([s for s in (recall, area) if s is not None], default=None)
        det.update(
            {
                "rotation": _finite(info.rotation),
                "scale_xy": [_finite(info.scale_x), _finite(info.scale_y)],
                "template_recall": recall,
                "template_valid_area": area,
                "pass_threshold": thr,
                "trackcross_qc_pass_flag": pass_flag,
                "template_points": len(info.template_points),
            }
        )
        out["score"] = sc
        if pass_flag:
            out["found"] = True
            out["angle_deg"] = _finite(info.rotation)
            out["scale"] = [_finite(info.scale_x), _finite(info.scale_y)]
        else:
            det["reason"] = "template_recall and template_valid_area <= threshold"
    except Exception as e:  # report, don't crash the sweep
        out["error"] = f"{type(e).__name__}: {e}"
        if verbose:
            traceback.print_exc(file=sys.stderr)
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image", help="2-D grey (uint8/uint16) or RGB stitched chip image (tif)")
    ap.add_argument("--fov", type=int, default=2000, help="FOV size in px (square grid), default 2000")
    ap.add_argument("--json", action="store_true", help="print exactly one compact JSON line")
    ap.add_argument(
        "--topk",
        type=int,
        default=None,
        help="FOVs sent to the template match gate (default TrackLinesParam.topk = 10)",
    )
    ap.add_argument(
        "--stain",
        default="ssDNA",
        choices=["ssDNA", "DAPI", "HE"],
        help="cellbin2 stain type (HE: he_enhance preprocessing, 0.01 pass threshold)",
    )
    ap.add_argument("--no-gate", action="store_true", help="run inference_v1 even if not all top-k FOVs matched")
    ap.add_argument("--verbose", action="store_true", help="cellbin2 INFO log + tracebacks on stderr")
    a = ap.parse_args(argv)
    res = run(a.image, a.fov, topk=a.topk, stain=a.stain, gate=not a.no_gate, verbose=a.verbose)
    sys.stdout.write(json.dumps(res, separators=(",", ":")) if a.json else json.dumps(res, indent=2))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
