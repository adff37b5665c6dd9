"""Format detection by content, default names and roles.

The first bytes decide the format; the extension is only a hint used to word
the error when the content matches nothing (a ``.tif`` that is not a TIFF is
damaged; a ``.txt`` is simply not an image).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO

from qc.errors import CorruptImageError, ReadError, UnsupportedFormatError
from qc.io.regular import open_regular

__all__ = ["default_name", "default_role", "detect_format", "sniff_format"]

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_CZI_MAGIC = b"ZISRAWFILE"
_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_SUFFIX = re.compile(r"\.(ome\.tiff?|tiff?|czi)$", re.IGNORECASE)
_ARCHIVE_SUFFIX = re.compile(r"\.(tar\.gz|tgz)$", re.IGNORECASE)
_HINTS = {".tif": "tiff", ".tiff": "tiff", ".czi": "czi", ".gz": "tar.gz", ".tgz": "tar.gz"}
#: Formats we do not read, named by their first bytes so the error says what the file is.
_OTHER_MAGICS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\x00\x00\x00\x0cjP  \r\n", "a JPEG 2000 image"),
    (b"\xffO\xffQ", "a JPEG 2000 codestream"),
    (b"BM", "a BMP image"),
    (b"GIF8", "a GIF image"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (an IPR or h5 file, not an image)"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
)


def sniff_format(head: bytes) -> str | None:
    """The format named by a file's first bytes, or ``None``."""
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head[:10] == _CZI_MAGIC:
        return "czi"
    if head[:2] == _GZIP_MAGIC:
        return "tar.gz"
    return None


def detect_format(path: str | Path, fileobj: BinaryIO | None = None) -> str:
    """Return ``"tiff"``, ``"czi"``, ``"tiles"`` (a folder) or ``"tar.gz"``.

    Raises
    ------
    ReadError
        The path does not exist (:class:`~qc.io.regular.NotRegularFileError`: it is a FIFO,
        socket or device, never opened for reading).
    CorruptImageError
        An empty file, or one whose extension promises a format its bytes do not have.
    UnsupportedFormatError
        Anything else.
    """
    path = Path(path)
    if fileobj is None:
        if path.is_dir():
            return "tiles"
        if not path.exists():
            raise ReadError(path, "no such file or folder", hint="Check the path; the export may have been moved")
        try:
            with open_regular(path) as fh:
                head = fh.read(16)
        except OSError as exc:
            raise ReadError(path, f"cannot be opened ({exc.strerror or exc})") from exc
    else:
        pos = fileobj.tell()
        head = fileobj.read(16)
        fileobj.seek(pos)
    found = sniff_format(head)
    if found is not None:
        return found
    hinted = _HINTS.get(path.suffix.lower())
    if not head:
        raise CorruptImageError(path, "the file is empty (0 bytes)")
    other = next((what for magic, what in _OTHER_MAGICS if head.startswith(magic)), None)
    export = "Export the scan from the microscope software as TIFF (or CZI) and let the new file replace this one"
    if other is not None:
        named = f"the name says {hinted.upper()} but the file is {other}" if hinted else f"the file is {other}"
        raise UnsupportedFormatError(path, f"{named}; imageqc reads TIFF, CZI and QC archives", hint=export)
    if hinted is not None:
        problem = f"the name says {hinted.upper()} but the file does not start with a {hinted.upper()} header"
        raise CorruptImageError(path, problem)
    raise UnsupportedFormatError(path, f"not a TIFF, CZI or QC archive (starts with {head[:8]!r})")


def default_name(path: str | Path) -> str:
    """The scan-set member name: the file stem without ``.tif/.tiff/.ome.tif/.czi/.tar.gz``."""
    name = Path(path).name
    stripped = _IMAGE_SUFFIX.sub("", name)
    if stripped == name:
        stripped = _ARCHIVE_SUFFIX.sub("", name)
    return stripped or name


def default_role(name: str, *, rgb: bool) -> str:
    """``"IF"`` for a name ending ``_IF``, ``"HE"`` for colour images, else ``"nuclear"``."""
    if name.upper().endswith("_IF"):
        return "IF"
    if rgb:
        return "HE"
    return "nuclear"
