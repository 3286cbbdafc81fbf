"""The entity names a KBStore holds, saved beside it: what lets a question over a store be encoded once,
and an edit of a large store find its triples without reading them all.

    names = store.entity_names()   # loaded once a process (built and saved if missing), kept current
    names.get("marie")             # read as kblam.confidence.entity_names' dict is, by masked_guess

Why: ``ask`` encodes a question together with its guess of what the confidence encodes after the
forward pass, the question without the entity it names (``kblam.confidence.masked_guess``), so that
the encoder runs once a question. A KnowledgeBase's names come from its triples; a store's million
triples are not read for a question, so without this index each question over a store paid a second
encoder call (about 15 ms here). The index holds a 64-bit hash of every entity name (its words in lower
case, joined by one space) and of each name's first word, sorted: 16 bytes a name, read by binary search;
and the store's property names, up to PROPERTIES_KEPT of them, which the confidence compares with the
question (encoded with a KB's first question, as a KnowledgeBase's are: kblam.answer). And a row table,
each row's exact name hashed, sorted, beside the row (16 bytes a row): where ``KBStore._slots`` finds the
rows of the entity an edit touches instead of reading every triple (docs/scale.md).

Nothing in an answer depends on it: a hash two texts share, or the name of an entity removed since, only
makes a guess that misses, and the confidence then encodes what it reads itself (a second call). Nor
does an edit: the store reads the rows the table gives, skips those replaced or removed since (its
overlay) and those of another name.

Files (derived data: never part of a manifest commit, rebuilt whenever in doubt)::

    names-<G>.npz    the two sorted uint64 arrays and the row table, numpy's own format
    names-<G>.json   what it covers: the triples file, its first R rows (whole blocks of lines), the
                     manifest's sha256 of those blocks, and the .npz file's size and sha256; the
                     property names (null when more than PROPERTIES_KEPT)

Like the pre-filter index (kblam.store.index) it covers *physical* rows, which only grow until
``compact()``/``rebuild()`` writes a new triples file, so a saved file stays right for every later
generation of the same file: rows appended since are parsed when it is loaded (once a process), and
saved into a new file once they pass max(20,000, R / 20). A file that cannot be used is rebuilt,
never read (a missing name would only cost speed, but a wrong array is cheaper to rule out than to
reason about).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kblam.kb import words
from kblam.store.files import _block_shas, _derived_file_problem, _DerivedFiles, _whole_block_rows

if TYPE_CHECKING:
    from kblam.store.core import KBStore

FORMAT = "kblam-names"
_ON_DISK = _DerivedFiles("names", ".npz")
REFRESH_ROWS = 20_000
PROPERTIES_KEPT = 1024  # kblam.answer encodes up to as many of a KB's property names with its first question
_CHECKED: set[tuple[str, int, int, str]] = set()  # .npz files whose sha256 matched in this process


def _key(text: str) -> int:
    # blake2b, not hash(): the same in every process (Python salts str hashes), and cheap (~1 us a name).
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _has(sorted_keys: np.ndarray, text: str) -> bool:
    key = np.uint64(_key(text))
    i = int(np.searchsorted(sorted_keys, key))
    return i < len(sorted_keys) and sorted_keys[i] == key


def _sorted(keys: Iterable[int]) -> np.ndarray:
    return np.array(sorted(set(keys)), dtype=np.uint64)


class NameIndex:
    """Which entity names a store holds, read the way ``masked_guess`` reads the dict of
    ``kblam.confidence.entity_names``: ``get(word)`` is truthy when some name starts with that word,
    and ``run in index`` tests a run of words (lower case, joined by one space); ``index[run]`` gives
    the run itself, which ``name_match`` reads as it reads the name it stands for.

    Also the physical rows of each exact name (``rows_of``): where an edit finds the triples it changes
    without reading every triple (``KBStore``: a row may have been replaced or removed since, which the
    store's overlay says, and a hash may be shared: the store reads the rows and checks)."""

    def __init__(self, names: np.ndarray, firsts: np.ndarray, properties: Iterable[str] | None = (),
                 row_keys: np.ndarray | None = None, rows: np.ndarray | None = None):
        self._names, self._firsts = names, firsts  # sorted uint64 hashes
        self._added: set[str] = set()  # names of rows parsed since the saved arrays, as runs of words
        self._added_firsts: set[str] = set()
        # The property names, None once there are more than PROPERTIES_KEPT.
        self.properties: set[str] | None = None if properties is None else set(properties)
        # Each saved row's exact name, hashed, sorted; and the row, in that order.
        self._row_keys = np.zeros(0, np.uint64) if row_keys is None else row_keys
        self._rows = np.zeros(0, np.int64) if rows is None else rows
        self._added_rows: dict[str, list[int]] = {}  # exact name -> rows parsed since the saved arrays

    @classmethod
    def of(cls, triples: Iterable, first_row: int = 0) -> NameIndex:
        index = cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        index.add(triples, first_row)
        names, firsts, row_keys, rows = index.arrays()
        return cls(names, firsts, index.properties, row_keys, rows)

    def add(self, triples: Iterable, first_row: int) -> None:
        """The triples of rows first_row, first_row + 1, ..."""
        for row, t in enumerate(triples, start=first_row):
            if self.properties is not None:
                self.properties.add(t.property)
                if len(self.properties) > PROPERTIES_KEPT:
                    self.properties = None
            rows = self._added_rows.get(t.name)
            if rows is None:
                rows = self._added_rows[t.name] = []
                if w := words(t.name):
                    self._added.add(" ".join(w))
                    self._added_firsts.add(w[0])
            rows.append(row)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The sorted hashes and the row table, what was added since included (what a save writes)."""
        if not self._added_rows:
            return self._names, self._firsts, self._row_keys, self._rows
        added = _sorted(_key(run) for run in self._added)
        firsts = _sorted(_key(first) for first in self._added_firsts)
        keys = np.concatenate([self._row_keys, np.fromiter(
            (_key(name) for name, rows in self._added_rows.items() for _ in rows), np.uint64)])
        rows = np.concatenate([self._rows, np.fromiter(
            (r for rows in self._added_rows.values() for r in rows), np.int64)])
        order = np.argsort(keys, kind="stable")
        return (np.union1d(self._names, added).astype(np.uint64), np.union1d(self._firsts, firsts).astype(np.uint64),
                keys[order], rows[order])

    def rows_of(self, name: str) -> list[int]:
        """The physical rows that held a triple of this exact name, in order (and maybe rows of another
        name whose hash is the same)."""
        key = np.uint64(_key(name))
        lo, hi = np.searchsorted(self._row_keys, key, "left"), np.searchsorted(self._row_keys, key, "right")
        return sorted(set(self._rows[lo:hi].tolist()).union(self._added_rows.get(name, ())))

    def __len__(self) -> int:
        return len(self._names) + len(self._added)  # an upper bound: an added name may be saved too

    def get(self, word: str, default=None):
        return self if word in self._added_firsts or _has(self._firsts, word) else default

    def __contains__(self, run: object) -> bool:
        return isinstance(run, str) and (run in self._added or _has(self._names, run))

    def __getitem__(self, run: str) -> str:
        if run not in self:
            raise KeyError(run)
        return run

    def __repr__(self) -> str:
        return f"NameIndex({len(self):,} names)"


# ------------------------------------------------------------------------------------------ files


def _fingerprint(store: KBStore, rows: int) -> str:
    m = store._manifest
    meta, br = m["files"]["triples"], int(m["block_rows"])
    h = hashlib.sha256(f"{meta['name']}:{rows}:".encode())
    h.update(_block_shas(meta, rows // br))
    return h.hexdigest()


def _problem(store: KBStore, info: dict, npz: Path) -> str | None:
    """Why this saved index cannot serve the store, or None."""
    m = store._manifest
    if info.get("format") != FORMAT:
        return "not a kblam name index record"
    triples_file = m["files"]["triples"]["name"]
    if info.get("triples_file") != triples_file:
        return f"it covers {info.get('triples_file')}, the store's triples are in {triples_file} now"
    rows = info.get("rows")
    if not isinstance(rows, int) or not 0 <= rows <= int(m["rows"]) or rows % int(m["block_rows"]):
        return f"it covers {rows} rows, not whole blocks of the store's {m['rows']}"
    if info.get("fingerprint") != _fingerprint(store, rows):
        return "its fingerprint does not match the store's triples (an index of another store?)"
    return _derived_file_problem(npz, info, _CHECKED)


def _load(store: KBStore) -> tuple[NameIndex | None, int]:
    """The newest usable saved index and the rows it covers, or (None, 0)."""
    for info, data in _ON_DISK.usable_npz(store.path, lambda info, npz: _problem(store, info, npz),
                                          ("names", "firsts", "row_keys", "rows")):
        names, firsts, row_keys, rows = data["names"], data["firsts"], data["row_keys"], data["rows"]
        if (names.dtype != np.uint64 or firsts.dtype != np.uint64 or len(names) != info.get("names")
                or row_keys.dtype != np.uint64 or rows.dtype != np.int64 or len(rows) != len(row_keys)
                or len(rows) < info["rows"]):
            continue
        properties = info.get("properties", False)
        if properties is not None and not (isinstance(properties, list) and all(isinstance(p, str) for p in properties)):
            continue
        return NameIndex(names, firsts, properties, row_keys, rows), info["rows"]
    return None, 0


def save(store: KBStore, index: NameIndex, rows: int) -> bool:
    """Save ``index`` (the names of physical rows [0, rows), whole blocks, and maybe more) for this
    generation; the writer then drops older files. Best effort: False if the folder cannot be written."""
    names, firsts, row_keys, rows_table = index.arrays()
    info = {"format": FORMAT, "version": 1, "triples_file": store._manifest["files"]["triples"]["name"],
            "rows": rows, "fingerprint": _fingerprint(store, rows), "names": len(names),
            "properties": None if index.properties is None else sorted(index.properties)}
    saved = _ON_DISK.save_npz(store, {"names": names, "firsts": firsts, "row_keys": row_keys, "rows": rows_table},
                              info)
    if saved is None:
        return False
    npz, info = saved
    _CHECKED.add((str(npz), npz.stat().st_ino, info["bytes"], info["sha256"]))
    return True


def cleanup(store: KBStore, keep: int | None = None) -> None:
    """Writer only: delete name index files other than generation ``keep``, and temp files a crashed
    save left."""
    _ON_DISK.cleanup(store.path, keep)


def build(store: KBStore) -> tuple[NameIndex, int]:
    """The names of the committed rows in whole blocks, parsed a block at a time, saved."""
    rows = _whole_block_rows(store._manifest)
    index = NameIndex.of(store._st().phys.stream(0, rows))  # rows 0, 1, ...
    save(store, index, rows)
    return index, rows


def current(store: KBStore) -> NameIndex:
    """The store's name index, names of rows appended since its save included."""
    st = store._st()
    triples_file = store._manifest["files"]["triples"]["name"]
    cached = store._names
    if cached is None or cached[0] != triples_file:
        index, covered = _load(store)
        if index is None:
            index, covered = build(store)
        elif (whole := _whole_block_rows(store._manifest)) - covered > max(REFRESH_ROWS, covered // 20):
            index.add(st.phys.stream(covered, whole), covered)
            covered = whole
            save(store, index, covered)
        cached = store._names = [triples_file, index, covered]
    index, covered = cached[1], min(cached[2], len(st.phys))  # fewer rows: a failed change was rolled back
    if covered < len(st.phys):  # rows appended since the save, or since the last call
        index.add(st.phys.stream(covered), covered)
        cached[2] = len(st.phys)
    return index


def status(store: KBStore) -> str:
    """One line for `kblam kb inspect`: which saved name index a question would load, or why none."""
    newest = _ON_DISK.newest(store.path, lambda info, npz: _problem(store, info, npz))
    if newest is None:
        return "none saved (built with the first question)"
    record, info, problem = newest
    if problem is not None:
        return f"unusable, rebuilt with the next question: {record.name}: {problem}"
    added = int(store._manifest["rows"]) - info["rows"]
    return (f"{record.stem}.npz: {info['names']:,} names of {info['rows']:,} rows"
            + (f", {added:,} rows added since (read on load)" if added else ""))
