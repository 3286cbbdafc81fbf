"""Reading KB files as text, with errors that name the file, the encoding and the position."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kblam.kb import KBFormatError


def check_file(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError / KBFormatError naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, "knowledge base file not found", os.fspath(path))
    if p.is_dir():
        raise KBFormatError("is a directory, not a file", path=path)
    return p


def read_text(path: str | os.PathLike, encoding: str | None = None, *, utf8_only: bool = False) -> str:
    """Decode a whole file (UTF-8 with or without BOM unless ``encoding`` is given).

    KB files are small enough to read at once, and decoding the bytes ourselves lets the
    error say exactly where the bad byte is.
    """
    p = check_file(path)
    raw = p.read_bytes()
    codec = encoding or "utf-8-sig"
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        tried = f"encoding {encoding!r}" if encoding else "UTF-8 (with or without BOM)"
        if utf8_only:
            hint = "; JSON must be UTF-8, re-save the file as UTF-8"
        elif encoding is None:
            hint = "; pass the file's encoding, e.g. encoding='cp1252' or 'latin-1'"
        else:
            hint = ""
        raise KBFormatError(
            f"cannot decode as {tried}: byte 0x{raw[err.start]:02x} at byte offset {err.start} "
            f"({err.reason}){hint}", path=path, line=line) from None
    # An explicit encoding such as 'utf-8' leaves the BOM in; it would corrupt the first header.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise KBFormatError("file is empty", path=path)
    return text
