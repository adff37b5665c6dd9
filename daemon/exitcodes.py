"""The command line's exit codes and the environment variable naming its config file.

Their own module so the command implementations (``demo``, ``qc``, ``notify
test``) return them without importing :mod:`daemon.cli`, which imports them.
"""

from __future__ import annotations

__all__ = ["CONFIG_ENV", "EXIT_FAILURE", "EXIT_OK", "EXIT_QC_FAIL", "EXIT_USAGE"]

#: Success; a failure the command explained; the command line itself was wrong.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: QC ran and the verdict is fail (`imageqc qc`, `imageqc demo --follow`).
EXIT_QC_FAIL = 3

#: The environment variable that names the config file when ``--config`` is not given.
CONFIG_ENV = "IMAGEQC_CONFIG"
