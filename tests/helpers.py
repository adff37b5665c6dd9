"""Small helpers shared by the tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable


def wait_for(pred: Callable[[], object], timeout: float = 30.0, every: float = 0.05) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def dead_pid() -> int:
    """The process id of a child that has already exited (nothing runs under it now)."""
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(out.stdout)
