"""`imageqc qc` end to end: verdict, JSON report, outputs and exit codes."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

from daemon.cli import main
from tests.daemon.conftest import CHIP


def test_qc_passes_prints_the_verdict_and_writes_outputs(qc_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    import qc.report

    write_archive, before_archive = qc.report._write_archive, []

    def archive_after_what_was_printed(*args, **kw):
        before_archive.append(capsys.readouterr().out)
        return write_archive(*args, **kw)

    monkeypatch.setattr(qc.report, "_write_archive", archive_after_what_was_printed)
    code = main(["qc", str(qc_files["nuclear"]), str(qc_files["if"]), "--out", str(tmp_path / "out")])
    out = before_archive[0] + capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith(f"{CHIP}  DAPI+mIF  PASS")
    # the verdict, its metrics and the output folder are on the screen before the archive is written
    assert before_archive[0].splitlines()[0] == out.splitlines()[0] and "outputs" in before_archive[0]
    assert "archive" not in before_archive[0]
    # text wraps at 80 columns; the archive's path is printed whole, to be copied into saw count --image-tar
    assert all(len(line) <= 80 for line in out.splitlines() if not line.startswith("archive "))
    archives = list((tmp_path / "out").glob(f"{CHIP}_*.tar.gz"))
    assert len(archives) == 1
    assert f"archive   {archives[0]}" in out.splitlines()
    with tarfile.open(archives[0]) as tar:
        names = tar.getnames()
    assert names[0] == archives[0].name.replace(".tar.gz", ".ipr")
    assert f"DAPI/{CHIP}_DAPI.tif" in names and f"IF/CD31_IF/{CHIP}_CD31_IF.tif" in names
    assert any(n.endswith(f"pictures/{CHIP}_CD31_IF_calibration.png") for n in names)


def test_qc_json_is_the_report_contract(qc_files, capsys):
    assert main(["qc", str(qc_files["nuclear"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "imageqc.report/1" and doc["verdict"] == "pass" and doc["stain"] == "DAPI"
    assert set(doc) >= {"chip", "stain", "verdict", "reasons", "images", "duration_s", "software"}


def test_qc_of_one_grey_image_imports_no_stitching_and_no_scipy(qc_files, tmp_path):
    """Half a second of imports in every fresh `imageqc qc` (issue #16): only tile sets need qc.stitching."""
    import subprocess
    import sys

    code = (
        "import sys; from daemon.cli import main\n"
        f"rc = main(['qc', {str(qc_files['nuclear'])!r}, '--json', '--no-cache', '--out', {str(tmp_path)!r}])\n"
        "print(rc, sorted(m for m in ('qc.stitching', 'qc.live', 'scipy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout[-2000:] + done.stderr[-2000:]


def test_qc_fail_exits_3_with_reasons(qc_files, capsys):
    assert main(["qc", str(qc_files["fail"])]) == 3
    out = capsys.readouterr().out
    assert "FAIL" in out and "track line score" in out


def test_qc_usage_and_read_errors(qc_files, tmp_path, capsys):
    assert main(["qc", str(tmp_path / "nope.tif")]) == 2
    assert "no such file" in capsys.readouterr().err
    broken = tmp_path / f"{CHIP}.tif"
    broken.write_bytes(qc_files["nuclear"].read_bytes()[:5000])
    assert main(["qc", str(broken)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("imageqc qc: ") and str(broken) in err and len(err.splitlines()) == 1
    assert main(["qc"]) == 2


def test_tile_overlap_for_folders_without_positions_comes_from_the_flag_or_the_watch_root(
    shared_data, tmp_path, capsys, monkeypatch
):
    import shutil

    inbox = tmp_path / "inbox"
    folder = inbox / "C02533C"
    shutil.copytree(shared_data / "tiles" / "stitch2d", folder)

    def stitching(*args):
        code = main(["qc", str(folder), "--json", *args])
        assert code in (0, 3)
        return json.loads(capsys.readouterr().out)["images"][0]["stitching"]

    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    assert stitching()["passed"] is False  # the built-in 10 % guess is far from these tiles' 26 % x 10 %
    assert stitching("--tile-overlap", "0.26,0.1")["score"] >= 90
    config = tmp_path / "site.toml"
    config.write_text(
        f'state_dir = "{(tmp_path / "state").as_posix()}"\n[[watch]]\npath = "{inbox.as_posix()}"\n'
        "tile_overlap = [0.26, 0.1]\n",
        encoding="utf-8",
    )
    assert stitching("--config", str(config))["score"] >= 90  # the folder lies under that root
    for bad in ("1.5", "0.1,0.2,0.3", "x"):
        assert main(["qc", str(folder), "--tile-overlap", bad]) == 2
        assert "give one or two fractions between 0 and 0.9" in capsys.readouterr().err
    assert main(["qc", str(folder), "--tile-pattern", "(?P<row>\\d+)"]) == 2
    assert "needs named groups (?P<row>...) and (?P<col>...)" in capsys.readouterr().err


def _imports_fft(folder: Path, *extra: str) -> str:
    """Whether `imageqc qc FOLDER --json` in a fresh process (the environment's config) imports scipy.fft."""
    import subprocess
    import sys

    code = (
        "import sys; from daemon.cli import main\n"
        f"main(['qc', {str(folder)!r}, '--json', *{list(extra)!r}])\n"
        "print('scipy.fft' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    return done.stderr.strip().splitlines()[-1]


def test_a_hand_rerun_whose_pairs_are_all_cached_transforms_nothing_and_imports_no_fft(tmp_path, monkeypatch):
    """scipy.fft costs 0.25 s in a fresh `imageqc qc`; it is imported only when a pair is registered."""
    import subprocess
    import sys

    from qc.testing.tiles import blob_texture, make_tile_set, write_tile_folder

    conf = tmp_path / "site.toml"
    conf.write_text('state_dir = "state"\n[[watch]]\npath = "inbox"\n', encoding="utf-8")
    monkeypatch.setenv("IMAGEQC_CONFIG", str(conf))
    texture = blob_texture((1400, 1400), seed=5)  # structure to register
    folder = write_tile_folder(
        make_tile_set(texture, rows=2, cols=2, tile_size=400, overlap=0.1, seed=1), tmp_path / CHIP
    )

    def fresh(*extra: str) -> tuple[int, bool]:
        code = (
            "import json, sys; from daemon.cli import main\n"
            f"main(['qc', {str(folder)!r}, '--json', *{list(extra)!r}])\n"
            "print('scipy.fft' in sys.modules, file=sys.stderr)"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
        computed = json.loads(done.stdout)["images"][0]["stitching"]["pairs_computed"]
        return computed, done.stderr.strip().splitlines()[-1] == "True"

    assert fresh() == (4, True)  # registered: the transforms ran
    assert fresh() == (0, False)  # every pair from the state folder's cache: nothing to transform
    assert fresh("--no-cache") == (4, True)


def test_qc_by_hand_shares_the_pair_cache_of_the_state_folder(shared_data, tmp_path, capsys, monkeypatch):
    """#16 item 3: a re-run on the same tiles computes no pair; a folder that gained tiles computes only the new pairs.
    #18: the per-FOV checks go through the same cache (``fovs_cached``)."""

    from qc.testing.tiles import make_tile_set, write_tile_folder

    conf = tmp_path / "site.toml"
    conf.write_text('state_dir = "state"\n[[watch]]\npath = "inbox"\n', encoding="utf-8")
    monkeypatch.setenv("IMAGEQC_CONFIG", str(conf))
    texture = np.random.default_rng(3).integers(0, 255, (1400, 1400), dtype=np.uint8)
    folder = tmp_path / CHIP

    def pairs(*extra):
        assert main(["qc", str(folder), "--json", *extra]) in (0, 3)
        return json.loads(capsys.readouterr().out)["images"][0]["stitching"]

    write_tile_folder(make_tile_set(texture, rows=2, cols=2, tile_size=400, overlap=0.1, seed=1), folder)
    first = pairs()
    assert (first["pairs_total"], first["pairs_computed"], first["pairs_cached"], first["fovs_cached"]) == (4, 4, 0, 0)
    assert (tmp_path / "state" / "imageqc.sqlite3").exists()  # the service's database, in the config's state folder
    again = pairs()
    assert (again["pairs_computed"], again["pairs_cached"], again["fovs_cached"]) == (0, 4, 4)
    uncached = pairs("--no-cache")
    assert (uncached["pairs_computed"], uncached["fovs_cached"]) == (4, 0)
    shutil.rmtree(folder)  # the same tiles and a third row: only the pairs that involve a new tile are computed
    write_tile_folder(make_tile_set(texture, rows=3, cols=2, tile_size=400, overlap=0.1, seed=1), folder)
    grown = pairs()
    assert grown["pairs_total"] == 7 and grown["pairs_cached"] == 4 and grown["pairs_computed"] == 3
    assert grown["fovs_cached"] == 4  # the rewritten files hold the same pixels: their FOV checks are reused


def test_the_watch_root_of_files_under_nested_roots_is_the_deepest_as_in_discovery(tmp_path):
    from daemon.config import load_config
    from daemon.qccmd import _watch_root_of

    outer, inner = tmp_path / "inbox", tmp_path / "inbox" / "if-scans"
    (inner / "C02533C").mkdir(parents=True)
    config = tmp_path / "site.toml"
    config.write_text(
        f'state_dir = "{(tmp_path / "state").as_posix()}"\n'
        f'[[watch]]\npath = "{outer.as_posix()}"\ntile_overlap = [0.1]\n'
        f'[[watch]]\npath = "{inner.as_posix()}"\ntile_overlap = [0.26, 0.1]\n',
        encoding="utf-8",
    )
    cfg = load_config(config)
    assert _watch_root_of(cfg, [inner / "C02533C"]).tile_overlap == (0.26, 0.1)
    assert _watch_root_of(cfg, [outer / "C02533D.tif"]).tile_overlap == (0.1,)
    assert _watch_root_of(cfg, [tmp_path / "elsewhere.tif"]) is None


def test_qc_fused_writes_the_stitched_image_into_the_output_folder_and_names_it(tmp_path, capsys, monkeypatch):
    """Issue #17 item 4: ``--fused`` (else the config's ``output.fused_image``) for the hand command."""
    import tifffile

    from qc.testing.tiles import make_tile_set, write_tile_folder

    monkeypatch.delenv("IMAGEQC_CONFIG", raising=False)
    texture = np.random.default_rng(4).integers(0, 255, (1000, 1000), dtype=np.uint8)
    folder = write_tile_folder(
        make_tile_set(texture, rows=2, cols=2, tile_size=400, overlap=0.1, seed=4), tmp_path / CHIP
    )
    assert main(["qc", str(folder), "--fused", "--no-cache"]) == 2
    assert "give --out DIR too" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["qc", str(folder), "--out", str(out), "--fused", "--no-cache", "--json"]) in (0, 3)
    outputs = json.loads(capsys.readouterr().out)["outputs"]
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    assert outputs["folder"] == str(run) and outputs["fused_images"][0]["file"] == "DAPI_fov_stitched.tif"
    assert tifffile.imread(run / "DAPI_fov_stitched.tif").shape == (760, 760)  # 2 x 2 tiles of 400 at a 360 step
    assert json.loads((run / "report.json").read_text())["outputs"]["fused_images"] == outputs["fused_images"]
    assert main(["qc", str(folder), "--out", str(out), "--no-cache", "--fused"]) in (0, 3)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("fused image")]
    assert line.endswith("DAPI_fov_stitched.tif") and Path(line.split()[-1]).is_file()
    assert main(["qc", str(folder), "--out", str(out), "--no-cache"]) in (0, 3)  # not asked for: not written
    assert "fused image" not in capsys.readouterr().out and len(list(out.glob("*/DAPI_fov_stitched.tif"))) == 2
