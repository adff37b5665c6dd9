"""Read imageqc's IPRs with cellbin2 1.2.1 and compare every value (run with the cellbin2 venv, Python 3.8).

Usage: ``python interop/check_cellbin2.py OUT_DIR [--quiet]``

``OUT_DIR`` is what ``interop/make_iprs.py`` wrote. For each case this:

1. reads the IPR with ``cellbin2.utils.ipr.read`` (the reader cellbin2's
   pipeline uses: ``ImageProcessRecord`` plus one ``ImageChannel`` or
   ``IFChannel`` per group) and compares every value it holds with the value
   imageqc's own reader got (``ours.json``). Status per value:

   ``same``     equal (arrays: same shape and values)
   ``cast``     cellbin2 converted it to the type of its default (e.g. an int
                placeholder default makes it truncate a float score); equal after
                that conversion. Reported, not a failure: cellbin2 does the same
                to its own files
   ``default``  cellbin2 has the attribute but the file does not: its default
   ``MISMATCH`` different
   ``MISSING``  in the file, absent from cellbin2's objects
2. regenerates the template from ``Register/Rotation, ScaleX, ScaleY`` and one
   ``Stitch/TemplatePoint`` with cellbin2's own template inference
   (``TemplateReferenceV1._point_inference``, chip template from cellbin2's
   ``StereoChip``) and checks it equals ``TemplatePoint`` (angle sign, scale
   unit, index convention);
3. for DAPI+mIF, runs cellbin2's calibration (``multi_channel_align``) on the
   same DAPI and IF images and checks its offset and pass flag agree with
   ``Calibration/Scope`` (sign convention).

Prints a table and a summary; exits 1 on any MISMATCH, MISSING or failed check.
"""

import json
import math
import os
import sys

import numpy as np

QUIET = "--quiet" in sys.argv


def flatten_obj(obj, prefix, out):
    """cellbin2's objects -> {path: value}."""
    for key, value in vars(obj).items():
        path = f"{prefix}/{key}" if prefix else key
        if hasattr(value, "__dict__") and not isinstance(value, (np.ndarray, np.generic)):
            flatten_obj(value, path, out)
        else:
            out[path] = value
    return out


def as_plain(value):
    """A JSON-comparable form: arrays as (dtype kind, shape, list)."""
    if isinstance(value, np.ndarray):
        return ("array", list(value.shape), value.tolist())
    if isinstance(value, (list, tuple)):
        return ("array", [len(value)], list(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def ours_plain(value):
    if isinstance(value, dict) and "array" in value:
        return ("array", value["shape"], value["array"])
    return value


def equal(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple):
        return list(a[1]) == list(b[1]) and np.array_equal(
            np.asarray(a[2], dtype=object), np.asarray(b[2], dtype=object)
        )
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return (type(a) is type(b) and a == b) or (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and a == b
        and type(a) is type(b)
    )


def short(v):
    if isinstance(v, tuple):
        flat = np.asarray(v[2], dtype=object).ravel().tolist()
        head = ", ".join(str(round(x, 3) if isinstance(x, float) else x) for x in flat[:4])
        return "array{} [{}{}]".format(tuple(v[1]), head, ", ..." if len(flat) > 4 else "")
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def compare_values(case, ipr_path, ours_path, chip_name):
    from cellbin2.utils import ipr as cb_ipr

    ipr_obj, images = cb_ipr.read(ipr_path)
    theirs = flatten_obj(ipr_obj, "", {})
    for group, channel in images.items():
        flatten_obj(channel, group, theirs)
    with open(ours_path, encoding="utf-8") as fh:
        ours = json.load(fh)
    rows, counts = [], {"same": 0, "cast": 0, "default": 0, "MISMATCH": 0, "MISSING": 0}
    for path in sorted(set(ours) | set(theirs)):
        mine = ours_plain(ours[path]) if path in ours else None
        got = as_plain(theirs[path]) if path in theirs else None
        if path not in theirs:
            status = "MISSING"
        elif path not in ours:
            status = "default"
        elif equal(mine, got):
            status = "same"
        elif (
            isinstance(got, (int, float))
            and isinstance(mine, (int, float))
            and not isinstance(got, bool)
            and type(got)(mine) == got
        ):
            status = "cast"
        else:
            status = "MISMATCH"
        counts[status] += 1
        rows.append((path, short(mine) if path in ours else "", short(got) if path in theirs else "", status))
    kinds = {g: type(c).__name__ for g, c in images.items()}
    for g, kind in kinds.items():
        want = "IFChannel" if g.endswith("_IF") else "ImageChannel"
        if kind != want:
            rows.append((g, want, kind, "MISMATCH"))
            counts["MISMATCH"] += 1
    return rows, counts, images


def check_template(images, chip_name):
    """cellbin2 regenerates the template from our Rotation/Scale and one point: it must equal TemplatePoint."""
    import cellbin2
    from cellbin2.contrib.template.inferencev1.inference_v1 import TemplateReferenceV1, TemplateReferenceV1Param
    from cellbin2.utils.stereo_chip import StereoChip

    mask = os.path.join(os.path.dirname(cellbin2.__file__), "config", "chip_mask.json.enc")
    chip = StereoChip(mask)
    chip.parse_info(chip_name, print_flag=False)
    results = []
    for group, ch in images.items():
        tp = np.asarray(ch.Stitch.TemplatePoint, float).reshape(-1, 4)
        if not len(tp):
            continue
        scope = ch.Stitch.ScopeStitch
        tr = TemplateReferenceV1(cfg=TemplateReferenceV1Param())
        tr.set_scale(ch.Register.ScaleX, ch.Register.ScaleY)
        tr.set_rotate(ch.Register.Rotation)
        tr.set_chipno(chip.fov_template)
        tr._point_inference(tuple(tp[len(tp) // 2]), (scope.GlobalHeight, scope.GlobalWidth))
        tr.mosaic_width, tr.mosaic_height = scope.GlobalWidth, scope.GlobalHeight
        tr._outline_template()
        theirs = np.asarray(tr.template, float).reshape(-1, 4)
        d = np.hypot(tp[:, None, 0] - theirs[None, :, 0], tp[:, None, 1] - theirs[None, :, 1])
        k = d.argmin(axis=1)
        dist = float(d[np.arange(len(tp)), k].max())
        same_index = bool(np.all(theirs[k, 2:] == tp[:, 2:]))
        ok = len(theirs) == len(tp) and dist < 0.01 and same_index
        results.append(
            (
                f"{group} template",
                f"{len(tp)} points",
                "{} points, max dist {:.2g} px, indices {}".format(
                    len(theirs), dist, "same" if same_index else "DIFFER"
                ),
                "same" if ok else "MISMATCH",
            )
        )
    return results


def check_calibration(images, inputs):
    from cellbin2.contrib.calibration import CalibrationParam, multi_channel_align

    results = []
    for group, ch in images.items():
        if not hasattr(ch, "Calibration") or group not in inputs:
            continue
        info = multi_channel_align(CalibrationParam(), fixed_image=inputs["DAPI"], moving_image=inputs[group])
        ox, oy = float(info.offset[0]), float(info.offset[1])
        ours = (ch.Calibration.Scope.OffsetX, ch.Calibration.Scope.OffsetY)
        ok = (
            abs(ox - ours[0]) <= 1.0
            and abs(oy - ours[1]) <= 1.0
            and info.pass_flag == ch.Calibration.CalibrationQCPassFlag
        )
        results.append(
            (
                f"{group} calibration",
                f"offset ({ours[0]:.2f}, {ours[1]:.2f}) flag {ch.Calibration.CalibrationQCPassFlag}",
                f"offset ({ox:.0f}, {oy:.0f}) flag {info.pass_flag} score {info.score:.3f}",
                "same" if ok else "MISMATCH",
            )
        )
    return results


def main(out_dir):
    import cellbin2

    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    print(
        "cellbin2 {} (Python {}) reading imageqc {} IPRs in {}".format(
            getattr(cellbin2, "__version__", "?"), sys.version.split()[0], manifest["imageqc"], out_dir
        )
    )
    failed = 0
    for case, spec in manifest["cases"].items():
        rows, counts, images = compare_values(case, spec["ipr"], spec["ours"], manifest["chip"])
        checks = check_template(images, manifest["chip"]) + check_calibration(images, spec["inputs"])
        bad = counts["MISMATCH"] + counts["MISSING"] + sum(1 for r in checks if r[3] != "same")
        failed += bad
        print(
            "\n== {} ({}, verdict {}): {}".format(case, spec["stain"], spec["verdict"], os.path.basename(spec["ipr"]))
        )
        print("{:58s} {:34s} {:34s} {}".format("path", "imageqc", "cellbin2", "status"))
        for path, mine, got, status in rows + checks:
            if QUIET and status in ("same", "default"):
                continue
            print(f"{path:58s} {mine:34s} {got:34s} {status}")
        print(
            "-- {}: {} same, {} cast, {} cellbin2 defaults, {} MISMATCH, {} MISSING; {} of {} convention checks agree".format(
                case,
                counts["same"],
                counts["cast"],
                counts["default"],
                counts["MISMATCH"],
                counts["MISSING"],
                sum(1 for r in checks if r[3] == "same"),
                len(checks),
            )
        )
    print("\nRESULT: {}".format("all values agree" if not failed else f"{failed} disagreement(s)"))
    return 1 if failed else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit("usage: python interop/check_cellbin2.py OUT_DIR [--quiet]")
    sys.exit(main(args[0]))
