"""``imageqc demo``: a microscope in a box, for a first look at the service.

Generates a small DAPI + IF scan set (a chip image with track lines built from
the real stain crops in ``shared/data``, and an IF image shifted by a few
pixels) and writes it into the first watch root slowly, in chunks, the way
microscope software exports. The running service then sees it settle, queues
it, runs QC and uploads (when a target is configured). With ``--follow`` the
demo also prints each stage of the job as it happens.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

from daemon.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_QC_FAIL, EXIT_USAGE

__all__ = ["add_demo_command", "cmd_demo"]


def add_demo_command(sub: Any) -> None:
    sp = sub.add_parser(
        "demo",
        help="Write a generated DAPI + IF scan set into the watch folder slowly, as a microscope would.",
        description="Write a generated DAPI + IF scan set into the first watch root, in chunks over "
        "--seconds, so a running service discovers, QCs and uploads it. Needs the stain crops of "
        "shared/data (--data DIR, $IMAGEQC_SHARED_DATA, or found beside the checkout).",
    )
    sp.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="the service's config (default: $IMAGEQC_CONFIG, else the embedded default)",
    )
    sp.add_argument(
        "--chip", default="SS200000135TL_D1", help="chip serial to name the files with (default: %(default)s)"
    )
    sp.add_argument("--if-name", default="CD31", help="name of the IF image (default: %(default)s)")
    sp.add_argument("--size", type=int, default=4000, help="image side in pixels (default: %(default)s)")
    sp.add_argument("--seconds", type=float, default=20.0, help="how long writing takes (default: %(default)s)")
    sp.add_argument("--no-lines", action="store_true", help="a chip without visible track lines: QC fails and says why")
    sp.add_argument(
        "--data",
        metavar="DIR",
        help="the shared/data folder holding stereo_crops/ (default: $IMAGEQC_SHARED_DATA, else ../shared/data beside the checkout)",
    )
    sp.add_argument(
        "--follow",
        action="store_true",
        help="after writing, print the job's stages until it ends; exit 0 on a pass, 3 on a fail, 1 on an error. "
        "Refuses to start when no running service watches the folder",
    )
    sp.set_defaults(func=cmd_demo)


def _encode(image: Any) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, image)
    return buf.getvalue()


def _write_slowly(path: Path, data: bytes, seconds: float, label: str) -> None:
    chunks = max(1, int(seconds * 4))
    step = -(-len(data) // chunks)
    tty = sys.stdout.isatty()
    with path.open("wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            done = min(len(data), i + step) / len(data)
            if tty:
                print(f"\r  writing {label:<34} {done:4.0%}", end="", flush=True)
            time.sleep(seconds / chunks)
    print(f"\r  writing {label:<34} 100%" if tty else f"  wrote {label} ({len(data) / 1e6:.1f} MB)", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.config import load_config
    from daemon.naming import parse_name

    cfg = load_config(args.config or os.environ.get("IMAGEQC_CONFIG") or None)
    inbox = cfg.watch[0].path
    naming = cfg.watch[0].naming
    for name in (f"{args.chip}.tif", f"{args.chip}_{args.if_name}_IF.tif"):
        info = parse_name(name)
        if not info.accepted(naming):
            print(f"imageqc demo: {name!r} is not a name the service accepts ({info.reason})", file=sys.stderr)
            return EXIT_USAGE
    if args.size < 1000 or args.size > 20000:
        print("imageqc demo: --size must be between 1000 and 20000", file=sys.stderr)
        return EXIT_USAGE
    if args.follow:
        problem = _no_service_watching(cfg, inbox)
        if problem:
            print(
                f"imageqc demo --follow: {problem}, so nothing would ever be followed. Start the service in another "
                f"terminal with the same config (imageqc run, or make run in the checkout), or leave out --follow.",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    try:
        from qc.testing.chips import generate_chip, generate_if, shared_data_dir

        data = shared_data_dir(args.data)
    except FileNotFoundError:
        where = args.data or os.environ.get("IMAGEQC_SHARED_DATA") or "../shared/data beside the source checkout"
        print(
            f"imageqc demo: the demo builds its chip from real stain crops, and none were found in {where} "
            "(a folder holding stereo_crops/). Give the folder on the command line: imageqc demo --data /path/to/shared/data "
            "(or set IMAGEQC_SHARED_DATA to it)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    inbox.mkdir(parents=True, exist_ok=True)
    print(
        f"generating a {args.size} x {args.size} DAPI chip and a {args.if_name} IF image for {args.chip} ...",
        flush=True,
    )
    seed = int(time.time()) % 100_000
    dapi = generate_chip(
        data_dir=data,
        width=args.size,
        height=args.size,
        scale=(0.5, 0.5),
        angle_deg=0.7,
        tissue_fraction=0.5,
        lines=not args.no_lines,
        seed=seed,
    )
    ifimg = generate_if(dapi.truth, offset_px=(6, -4), data_dir=data, seed=seed + 1)
    files = [
        (inbox / f"{args.chip}.tif", _encode(dapi.image)),
        (inbox / f"{args.chip}_{args.if_name}_IF.tif", _encode(ifimg.image)),
    ]
    print(f"exporting into {inbox} over {args.seconds:.0f} s, as a microscope would:")
    for path, blob in files:
        _write_slowly(path, blob, args.seconds / len(files), path.name)
    settle = cfg.watch[0].settle_seconds
    print(
        f"done. The service queues the set about {settle:.0f} s after the last write (settle_seconds), then runs QC.\n"
        "Watch it with:  imageqc status      (or: imageqc jobs, imageqc logs -f)"
    )
    if not args.follow:
        return EXIT_OK
    return _follow(cfg, args.chip, started=time.time())


def _no_service_watching(cfg: Any, folder: Path, *, wait_s: float = 10.0) -> str | None:
    """Why no running service would pick up files written into ``folder``, or None when one does.

    Waits up to ``wait_s`` for a heartbeat, for a service that is just starting.
    """
    from daemon.status import collect_status

    deadline = time.monotonic() + wait_s
    while True:
        st = collect_status(cfg)
        svc = st["service"]
        if svc.get("running"):
            watched = {os.path.normcase(os.path.abspath(str(w.get("path")))) for w in st["watchers"]}
            if os.path.normcase(os.path.abspath(folder)) in watched:
                return None
            problem = f"the service running on {svc.get('host')} (pid {svc.get('pid')}) does not watch {folder}"
        else:
            problem = f"no service is running with state folder {cfg.state_dir} ({svc.get('reason') or 'no heartbeat'})"
        if time.monotonic() >= deadline:
            return problem
        time.sleep(0.5)


def _follow(cfg: Any, chip: str, *, started: float, timeout: float = 1800.0) -> int:
    from daemon.errors import DatabaseUnavailable
    from daemon.store import TERMINAL, JobState, Store

    last = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(1.0)
        try:
            with Store(cfg.database_path, readonly=True) as store:
                jobs = [j for j in store.list_jobs(chip=chip, limit=5) if j.created_at >= started - 5]
                result = store.get_result(jobs[0].id) if jobs else None
        except DatabaseUnavailable:
            jobs, result = [], None
        if not jobs:
            shown: tuple[str, str | None, int | None] = ("waiting", None, None)
            if shown != last:
                print("  settling: waiting for the files to stay unchanged ...", flush=True)
                last = shown
            continue
        job = jobs[0]
        shown = (job.state, job.stage, None if job.progress is None else int(job.progress // 10))
        if shown != last:
            pct = "" if job.progress is None else f" {job.progress:.0f}%"
            stage = f" ({job.stage}{pct})" if job.stage and job.state == "running" else ""
            print(f"  job #{job.id}: {job.state}{stage}", flush=True)
            last = shown
        if JobState(job.state) in TERMINAL or job.state == "failed":
            if result:
                print(f"verdict: {result['verdict']}")
                for r in result["report"].get("reasons", []):
                    print(f"  - {r}")
                if result.get("archive"):
                    print(f"archive: {result['archive']}")
            if job.error:
                print(f"error: {job.error}")
            if job.state == "failed":
                return EXIT_FAILURE
            return EXIT_QC_FAIL if result and result["verdict"] == "fail" else EXIT_OK
    print("gave up following after 30 minutes; is the service running? (imageqc status)", file=sys.stderr)
    return EXIT_FAILURE
