"""``imageqc qc PATH...``: QC once, by hand, on files or folders named as the service expects.

Exit codes: 0 pass, 3 fail, 1 error (QC could not run), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_QC_FAIL, EXIT_USAGE
from daemon.snapshot import deepest_root, norm

__all__ = ["EXIT_QC_FAIL", "add_qc_command", "cmd_qc"]


def add_qc_command(sub: Any) -> None:
    sp = sub.add_parser(
        "qc",
        help="Run QC once on files or folders (<chip>.tif, <chip>_<IF>_IF.tif, tile folders, a QC .tar.gz).",
        description="Run QC once on the images of one chip and print the verdict. "
        "Exit codes: 0 pass, 3 fail, 1 error, 2 usage.",
    )
    sp.add_argument("paths", nargs="+", metavar="PATH", help="image files or tile folders of one chip")
    sp.add_argument(
        "--stain",
        choices=["auto", "DAPI", "ssDNA", "HE"],
        default=None,
        help="stain of the nuclear image (default: the watch root's setting when the files lie under one, else auto)",
    )
    sp.add_argument("--chip", metavar="SN", help="chip serial, when the file names do not carry it")
    sp.add_argument(
        "--tile-overlap",
        metavar="X[,Y]",
        type=_overlap_arg,
        default=None,
        help="fractional tile overlap for tile folders whose files give no positions or overlap, e.g. 0.26,0.1 "
        "(default: the watch root's tile_overlap when the files lie under one, else 0.1)",
    )
    sp.add_argument(
        "--tile-pattern",
        metavar="REGEX",
        default=None,
        help="regex with groups (?P<row>...) and (?P<col>...), or (?P<index>...) (row-major), for tile names no "
        "built-in convention or TileConfiguration.txt knows "
        "(default: the watch root's tile_pattern)",
    )
    sp.add_argument("--json", action="store_true", help="print the QC report (imageqc.report/1) as JSON")
    sp.add_argument(
        "--out",
        metavar="DIR",
        help="write the report, pictures, SAW's IPR and the archive SAW takes (saw count --image-tar) here; "
        "members of an input archive that do not fit in memory are unpacked here, in a hidden folder removed after "
        "reading (default: the system's temporary folder)",
    )
    sp.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --out, also write the stitched image of each tile set there as <group>_fov_stitched.tif "
        "(a tiled, pyramidal OME-TIFF at the registered positions, as imageqc fuse writes it) "
        "(default: the config's output.fused_image)",
    )
    sp.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="config file for thresholds and model (default: $IMAGEQC_CONFIG, else built in)",
    )
    sp.add_argument(
        "--no-cache",
        action="store_true",
        help="compute every FOV pair of a tile set; by default pairs come from and go to the service's pair cache "
        "in the config's state folder, so a re-run computes no pair twice",
    )
    sp.set_defaults(func=cmd_qc)


def _overlap_arg(text: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 <= v <= 0.9 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or two fractions between 0 and 0.9, e.g. 0.1 or 0.26,0.1")
    return (values[0], values[-1])


def _watch_root_of(cfg: Any, paths: list[Path]) -> Any:
    """The configured watch root holding the first path, if any: the deepest, as discovery picks it."""
    roots = {norm(w.path): w for w in reversed(cfg.watch)}  # the first of equal roots wins
    root = deepest_root(norm(paths[0]), roots)
    return None if root is None else roots[root]


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        transient=True,
    )
    task = bar.add_task("read", total=100)

    def update(stage: str, pct: float) -> None:
        bar.update(task, description=stage, completed=pct)

    return bar, update


def cmd_qc(args: argparse.Namespace) -> int:
    import os

    from daemon.config import load_config, tile_pattern_problem
    from daemon.qcsettings import no_huge_page_stalls, qc_settings
    from qc.errors import QCError
    from qc.io import open_scan_set
    from qc.pipeline import run_qc, write_run_outputs

    no_huge_page_stalls()  # as in the service's QC worker
    cfg = load_config(args.config or os.environ.get("IMAGEQC_CONFIG") or None)
    paths = [Path(p) for p in args.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"imageqc qc: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if args.fused and not args.out:
        print("imageqc qc: --fused writes into the output folder; give --out DIR too", file=sys.stderr)
        return EXIT_USAGE
    watch = _watch_root_of(cfg, paths)
    problem = tile_pattern_problem(args.tile_pattern) if args.tile_pattern else None  # a root's was checked at load
    if problem:
        print(f"imageqc qc: --tile-pattern {args.tile_pattern!r}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    pattern = (args.tile_pattern if args.tile_pattern is not None else (watch.tile_pattern if watch else "")) or None
    overlap = args.tile_overlap or (watch.tile_overlap_xy if watch else None)
    stain = args.stain or (watch.stain if watch else "auto")
    settings = qc_settings(cfg, stain=stain)
    bar, update = _progress_bar(sys.stderr.isatty() and not args.json)
    cache, store = (None, None) if args.no_cache else _pair_cache(cfg)
    try:
        with open_scan_set(
            paths,
            chip=args.chip,
            limits=settings.limits,
            tile_pattern=pattern,
            tile_overlap=overlap,
            scratch_dir=args.out,
        ) as scan:
            if bar is not None:
                with bar:
                    report = run_qc(scan, settings, cache, progress=update)
            else:
                report = run_qc(scan, settings, cache)
            out = None
            if args.out:
                # a person reads the verdict while the IPR, a fused image and the archive are written
                shown = None if args.json else lambda written: _print_verdict(report, written.folder)
                out = write_run_outputs(
                    report, args.out, pictures=cfg.output.pictures, archive=cfg.output.archive, scan_set=scan,
                    include_images=cfg.output.include_images, threads=settings.threads,
                    level=cfg.output.archive_level,
                    fused_image=cfg.output.fused_image if args.fused is None else args.fused, on_verdict=shown,
                )  # fmt: skip
    except QCError as e:
        print(f"imageqc qc: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"imageqc qc: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if store is not None:
            store.close()
    if args.json:
        doc = report.as_dict() if out is None else dict(out.document)
        if out is not None:
            doc["outputs"] = {
                **doc.get("outputs", {}),
                "folder": str(out.folder),
                "archive": str(out.archive) if out.archive else None,
            }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif out is None:
        _print_verdict(report, None)
    else:
        _print_outputs(out)
    return EXIT_OK if report.verdict == "pass" else EXIT_QC_FAIL


def _pair_cache(cfg: Any) -> tuple[Any, Any]:
    """The service's FOV-pair cache (the job database in the config's state folder), or (None, None) with a warning."""
    from daemon.errors import DaemonError
    from daemon.paircache import StorePairCache
    from daemon.store import Store

    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        store = Store(cfg.database_path)
    except (DaemonError, OSError) as e:
        print(
            f"imageqc qc: the pair cache in {cfg.state_dir} cannot be used ({e}); computing every pair (--no-cache "
            "says so without this warning)",
            file=sys.stderr,
        )
        return None, None
    return StorePairCache(store), store


def _print_verdict(report: Any, folder: Path | None) -> None:
    """The verdict, every judged metric and every reason, wrapped at the terminal's width, never cut;
    then the output folder (its report and pictures are written by now)."""
    from rich.markup import escape

    from daemon.views import check_line, console, field, verdict_markup

    con = console()
    con.print(f"{escape(report.chip)}  {report.stain}  {verdict_markup(report.verdict)}  ({report.duration_s:.1f} s)")
    for c in report.checks:
        field(con, str(c.get("metric", "")), check_line(c), markup=True, indent=2)
    for r in report.reasons:
        field(con, "reason", r, indent=2)
    if folder is not None:
        field(con, "outputs", folder)


def _print_outputs(out: Any) -> None:
    """What was written after the verdict: each fused image and the archive, whole (to copy)."""
    from daemon.views import console, whole

    con = console()
    for fused in out.document.get("outputs", {}).get("fused_images", []):
        whole(con, "fused image", out.folder / fused["file"])  # SAW's --image takes it
    if out.archive:
        whole(con, "archive", out.archive)  # SAW takes it as saw count --image-tar
