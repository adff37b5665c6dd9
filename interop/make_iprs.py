"""Write the IPRs the cellbin2 check reads (run with the project's venv).

Usage: ``python interop/make_iprs.py OUT_DIR``

Four generated scan sets of chip SS200000135TL_D1 (3000 x 3000 px, 0.5 px per
DNB, grid turned 1.5 degrees), each QC'd with :func:`qc.pipeline.run_qc` and
written with :func:`qc.ipr.write_ipr`:

``pass``   a clean DAPI chip (verdict pass)
``fail``   the same chip without track lines (verdict fail)
``mif``    the DAPI chip plus an IF image shifted by (12, -7) px (DAPI+mIF)
``tiles``  the DAPI chip as a 3 x 3 tile folder with stage jitter

``OUT_DIR/manifest.json`` lists, per case, the IPR, the input images, the
known answers, and ``ours.json``: every value :func:`qc.ipr.read_ipr` reads
back, flattened to ``group/.../name`` paths, for the check to compare with
what cellbin2 reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qc import __version__  # noqa: E402
from qc.io import open_scan_set  # noqa: E402
from qc.ipr import IPRRecord, read_ipr, write_ipr  # noqa: E402
from qc.pipeline import QCSettings, run_qc  # noqa: E402
from qc.stitching import MemoryPairCache  # noqa: E402
from qc.testing.chips import generate_chip, generate_if  # noqa: E402
from qc.testing.tiles import make_tile_set, write_tile_folder  # noqa: E402

CHIP = "SS200000135TL_D1"
GEOM = {"width": 3000, "height": 3000, "scale": (0.5, 0.5), "angle_deg": 1.5}
IF_OFFSET = (12, -7)


def _value(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"array": v.tolist(), "dtype": str(v.dtype), "shape": list(v.shape)}
    if isinstance(v, tuple):
        return {"array": list(v), "dtype": "attribute", "shape": [len(v)]}
    return v


def flatten(record: IPRRecord) -> dict[str, Any]:
    """Every value of an IPR as read, keyed by its HDF5 path (without the leading /)."""
    out: dict[str, Any] = {"IPRVersion": record.ipr_version, "Preview": _value(record.preview)}

    def walk(prefix: str, mapping: Any) -> None:
        for key, v in mapping.items():
            if isinstance(v, dict):
                walk(f"{prefix}/{key}", v)
            else:
                out[f"{prefix}/{key}"] = _value(v)

    walk("ManualState", record.manual_state)
    walk("StereoResepSwitch", record.stereo_resep_switch)
    for name, im in record.images.items():
        parts = {"ImageInfo": im.image_info, "QCInfo": im.qc_info, "Stitch": im.stitch, "Register": im.register,
                 "TissueSeg": im.tissue_seg, "CellSeg": im.cell_seg, "Calibration": im.calibration or {}}  # fmt: skip
        for sub, mapping in parts.items():
            walk(f"{name}/{sub}", mapping)
    return out


def _shared_data() -> Path:
    env = os.environ.get("IMAGEQC_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


def main(out_dir: Path) -> int:
    data = _shared_data()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    dapi = generate_chip(data_dir=data, seed=5, **GEOM)
    nolines = generate_chip(data_dir=data, seed=5, lines=False, **GEOM)
    ifimg = generate_if(dapi.truth, offset_px=IF_OFFSET, data_dir=data)
    tiles = make_tile_set(dapi.image, rows=3, cols=3, tile_size=900, overlap=0.1, jitter_px=3, seed=2)
    cases: dict[str, dict[str, Any]] = {}
    for case in ("pass", "fail", "mif", "tiles"):
        folder = out_dir / case / "input"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.is_file():
                old.unlink()
        inputs = {}
        if case == "tiles":
            write_tile_folder(tiles, folder / CHIP)
        else:
            inputs["DAPI"] = folder / f"{CHIP}.tif"
            tifffile.imwrite(inputs["DAPI"], (nolines if case == "fail" else dapi).image)
        if case == "mif":
            inputs["CD31_IF"] = folder / f"{CHIP}_CD31_IF.tif"
            tifffile.imwrite(inputs["CD31_IF"], ifimg.image)
        with open_scan_set(sorted(folder.iterdir())) as scan:
            report = run_qc(scan, QCSettings(operator="interop@example.org"), MemoryPairCache())
            for old in (out_dir / case).glob("*.ipr"):
                old.unlink()
            ipr = write_ipr(report, scan, out_dir / case)
        ours = out_dir / case / "ours.json"
        ours.write_text(json.dumps(flatten(read_ipr(ipr)), indent=1), encoding="utf-8")
        cases[case] = {
            "ipr": str(ipr), "ours": str(ours), "verdict": report.verdict, "stain": report.stain,
            "inputs": {k: str(v) for k, v in inputs.items()},
            "truth": {"angle_deg": GEOM["angle_deg"], "scale": list(GEOM["scale"]), "if_offset_px": list(IF_OFFSET)},
        }  # fmt: skip
        print(f"{case:6s} {report.stain:9s} {report.verdict:5s} {ipr}")
    manifest = {"chip": CHIP, "imageqc": __version__, "cases": cases}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python interop/make_iprs.py OUT_DIR")
    sys.exit(main(Path(sys.argv[1])))
