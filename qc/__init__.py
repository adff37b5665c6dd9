"""imageqc's QC library: readers, metrics and reports for Stereo-seq images.

Pure library code: no daemon imports, no clock, no network. Importable from a
notebook::

    from qc.io import open_scan_set
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("imageqc")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
