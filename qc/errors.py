"""Errors raised by the QC library.

Every error says what is wrong, where (file, field), and what to do next.
The CLI and the service turn them into one clear line and an exit code.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ChipSerialError",
    "CorruptImageError",
    "ImageTooLargeError",
    "ModelError",
    "QCError",
    "ReadError",
    "ScanSetError",
    "UnsafeArchiveError",
    "UnsupportedFormatError",
]


class QCError(Exception):
    """Root of all errors raised by :mod:`qc`."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        self.message = message
        if hint:
            self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:  # message, then what to do
        if self.hint:
            return f"{self.message}. {self.hint}"
        return self.message


class ReadError(QCError):
    """An image file or folder could not be read."""

    def __init__(self, path: str | os.PathLike[str], problem: str, *, hint: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", hint=hint)


class UnsupportedFormatError(ReadError):
    """The file exists but is not a format imageqc reads."""

    hint = "Export the scan as TIFF, CZI or a tile folder named <chip> or <chip>_<IF>_IF"


class CorruptImageError(ReadError):
    """The file is truncated or its structure is inconsistent."""

    hint = "Re-export the image from the microscope software; if it is still being written, wait"


class ImageTooLargeError(ReadError):
    """A header declares dimensions beyond the configured limits (refused before allocating)."""

    hint = "If the image is genuine, raise qc.max_pixels in the config"


class UnsafeArchiveError(ReadError):
    """An archive member would escape the archive (absolute path, '..', link out)."""

    hint = "The archive was not written by imageqc or was tampered with; do not unpack it"


class ScanSetError(QCError):
    """The scan set as a whole is not usable (missing nuclear image, mixed chips, ...)."""


class ModelError(QCError):
    """An ONNX model is missing, unreadable or does not match its declared classes."""


class ChipSerialError(QCError):
    """A chip serial or template name is not recognised."""
