"""What every benchmark shares: the machine's description, peak memory, and RESULTS.md sections."""

from __future__ import annotations

import importlib
import os
import platform
import re
import sys
from pathlib import Path

__all__ = ["RESULTS", "cpu_seconds", "machine_info", "peak_rss_mb", "record"]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"cv2": "opencv-python-headless"}.get(name, name)
    try:
        return version(dist)
    except PackageNotFoundError:
        return str(getattr(importlib.import_module(name), "__version__", "?"))


def machine_info(*modules: str) -> str:
    """One line: CPU, cores, RAM, OS, Python and numpy (plus ``modules``) versions, load average."""
    import numpy as np
    import psutil

    versions = [f"Python {platform.python_version()}", f"numpy {np.__version__}"]
    for name in modules:
        versions.append(f"{name} {_version(name)}")
    load = f"; load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return (
        f"{_cpu_model()}; {psutil.cpu_count(logical=True)} logical cores; "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; {platform.system()} {platform.release()}; "
        + "; ".join(versions)
        + load
    )


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return float(psutil.Process().memory_info().peak_wset) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def publish(name: str, lines: list[str], *, save: bool = True) -> str:
    """Print a benchmark's result lines and, when ``save``, put them into RESULTS.md under ``name``."""
    text = "\n".join(lines)
    print(text)
    if save:
        record(name, text)
    return text


def record(name: str, text: str) -> None:
    """Put ``text`` into benchmarks/RESULTS.md between ``<!-- name:start/end -->`` markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}\n"
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _m: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    RESULTS.write_text(new, encoding="utf-8")
