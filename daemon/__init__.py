"""imageqc's service: configuration, discovery, job store, workers, uploads, CLI."""

from qc import __version__

__all__ = ["__version__"]
