"""A checksum of each stored row, saved beside a store: what lets a process check just the rows it
reads rather than the whole blocks that the manifest's checksums cover.

    store.check()              # checks every block and saves the rows' checksums (kblam kb index, kblam serve)
    keys, values, _ = store.view()
    keys[rows]                 # a later process checks these rows' checksums, not their blocks

Why: the manifest keeps a sha256 per block of 256 rows (the commit's own record), which can only be
checked by reading the whole block. A question over a million-triple store reads 256 candidate rows of
keys and of values, spread over about as many blocks: each of a new process's first questions hashed
about 100 MB (benchmarks/speed.py, a new process: 0.209 s to the first token without these checksums,
0.165 s with them; docs/performance.md).
With a crc32 per row it reads and checks its 512 rows of 768 bytes. The candidates' triples too: each
line's offset and crc32 are kept, so a triple is read as its own line, not by reading, hashing and
splitting its block of 256 lines first (about 10 ms a question at a million triples, measured while
developing).

What it still guarantees: the checksums are taken from blocks whose sha256 matched the manifest in the
same pass (``build``), so a row that changed on disk since then is an error when it is read (a crc32
misses random damage with odds of 2^-32). A row that does not match its checksum is not called damaged on
the checksum's word: its block's sha256 decides (``KBStore._read_phys``), so a stale or damaged checksum
file costs speed, never a false alarm, and rows it does not cover are checked by block, as without it.
What it gives up: damage to a row nobody reads is found by ``verify()`` or ``check()``, no longer by
reading a neighbour of it in the same block.

Files (derived data: never part of a commit, ignored whenever in doubt)::

    rowsums-<G>.npz   uint32 crc32 of each of the physical rows [0, R) of the keys, the values and the
                      triples (a line, its newline included), and the R + 1 offsets of those lines
    rowsums-<G>.json  the three data files, R (whole blocks), a fingerprint of those blocks' sha256s in
                      the manifest, and the .npz file's size and sha256

The .npz is not hashed when it is loaded: it vouches for no row by itself (a row is checked against
it, and a mismatch goes to the block's sha256), and numpy's zip reader checks each array's own CRC-32.

Built by ``KBStore.check()`` only (it reads every row: about 3 s at a million triples), never by a
question. Appends keep every committed row where it is, so a saved file stays right for later
generations of the same files; rows appended since are checked by block until the next ``check()``.
``compact()`` and ``rebuild()`` write new files, which drops it.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kblam.store.files import (
    _VERIFIED,
    _block_key,
    _block_shas,
    _Blocks,
    _damage,
    _DerivedFiles,
    _pread_all,
    _whole_block_rows,
)

if TYPE_CHECKING:
    from kblam.store.core import KBStore

FORMAT = "kblam-row-sums"
KINDS = ("keys", "values")  # embedding rows; the triples' lines are kept apart
_DATA = (*KINDS, "triples")
_ON_DISK = _DerivedFiles("rowsums", ".npz")
# Reads of more rows than this are checked by block: a read that large touches most blocks anyway, and a
# crc32 a row is a Python call a row (about 0.5 us) where a block's sha256 is one call.
MOST_ROWS = 65_536


def _crc32_rows(rows) -> np.ndarray:
    """crc32 of each row of a 2-d C-contiguous array, or of each slice of a list of memoryviews."""
    return np.fromiter((zlib.crc32(r) for r in rows), np.uint32, len(rows))


class RowSums:
    """The crc32 of each physical row [0, rows) of a store's keys, values and triples (``sums``), and the
    file offset of each of those triples' lines and of the end of the last (``offsets``, rows + 1)."""

    def __init__(self, sums: dict[str, np.ndarray], offsets: np.ndarray, rows: int):
        self.sums, self.offsets, self.rows = sums, offsets, rows

    def lines(self) -> tuple[np.ndarray, np.ndarray]:
        """(line offsets, crc32 of each line) of the triples: what ``_Lines.take`` reads lines by."""
        return self.offsets, self.sums["triples"]

    def mismatched(self, kind: str, rows: np.ndarray, data: np.ndarray) -> np.ndarray:
        """Those of ``rows`` (physical, below self.rows) whose bytes (``data``: their float16 rows, in
        that order) do not match their checksum."""
        return rows[_crc32_rows(np.ascontiguousarray(data)) != self.sums[kind][rows]]

    def __repr__(self) -> str:
        return f"RowSums({self.rows:,} rows)"


# ------------------------------------------------------------------------------------------ files


def _fingerprint(store: KBStore, rows: int) -> str:
    """The manifest's sha256s of the blocks of the three data files that rows [0, rows) fill."""
    m = store._manifest
    br = int(m["block_rows"])
    h = hashlib.sha256((":".join(m["files"][kind]["name"] for kind in _DATA) + f":{rows}:").encode())
    for kind in _DATA:
        h.update(_block_shas(m["files"][kind], rows // br))
    return h.hexdigest()


def _problem(store: KBStore, info: dict, npz: Path) -> str | None:
    """Why this saved file cannot serve the store, or None."""
    m = store._manifest
    if info.get("format") != FORMAT:
        return "not a kblam row checksum record"
    files = [m["files"][kind]["name"] for kind in _DATA]
    if info.get("files") != files:
        return f"it covers {info.get('files')}, the store's rows are in {files} now"
    rows = info.get("rows")
    if not isinstance(rows, int) or not 0 <= rows <= int(m["rows"]) or rows % int(m["block_rows"]):
        return f"it covers {rows} rows, not whole blocks of the store's {m['rows']}"
    if info.get("fingerprint") != _fingerprint(store, rows):
        return "its fingerprint does not match the store's rows (the file of another store?)"
    try:
        size = npz.stat().st_size
    except FileNotFoundError:
        return f"{npz.name} is missing"
    return None if size == info.get("bytes") else f"{npz.name} has {size} bytes, {info.get('bytes')} were written"


def _load(store: KBStore) -> RowSums | None:
    """The newest usable saved checksums, or None."""
    for info, data in _ON_DISK.usable_npz(store.path, lambda info, npz: _problem(store, info, npz),
                                          ("offsets", *_DATA)):
        sums, offsets = {kind: data[kind] for kind in _DATA}, data["offsets"]
        if (all(s.dtype == np.uint32 and s.shape == (info["rows"],) for s in sums.values())
                and offsets.dtype == np.int64 and offsets.shape == (info["rows"] + 1,)):
            return RowSums(sums, offsets, info["rows"])
    return None


def save(store: KBStore, sums: RowSums) -> bool:
    """Save the checksums for this generation; the writer then drops older files. Best effort: False if
    the folder cannot be written."""
    info = {"format": FORMAT, "version": 1, "files": [store._manifest["files"][kind]["name"] for kind in _DATA],
            "rows": sums.rows, "fingerprint": _fingerprint(store, sums.rows)}
    return _ON_DISK.save_npz(store, {"offsets": sums.offsets, **sums.sums}, info) is not None


def cleanup(store: KBStore, keep: int | None = None) -> None:
    """Writer only: delete checksum files other than generation ``keep``, and temp files a crashed save left."""
    _ON_DISK.cleanup(store.path, keep)


def build(store: KBStore, progress=None) -> RowSums:
    """Check every whole block of the three data files against the manifest's sha256 and keep each row's
    crc32 from the same bytes (and each line's offset); saved unless the saved file covers as many rows.
    Raises KBStoreError naming the damaged rows, as reading them would. ``progress``: called with the rows
    of each embedding block done."""
    m = store._manifest
    rows, br, row_bytes = _whole_block_rows(store._manifest), int(m["block_rows"]), int(m["dim"]) * 2
    sums, offsets = {}, np.zeros(rows + 1, np.int64)
    for kind in _DATA:
        table = _Blocks.from_meta(m["files"][kind], br)
        fh = store._snap.handles[kind]
        st, out, bad = os.fstat(fh.fileno()), np.empty(rows, np.uint32), []
        for b in range(rows // br):
            start, (end, sha) = table.start(b), table.blocks[b]
            data = _pread_all(fh.fileno(), end - start, start)
            key = _block_key(fh, start, end, sha, st)
            if key not in _VERIFIED:
                if len(data) != end - start or hashlib.sha256(data).hexdigest() != sha:
                    bad.append(b)
                    continue
                _VERIFIED.add(key)
            view = memoryview(data)
            if kind == "triples":
                ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1
                if len(ends) != br or ends[-1] != len(data):
                    store._st().phys._read_block(b)  # raises what reading its lines would: not br lines
                offsets[b * br + 1:(b + 1) * br + 1] = ends + start
                cuts = [0, *ends.tolist()]
                out[b * br:(b + 1) * br] = _crc32_rows([view[i:j] for i, j in zip(cuts, cuts[1:], strict=False)])
            else:
                out[b * br:(b + 1) * br] = _crc32_rows([view[i:i + row_bytes] for i in range(0, len(data), row_bytes)])
                if progress is not None:
                    progress(br)
        if bad:
            raise _damage(store.path, kind, table.name, bad, int(m["rows"]), br)
        sums[kind] = out
    built = RowSums(sums, offsets, rows)
    saved = _load(store)
    if saved is None or saved.rows < rows:
        save(store, built)
    store._row_sums = [m["files"]["keys"]["name"], built]
    return built


def current(store: KBStore) -> RowSums | None:
    """The store's saved row checksums, loaded once a process (None when none is usable)."""
    keys_file = store._manifest["files"]["keys"]["name"]
    cached = store._row_sums
    if cached is None or cached[0] != keys_file:
        cached = store._row_sums = [keys_file, _load(store)]
    return cached[1]


def status(store: KBStore) -> str:
    """One line for `kblam kb inspect`: which saved checksums a read would use, or why none."""
    newest = _ON_DISK.newest(store.path, lambda info, npz: _problem(store, info, npz))
    if newest is None:
        return "none saved (KBStore.check() or kblam kb index saves them; reads check whole blocks)"
    record, info, problem = newest
    if problem is not None:
        return f"unusable, reads check whole blocks until the next check(): {record.name}: {problem}"
    added = int(store._manifest["rows"]) - info["rows"]
    return (f"{record.stem}.npz: {info['rows']:,} rows"
            + (f", {added:,} rows added since (checked by block)" if added else ""))
