"""Hostile files met by the readers and the names we derive (issue #20, cases 9, 11, 13, 14, 15).

Each fault is real: a TIFF whose SubIFD points at itself, a 250-character
IF name, a symbolic-link loop and a link out of the root inside a tile
folder, a small tar.gz that expands far beyond its size, and onnxruntime
loaded under an empty home folder. The units at fault are exercised directly
(a QC run in a child process where the process matters), so these tests take
a few seconds, not a service's start-up.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import run_child

from .conftest import config_text, hpc_target, tree_hashes, verify_exactly_once
from .test_disk_full import tmpfs  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
CHIP = "SS200000601TL_D1"


@pytest.fixture(scope="module")
def chip_tif(tmp_path_factory, shared_data) -> Path:
    """One small generated DAPI chip (1200 px at scale 0.5) that passes QC."""
    import tifffile

    from qc.testing.chips import generate_chip

    root = tmp_path_factory.mktemp("readers")
    chip = generate_chip(data_dir=shared_data, seed=31, width=1200, height=1200, scale=(0.5, 0.5), angle_deg=-1.0)
    path = root / f"{CHIP}.tif"
    tifffile.imwrite(path, chip.image)
    return path


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORT_", "IMAGEQC_", "XDG_"))}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


# ---------------------------------------------------------------------------
# Case 15: onnxruntime telemetry
# ---------------------------------------------------------------------------


def test_a_qc_run_writes_nothing_under_the_users_home(chip_tif, tmp_path):
    """onnxruntime loads with its telemetry off: no ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``."""
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "out"
    proc = run_child(
        [sys.executable, "-m", "daemon.cli", "qc", str(chip_tif), "--out", str(out), "--json"],
        timeout=300,
        what="imageqc qc",
        check=False,
        cwd=tmp_path,
        env=_child_env(HOME=str(home), USERPROFILE=str(home)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["images"][0]["clarity"] is not None  # the ONNX model did run
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []


# ---------------------------------------------------------------------------
# Case 14: a SubIFD that points at itself
# ---------------------------------------------------------------------------


def _with_subifds_patched(image, patch) -> bytes:
    """A TIFF written by tifffile with one SubIFD (a pyramid level), its SubIFDs entry rewritten by ``patch``."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(image, subifds=1, photometric="minisblack")
        tw.write(image[::2, ::2], subfiletype=1, photometric="minisblack")
    data = bytearray(buf.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    (count,) = struct.unpack_from("<H", data, first)
    for i in range(count):
        entry = first + 2 + 12 * i
        tag, _typ, n = struct.unpack_from("<HHI", data, entry)
        if tag == 330 and n == 1:
            patch(data, first, entry)
            return bytes(data)
    raise AssertionError("tifffile wrote no SubIFDs entry")


def _nested_subifds(depth: int) -> bytes:
    """A little-endian TIFF of ``depth + 1`` 8 x 8 IFDs, each the only SubIFD of the one before."""
    out = bytearray(b"II" + struct.pack("<HI", 42, 8))
    pixels = bytes(64)
    size = 2 + 10 * 12 + 4
    for level in range(depth + 1):
        here = len(out)
        strip = here + size
        sub = strip + len(pixels) if level < depth else 0
        tags = [
            (256, 3, 8),
            (257, 3, 8),
            (258, 3, 8),
            (259, 3, 1),
            (262, 3, 1),
            (273, 4, strip),
            (277, 3, 1),
            (278, 3, 8),
            (279, 4, len(pixels)),
            (330, 13, sub),
        ]
        if not sub:
            tags = tags[:-1]
        out += struct.pack("<H", len(tags))
        for tag, typ, value in tags:
            out += struct.pack("<HHI", tag, typ, 1) + (
                struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
            )
        out += struct.pack("<I", 0) + b"\0" * (size - 2 - 12 * len(tags) - 4) + pixels
    return bytes(out)


def test_a_subifd_loop_is_refused_with_a_clear_message_by_discovery_and_the_readers(tmp_path):
    """Issue #20 case 14: it passed discovery, then QC failed with 'maximum recursion depth exceeded'."""
    import numpy as np

    from daemon.completion import check_member_whole
    from qc.errors import CorruptImageError
    from qc.io import open_scan_set
    from qc.io.tiff import TiffImage

    image = np.random.default_rng(14).integers(0, 255, (600, 600), dtype=np.uint8)

    def to_itself(data: bytearray, first: int, entry: int) -> None:
        struct.pack_into("<I", data, entry + 8, first)

    looping = tmp_path / f"{CHIP}.tif"
    looping.write_bytes(_with_subifds_patched(image, to_itself))
    expected = f"{looping}: the TIFF's SubIFD chain loops at offset 8: the file is damaged"
    with pytest.raises(CorruptImageError) as err:
        TiffImage(looping)
    assert str(err.value).startswith(expected), err.value
    with pytest.raises(CorruptImageError, match="SubIFD chain loops at offset 8"):
        open_scan_set([looping])
    member = type("Member", (), {"format": "tiff", "path": str(looping)})()
    assert (check_member_whole(None, member) or "").startswith(expected)  # discovery: never queued as whole

    deep = tmp_path / "SS200000602TL_D1.tif"
    deep.write_bytes(_nested_subifds(40))
    with pytest.raises(CorruptImageError, match="SubIFDs nest deeper than 16 levels at offset"):
        TiffImage(deep)
    fine = tmp_path / "SS200000603TL_D1.tif"
    fine.write_bytes(_nested_subifds(3))  # a short, acyclic SubIFD tree is read as before
    assert TiffImage(fine).levels[0] == (8, 8)


# ---------------------------------------------------------------------------
# Cases 9 and 11, through the service: a 250-character IF name; links in a tile folder
# ---------------------------------------------------------------------------


def test_a_250_character_if_name_and_links_in_a_tile_folder_end_done_with_every_file_uploaded(
    make_service, chip_images, shared_data
):
    """Issue #20 cases 9 and 11.

    9: QC failed for good on the calibration picture's file name (the IF name
    plus ``_calibration.png`` passes 255 bytes), and the HPC copy on its
    temporary name (``.<name>.imageqc-partial``). 11: a link loop in a tile
    folder made the upload plan fail (the job never left ``qc_done`` or ended
    ``done`` having uploaded nothing), and a link out of the root made the
    folder look changed since QC forever.
    """
    svc = make_service(
        config_text(uploads=[hpc_target()], output={"pictures": True}),
        folders=("inbox", "hpc", "outside"),
    )
    inbox, outside = svc.root / "inbox", svc.root / "outside"
    long_if = f"{CHIP}_{'CD31-' * 45}{'A' * (250 - len(CHIP) - 1 - 225 - 7)}_IF.tif"
    assert len(long_if) == 250
    (inbox / long_if).write_bytes(chip_images[1])
    (inbox / f"{CHIP}.tif").write_bytes(chip_images[0])
    tiles = inbox / "C02533C"
    shutil.copytree(shared_data / "tiles" / "stitch2d", tiles)
    (outside / "secret.txt").write_text("outside the watch root: never uploaded\n", encoding="utf-8")
    os.symlink("loop", tiles / "loop")  # a link to itself: ELOOP when followed
    os.symlink(Path("..") / ".." / "outside" / "secret.txt", tiles / "notes.txt")  # out of the root
    shutil.copyfile(tiles / "stitch2d_ex[Grid@0 0].jpg", outside / "tile.jpg")
    os.symlink(
        Path("..") / ".." / "outside" / "tile.jpg", tiles / "stitch2d_ex[Grid@2 0].jpg"
    )  # tile-named, out of the root
    (tiles / "more").mkdir()
    os.symlink("..", tiles / "more" / "up", target_is_directory=True)  # a folder loop
    before = tree_hashes(inbox)

    svc.start()
    svc.wait_running()
    svc.wait_for(
        lambda: {j.chip: j.state for j in svc.jobs()} == {CHIP: "done", "C02533C": "done"}, 120, "both sets to end done"
    )
    assert svc.stop() == 0

    verify_exactly_once(svc, [CHIP, "C02533C"], hpc=svc.root / "hpc")
    stored = {p.name for p in (svc.root / "hpc").rglob("*") if p.is_file()}
    assert long_if in stored  # the input under its full name; its temporary copy had a shortened one
    assert not {"secret.txt", "notes.txt", "loop", "tile.jpg", "stitch2d_ex[Grid@2 0].jpg"} & stored
    result = svc.read(lambda s: s.get_result(next(j.id for j in s.list_jobs() if j.chip == "C02533C")))
    report = json.loads((Path(result["output_dir"]) / "report.json").read_text(encoding="utf-8"))
    assert report["images"][0]["fov_grid"] == [3, 2]  # the six real tiles: the tile-named link was not taken for one
    assert {f"stitch2d_ex[Grid@{r} {c}].jpg" for r in range(2) for c in range(3)} <= stored
    jobs = {j.chip: j for j in svc.jobs()}
    done = svc.read(lambda s: [e.message for e in s.events(jobs["C02533C"].id) if e.to_state == "done"])[0]
    assert done.startswith("uploaded ") and done.endswith(
        "; not uploaded (links and special files in tile folders are never followed): "
        "C02533C/loop, C02533C/more/up, C02533C/notes.txt and 1 more"
    ), done
    archive = svc.read(lambda s: s.get_result(jobs[CHIP].id))["archive"]
    with tarfile.open(archive) as tar:
        pictures = [Path(n).name for n in tar.getnames() if "/pictures/" in n]
    calibration = [p for p in pictures if p.endswith("_calibration.png")]
    assert (
        len(calibration) == 1
        and len(calibration[0].encode()) == 255
        and calibration[0].startswith(f"{CHIP}_CD31-CD31-")
    )
    assert tree_hashes(inbox) == before  # the microscope's files untouched


# ---------------------------------------------------------------------------
# Case 13: a small tar.gz that expands to 300 MiB, named like a QC archive
# ---------------------------------------------------------------------------

BOMB_CHIP = "SS200000701TL_D1"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 1.3 MB ``<chip>.tar.gz`` whose one member is 300 MiB of zeros (made in about half a second)."""
    import gzip

    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.n = n

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            k = min(len(b), self.n)
            b[:k] = bytes(k)
            self.n -= k
            return k

    path = tmp_path_factory.mktemp("bomb") / f"{BOMB_CHIP}.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo(f"{BOMB_CHIP}/images/{BOMB_CHIP}.tif")
        info.size = 300 * 1024**2
        tar.addfile(info, io.BufferedReader(Zeros(info.size), 1 << 20))
    return path


def test_the_completion_check_never_decompresses_an_archive(bomb, monkeypatch):
    """Issue #20 case 13: the service loop decompressed a 6 GiB archive (22 s) to judge it complete."""
    import zlib

    from daemon.completion import check_member_whole

    inflated = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.inner = real(*args, **kwargs)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self.inner.decompress(data, max_length)
            inflated.append(len(out))
            return out

    monkeypatch.setattr(zlib, "decompressobj", Counting)  # tarfile's gzip reader and ours both go through it
    member = type("Member", (), {"format": "tar.gz", "path": str(bomb)})()
    assert check_member_whole(None, member) is None  # whole as far as headers and trailer tell
    assert sum(inflated) <= 64 * 1024, f"the completion check decompressed {sum(inflated)} bytes"
    cut = bomb.with_name("SS200000702TL_D1.tar.gz")
    cut.write_bytes(bomb.read_bytes()[: bomb.stat().st_size // 2])  # still being copied
    assert "cut short" in (check_member_whole(None, type("Member", (), {"format": "tar.gz", "path": str(cut)})()) or "")
    assert sum(inflated) <= 128 * 1024
    cut.unlink()


def test_an_archive_bomb_fails_its_job_from_the_headers_and_nothing_is_expanded(
    make_service, chip_images, bomb, tmp_path
):
    """Issue #20 case 13: the QC child spilled the member into the system's temp folder until that disk was full."""
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    svc = make_service(config_text(qc={"max_archive_gb": 0.0625}), folders=("inbox",))
    svc.env.update(TMPDIR=str(system_temp), TEMP=str(system_temp), TMP=str(system_temp))
    shutil.copyfile(bomb, svc.root / "inbox" / bomb.name)
    svc.start()
    svc.wait_running()
    svc.wait_for(
        lambda: any(j.chip == BOMB_CHIP and j.state == "failed" for j in svc.jobs()), 90, "the bomb's job to fail"
    )
    (svc.root / "inbox" / f"{CHIP}.tif").write_bytes(chip_images[0])  # the service goes on with ordinary sets
    svc.wait_for(
        lambda: any(j.chip == CHIP and j.state == "skipped" for j in svc.jobs()), 90, "the ordinary set"
    )  # no upload
    assert svc.stop() == 0

    job = next(j for j in svc.jobs() if j.chip == BOMB_CHIP)
    assert job.failed_stage == "qc" and job.next_attempt_at is None, job  # permanent: retrying cannot help
    assert (
        f"{BOMB_CHIP}.tar.gz: its members expand to more than 0.293 GiB (member "
        f"'{BOMB_CHIP}/images/{BOMB_CHIP}.tif' declares 0.293 GiB), beyond the limit of 0.0625 GiB; nothing was "
        "expanded. If the archive is genuine, raise qc.max_archive_gb in the config; otherwise remove it"
    ) in job.error, job.error
    assert sorted(p.name for p in system_temp.iterdir()) == []
    leftovers = [p for p in svc.root.rglob("*") if ".imageqc-archive.partial" in p.name]
    assert leftovers == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mounts a tmpfs: Linux only")
def test_an_archive_member_that_does_not_fit_the_scratch_folder_is_never_spilled(bomb, tmpfs, tmp_path):  # noqa: F811
    """The budget allows it, but the output folder (a 32 MB tmpfs) cannot hold it: refused before writing."""
    from qc.io import ReadLimits
    from qc.io.archive import read_archive

    scratch = tmpfs(tmp_path / "out", "32m")
    with pytest.raises(OSError) as err:  # noqa: PT011 - the errno is checked below
        read_archive(bomb, limits=ReadLimits(), scratch_dir=scratch.path)
    assert err.value.errno == errno.ENOSPC
    assert (
        f"reading {bomb}/{BOMB_CHIP}/images/{BOMB_CHIP}.tif needs 0.293 GiB of scratch space in {scratch.path} but only "
        in str(err.value)
    )
    assert list(scratch.path.iterdir()) == []
