"""Reading KB files as text, with errors that name the file, the encoding and the position."""

from __future__ import annotations

import codecs
import errno
import os
import stat
from pathlib import Path

from kblam.kb import KBFormatError

# Byte-order marks we decode without being told the encoding (UTF-32 first: its LE mark starts with
# UTF-16's). Windows tools (PowerShell's Out-File, Excel's "Unicode text") write UTF-16 with a BOM.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def check_file(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError / OSError / KBFormatError naming it.

    os.stat rather than Path.exists(): exists() answers False for a symbolic-link loop or an
    unreadable directory, which would then be reported as "not found".
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        what = "a symbolic link to a missing file" if p.is_symlink() else "knowledge base file not found"
        raise FileNotFoundError(errno.ENOENT, what, os.fspath(path)) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "symbolic link loop (too many levels of symbolic links)",
                          os.fspath(path)) from None
        raise  # PermissionError and friends already name the path
    if stat.S_ISDIR(mode):
        raise KBFormatError("is a directory, not a file", path=path)
    if not stat.S_ISREG(mode):
        # Reading a FIFO or a device such as /dev/zero would block or never end.
        raise KBFormatError("is not a regular file (a pipe, socket or device)", path=path)
    return p


def _looks_like_utf16(raw: bytes) -> str | None:
    """'utf-16-le' / 'utf-16-be' when a BOM-less file has NUL bytes in every other position."""
    head = raw[:2000]
    if len(head) < 4:
        return None
    even, odd = head[0::2], head[1::2]
    if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.1 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.1 * len(odd):
        return "utf-16-be"
    return None


def read_text(path: str | os.PathLike, encoding: str | None = None, *, utf8_only: bool = False) -> str:
    """Decode a whole file: UTF-8, or UTF-16/32 when the file starts with their BOM, unless
    ``encoding`` is given. ``utf8_only`` (JSON) changes only the hint: JSON has no encoding option.

    KB files are small enough to read at once, and decoding the bytes ourselves lets the
    error say exactly where the bad byte is.
    """
    p = check_file(path)
    raw = p.read_bytes()
    codec = encoding or next((c for bom, c in _BOMS if raw.startswith(bom)), "utf-8-sig")
    utf16 = None if encoding or codec != "utf-8-sig" else _looks_like_utf16(raw)
    if utf16:
        # Valid UTF-8 as far as the decoder goes (NUL is a character), but every other character NUL.
        fix = "re-save it as UTF-8" if utf8_only else f"pass encoding={utf16!r} or re-save it as UTF-8"
        raise KBFormatError(f"looks like {utf16.upper()} text without a byte-order mark; {fix}", path=path)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        # Counting b"\n" gives the line in any ASCII-compatible encoding, not in UTF-16/32.
        wide = codecs.lookup(codec).name.startswith(("utf-16", "utf-32"))
        line = None if wide else raw.count(b"\n", 0, err.start) + 1
        tried = f"encoding {encoding!r}" if encoding else (
            "UTF-8 (with or without BOM)" if codec == "utf-8-sig" else f"{codec.upper()} (from its byte-order mark)")
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
