"""The store's saved pre-filter index: FAISS's own file, kept beside the data it indexes.

    pre = store.prefilter()     # the saved index, memory-mapped; built and saved if missing or stale

Files (derived data: never part of a manifest commit, rebuilt whenever in doubt)::

    prefilter-<G>.faiss    ``KBPrefilter.save``: FAISS ``write_index`` of the key rows [0, R) of one keys file
    prefilter-<G>.json     what it covers and how to check it: the keys file, R, a fingerprint of those
                           rows, the .faiss file's size and sha256, and the KBPrefilter settings

``<G>`` is the store generation it was built at. It indexes *physical* rows, not the rows of
``triples()``: a store only ever appends physical rows until ``compact()``/``rebuild()`` writes a new
keys file, so an index of rows [0, R) stays right for every later generation of the same file. On
load, rows appended since (new or updated triples) go into the mapped index's exact side index, and
rows replaced or removed are skipped (``KBPrefilter.set_rows`` maps physical rows to ``triples()``
rows, -1 for hidden ones). Edits therefore never rebuild the index; once the rows added since the
save pass ``max(20,000, R / 20)`` the writer saves a new file with them (adding to the IVF lists
without retraining), and ``compact()``/``rebuild()`` rebuild it for the new keys file.

An index is used only if its keys file is the store's, R is within the store's rows, the fingerprint
matches (the manifest's sha256 of each complete block of those rows, and a hash of the partial
last one), and the .faiss file has its recorded size and sha256 (hashed once per process) and
reads back as R keys of the store's dimension. Any other index (deleted, truncated, damaged,
from before a compaction, from another store) is reported once per process and rebuilt, never used.
A reader that builds one saves it too (best effort: a read-only folder just keeps it in memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kblam.kb import _atomic_write
from kblam.prefilter import KBPrefilter
from kblam.store.files import (
    _I64,
    _block_shas,
    _derived_file_problem,
    _DerivedFiles,
    _pread_all,
    _sha256_file,
)

if TYPE_CHECKING:
    from kblam.store.core import KBStore

FORMAT = "kblam-prefilter"
_ON_DISK = _DerivedFiles("prefilter", ".faiss")
REFRESH_ROWS = 20_000  # rows added since the save after which the writer saves them into the index
_CHECKED: set[tuple[str, int, int, str]] = set()  # .faiss files whose sha256 matched in this process
_WARNED: set[tuple[str, str]] = set()


class IndexRebuildWarning(UserWarning):
    """A saved pre-filter index was missing or could not be used, so it is being rebuilt."""


def _warn_once(store: KBStore, key: str, message: str) -> None:
    if (str(store.path), key) not in _WARNED:
        _WARNED.add((str(store.path), key))
        warnings.warn(message, IndexRebuildWarning, stacklevel=4)


def _fingerprint(store: KBStore, rows: int) -> str:
    """Identifies key rows [0, rows) of the store's keys file: the manifest's sha256 of every complete
    block of them, then a hash of the rows of the partial block (at most one block read)."""
    m = store._manifest
    meta, br = m["files"]["keys"], int(m["block_rows"])
    full = rows // br
    h = hashlib.sha256(f"{meta['name']}:{rows}:{m['dim']}:".encode())
    h.update(_block_shas(meta, full))
    if rows % br:
        store._check("keys", np.asarray([rows - 1]))  # a damaged block is that error, not "another store"
        start, size = full * br * int(m["dim"]) * 2, (rows % br) * int(m["dim"]) * 2
        h.update(_pread_all(store._snap.handles["keys"].fileno(), size, start))
    return h.hexdigest()


def _problem(store: KBStore, info: dict, faiss_file: Path) -> str | None:
    """Why this saved index cannot serve the store, or None."""
    m = store._manifest
    if info.get("format") != FORMAT:
        return "not a kblam pre-filter index record"
    keys_file, rows = m["files"]["keys"]["name"], int(m["rows"])
    if info.get("keys_file") != keys_file:
        return (f"it indexes {info.get('keys_file')}, but the store keeps its keys in {keys_file} now "
                "(compacted or rebuilt since)")
    if not isinstance(info.get("rows"), int) or not 0 <= info["rows"] <= rows:
        return f"it covers {info.get('rows')} rows, the store has {rows}"
    if info.get("fingerprint") != _fingerprint(store, info["rows"]):
        return "its fingerprint does not match the store's keys (an index of another store?)"
    return _derived_file_problem(faiss_file, info, _CHECKED)


def _load(store: KBStore) -> tuple[KBPrefilter | None, int, list[str]]:
    """The newest usable saved index (memory-mapped), the rows it covers, and what was wrong with the
    saved indexes tried before it."""
    problems = []
    for generation, record in _ON_DISK.saved(store.path):
        faiss_file = _ON_DISK.paths(store.path, generation)[0]
        try:
            info = json.loads(record.read_text(encoding="utf-8"))
            problem = _problem(store, info, faiss_file) if isinstance(info, dict) else "not a JSON object"
            info = info if isinstance(info, dict) else {}
            if problem is None:
                pre = KBPrefilter.load(faiss_file, info["settings"], mmap=True)
                if pre.ntotal != info["rows"] or pre.dim != store.dim:
                    raise ValueError(f"it holds {pre.ntotal} x {pre.dim} keys, not {info['rows']} x {store.dim}")
                return pre, info["rows"], problems
        except FileNotFoundError:
            continue  # replaced by a newer save meanwhile
        except (ValueError, KeyError, TypeError) as err:
            problem = str(err)
        problems.append(f"{record.stem}: {problem}")
    return None, 0, problems


def build(store: KBStore, *, progress: bool | None = None, **options: Any) -> tuple[KBPrefilter, int]:
    """Build an index over all the store's physical key rows (checked) and try to save it."""
    from kblam.store.core import _progress

    rows = int(store._manifest["rows"])
    store._check("keys")
    t0 = time.perf_counter()
    with _progress(rows, progress, "pre-filter index (training, then adding keys)") as bar:
        pre = KBPrefilter(store._map("keys"), on_added=bar.update, **options)
    save(store, pre, rows, time.perf_counter() - t0)
    return pre, rows


def save(store: KBStore, pre: KBPrefilter, rows: int, built_s: float | None = None) -> bool:
    """Save ``pre`` (an index of physical rows [0, rows)) for this generation; the writer then drops
    older index files. Best effort for readers: False if the folder cannot be written."""
    generation = store.generation
    faiss_file, record = _ON_DISK.paths(store.path, generation)
    try:
        settings = pre.save(faiss_file)
        info = {"format": FORMAT, "version": 1, "generation": generation,
                "keys_file": store._manifest["files"]["keys"]["name"], "rows": rows,
                "fingerprint": _fingerprint(store, rows), "bytes": faiss_file.stat().st_size,
                "sha256": _sha256_file(faiss_file), "settings": settings,
                "built_s": None if built_s is None else round(built_s, 2)}
        _atomic_write(record, json.dumps(info, indent=1) + "\n")  # the record makes the index visible
    except OSError as err:  # a read-only folder, a full disk: the index still serves this process
        for leftover in (faiss_file, record):
            with contextlib.suppress(OSError):
                if leftover.exists() and not record.exists():
                    leftover.unlink()
        _warn_once(store, "save", f"{store.path}: could not save the pre-filter index ({err}); it is kept "
                                  "in memory for this process only")
        return False
    _CHECKED.add((str(faiss_file), faiss_file.stat().st_ino, info["bytes"], info["sha256"]))
    if not store.readonly:
        cleanup(store, keep=generation)
    return True


def cleanup(store: KBStore, keep: int | None = None) -> None:
    """Writer only: delete index files other than generation ``keep`` (default: none kept), and
    temp files a crashed save left."""
    _ON_DISK.cleanup(store.path, keep)


def current(store: KBStore, *, progress: bool | None = None) -> KBPrefilter:
    """The index for the store's current generation, rows numbered as ``triples()``."""
    keys_file = store._manifest["files"]["keys"]["name"]
    cached = store._index
    if cached is None or cached[0] != keys_file:
        pre, covered, problems = _load(store)
        rows = int(store._manifest["rows"])
        if pre is None:
            why = ("the saved one cannot be used (" + "; ".join(problems) + ")" if problems else
                   "none is saved (first use, or it was deleted)")
            _warn_once(store, "rebuild:" + keys_file + ":" + "; ".join(problems),
                       f"{store.path}: building the pre-filter index over {rows:,} keys, as {why}; it is "
                       "saved in the store for the next process")
            pre, covered = build(store, progress=progress)
        elif problems:
            _warn_once(store, "ignored:" + "; ".join(problems), f"{store.path}: ignoring saved pre-filter "
                       f"indexes that cannot be used ({'; '.join(problems)}); using an older valid one")
        cached = store._index = [keys_file, pre, covered, None]
    pre, covered = cached[1], cached[2]
    rows = int(store._manifest["rows"])
    if covered < rows:  # rows appended since the index was saved (or since the last call)
        pre.add(store._read_phys("keys", np.arange(covered, rows, dtype=_I64)))
        cached[2] = rows
    if cached[3] != store.generation:
        st = store._st()
        if not st.identity() or pre._rows_of is not None:
            rows_of = np.full(rows, -1, dtype=_I64)
            rows_of[st.order()] = np.arange(len(st.base), dtype=_I64)
            pre.set_rows(rows_of)
        cached[3] = store.generation
    return pre


def refresh(store: KBStore) -> None:
    """Writer, after a commit: fold the rows added since the save into a new saved index once they
    are many (IVF: assigned to the trained lists, no retraining). Cheap when there is nothing to do."""
    saved = _ON_DISK.saved(store.path)
    if not saved:
        return
    try:
        info = json.loads(saved[0][1].read_text(encoding="utf-8"))
        covered, keys_file = int(info["rows"]), info["keys_file"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # current() reports and rebuilds it when it is next used
    rows = int(store._manifest["rows"])
    if keys_file != store._manifest["files"]["keys"]["name"] or rows - covered <= max(REFRESH_ROWS, covered // 20):
        return
    faiss_file = _ON_DISK.paths(store.path, saved[0][0])[0]
    if _problem(store, info, faiss_file) is not None:
        return
    pre = KBPrefilter.load(faiss_file, info["settings"], mmap=False)
    pre.add(store._read_phys("keys", np.arange(covered, rows, dtype=_I64)))
    save(store, pre, rows)
    store._index = None  # the next current() maps the new file


def rebuild(store: KBStore, *, progress: bool | None = None) -> KBPrefilter | None:
    """Writer, after compact()/rebuild(): if an index was saved, build one for the new keys file with
    the same settings (the old one indexes rows that no longer exist)."""
    saved = _ON_DISK.saved(store.path)
    if not saved:
        return None
    options: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        settings = json.loads(saved[0][1].read_text(encoding="utf-8"))["settings"]
        options = {"kind": settings["kind"]}
        if settings.get("nprobe_given"):
            options["nprobe"] = settings["nprobe"]
    store._index = None
    pre, covered = build(store, progress=progress, **options)
    store._index = [store._manifest["files"]["keys"]["name"], pre, covered, None]
    return current(store)


def status(store: KBStore) -> str:
    """One line for `kblam kb inspect/verify`: which saved index would be used, or why none."""
    saved = _ON_DISK.saved(store.path)
    if not saved:
        return "none saved (built on first use above the pre-filter threshold)"
    problems = []
    for generation, record in saved:
        try:
            info = json.loads(record.read_text(encoding="utf-8"))
            problem = _problem(store, info, _ON_DISK.paths(store.path, generation)[0])
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = str(err)
        if problem is None:
            kind = info["settings"]["kind"]
            added = int(store._manifest["rows"]) - info["rows"]
            return (f"{record.stem}.faiss: {kind}, {info['rows']:,} key rows"
                    + (f", {added:,} added since (searched exactly beside it)" if added else ""))
        problems.append(f"{record.name}: {problem}")
    return "unusable, rebuilt on next use: " + "; ".join(problems)
