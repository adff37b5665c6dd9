"""regular_files: what every tile-folder listing is built on (issue #20, case 11)."""

from __future__ import annotations

import os
import sys

import pytest

from qc.io.listing import regular_files


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links and FIFOs need POSIX here")
def test_links_loops_and_fifos_are_skipped_and_named_never_followed_or_opened(tmp_path):
    folder = tmp_path / "C02533C"
    (folder / "sub").mkdir(parents=True)
    (folder / "a_0000_0000.tif").write_bytes(b"a")
    (folder / "sub" / "b_0000_0001.tif").write_bytes(b"bb")
    (tmp_path / "outside.tif").write_bytes(b"outside")
    os.symlink("loop", folder / "loop")
    os.symlink("..", folder / "sub" / "up", target_is_directory=True)
    os.symlink(tmp_path / "outside.tif", folder / "c_0000_0002.tif")
    os.mkfifo(folder / "d_0000_0003.tif")  # opening it would block: it must not be opened

    listing = regular_files(folder)
    assert [(os.path.relpath(p, folder), st.st_size) for p, st in listing.files] == [
        ("a_0000_0000.tif", 1),
        (os.path.join("sub", "b_0000_0001.tif"), 2),
    ]
    assert [os.path.relpath(p, folder) for p in listing.skipped] == [
        "c_0000_0002.tif",
        "d_0000_0003.tif",
        "loop",
        os.path.join("sub", "up"),
    ]


def test_a_missing_folder_raises_and_an_empty_one_lists_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        regular_files(tmp_path / "gone")
    assert regular_files(tmp_path).files == ()
