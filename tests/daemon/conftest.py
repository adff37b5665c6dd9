"""Fixtures for the service tests: real state folders, configs, no leaked threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.config import Config, load_config_text
from tests.helpers import QC_NORMAL_PRIORITY, scaled


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves non-daemon threads running (watchdog's habit)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + scaled(10)  # threads still winding down after the test's stop
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Write a config file under tmp_path and load it; returns the Config."""

    def make(extra: str = "", *, name: str = "imageqc.toml", tick: float = 0.2) -> Config:
        text = (
            'state_dir = "state"\n'
            "[[watch]]\n"
            'path = "inbox"\n'
            "[service]\n"
            f"tick_seconds = {tick}\n"
            "lease_seconds = 5\n"
            "retry_base_s = 1\n"
            "shutdown_timeout_s = 2\n"
            "[logging]\n"
            'console = "off"\n'
        )
        if "priority" not in extra:  # normal priority unless the test sets one
            text += QC_NORMAL_PRIORITY
        text = _merge(text, extra)
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        (tmp_path / "inbox").mkdir(exist_ok=True)
        return load_config_text(text, file=str(path), base=tmp_path)

    return make


def _merge(base: str, extra: str) -> str:
    """Append extra TOML; settings of a table already in base go into that table."""
    if not extra.strip():
        return base
    lines = base.splitlines()
    table = None
    for raw in extra.strip().splitlines():
        s = raw.strip()
        if s.startswith("["):
            table = s
            if s.startswith("[[") or s not in lines:
                lines.append(s)
            continue
        if table and not table.startswith("[[") and table in lines:
            lines.insert(lines.index(table) + 1, raw)
        else:
            lines.append(raw)
    return "\n".join(lines) + "\n"


CHIP = "SS200000135TL_D1"


@pytest.fixture(scope="session")
def qc_files(tmp_path_factory, shared_data) -> dict[str, Path]:
    """A small generated DAPI + IF scan set (passes QC) and a chip without lines (fails)."""
    import tifffile

    from qc.testing.chips import generate_chip, generate_if

    root = tmp_path_factory.mktemp("qcfiles")
    geom = {"width": 2400, "height": 2400, "scale": (0.5, 0.5), "angle_deg": -2.0}
    dapi = generate_chip(data_dir=shared_data, seed=11, **geom)
    tifffile.imwrite(root / f"{CHIP}.tif", dapi.image)
    tifffile.imwrite(
        root / f"{CHIP}_CD31_IF.tif", generate_if(dapi.truth, offset_px=(5, 3), data_dir=shared_data).image
    )
    fail = root / "fail"
    fail.mkdir()
    tifffile.imwrite(fail / "C02533C.tif", generate_chip(data_dir=shared_data, seed=12, lines=False, **geom).image)
    return {"nuclear": root / f"{CHIP}.tif", "if": root / f"{CHIP}_CD31_IF.tif", "fail": fail / "C02533C.tif"}
