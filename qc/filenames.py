"""File names imageqc derives from other names, kept within the platform's limits.

Every name imageqc makes from an image's or a chip's name (pictures, output
folders and archives, temporary copies) goes through :func:`fit_name`, so a
long name from the microscope (a 250-character IF name) never makes a derived
name the file system refuses. The limit is 255 bytes of UTF-8 per path
component: Linux and macOS count bytes, NTFS counts UTF-16 units, and a
string's UTF-8 length is never below its UTF-16 length, so a name that fits
here fits everywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket

__all__ = ["HASH_CHARS", "MAX_NAME_BYTES", "fit_name", "host_tag", "writer_tag"]

#: The longest path component, in UTF-8 bytes, on the file systems imageqc meets.
MAX_NAME_BYTES = 255
#: Hex digits of the SHA-256 of the whole name appended when a name is cut.
HASH_CHARS = 10


def fit_name(name: str, suffix: str = "", *, limit: int = MAX_NAME_BYTES) -> str:
    """``name + suffix``, its ``name`` part cut so the whole fits in ``limit`` UTF-8 bytes.

    A name that fits is returned unchanged. A longer one keeps its beginning
    (cut at a character boundary, so it stays readable) followed by ``~`` and
    the first :data:`HASH_CHARS` hex digits of the SHA-256 of the full
    ``name``, so two long names that share their beginning stay apart and the
    same name always gives the same result. ``suffix`` (an extension, a
    temporary-file tag) is never cut.

    Parameters
    ----------
    name : str
        The part that may be shortened.
    suffix : str
        Appended whole, e.g. ``"_track.png"``.
    limit : int
        The budget in UTF-8 bytes (default :data:`MAX_NAME_BYTES`); pass less
        when more will be added to the result later.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        ``suffix`` alone leaves no room for a shortened name.
    """
    full = name + suffix
    if _size(full) <= limit:
        return full
    tag = "~" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_CHARS]
    room = limit - _size(tag + suffix)
    if room < 1:
        msg = f"the suffix {suffix!r} leaves no room for a name within {limit} bytes"
        raise ValueError(msg)
    head, used = [], 0
    for ch in name:  # whole characters only: a cut never splits a multi-byte one
        used += _size(ch)
        if used > room:
            break
        head.append(ch)
    return "".join(head) + tag + suffix


def _size(text: str) -> int:
    """UTF-8 bytes of ``text``; a byte that was not UTF-8 (kept as a surrogate escape) counts one."""
    return len(text.encode("utf-8", "surrogateescape"))


def host_tag() -> str:
    """This host's name as it appears in temporary names (letters, digits and ``-``; at most 40)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def writer_tag() -> str:
    """``<host>-<pid>``: put in temporary names, so the leftovers of a killed writer can be told from live ones."""
    return f"{host_tag()}-{os.getpid()}"
