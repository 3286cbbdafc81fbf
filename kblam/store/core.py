"""A persistent knowledge-base store: triples and their key/value embeddings in one folder.

    store = KBStore.create("facts.kbstore", encoder)      # or KBStore.open(path, encoder)
    store.add(kb)                                         # encodes only what is new or changed
    store.update("gold", "symbol", "Au")                  # re-encodes one value text
    emb = store.embeddings()                              # KBEmbeddings for the model
    index = store.prefilter()                             # the FAISS pre-filter saved in the store

The store holds one value per (name, property): adding a triple whose (name, property) is already
stored with another value *updates* it, in place (its index is kept, as ``KnowledgeBase.update``).
A multi-valued fact (a JSON list value in a KnowledgeBase) therefore keeps its last value, with a
warning. Each ``add()`` is atomic, however many batches it streams.

Layout (every file name is referenced from the manifest; ``<G>`` is the generation that started it)::

    manifest.json          the single commit point: format/version, generation, count, dim, encoder
                           name, templates, dtype, and for each data file its name, committed byte
                           length and a sha256 per block of 256 rows; plus a checksum of itself
    triples-<G>.jsonl      one {"name", "property", "value"} object per physical row (append-only)
    keys-<G>.f16           raw little-endian float16 rows (rows, dim): row i belongs to line i
    values-<G>.f16         the same for value embeddings
    overlay-<G>.i64        only while rows are updated/removed and not yet compacted: int64 "hidden"
                           physical rows, then (slot, row) pairs saying which newer row now holds a slot
    writer.lock            flock()ed by the single writer; holds its pid
    prefilter-<G>.faiss    the saved pre-filter index and its record (.json): derived data, checked
                           before use and rebuilt when in doubt (``kblam.store.index``)
    names-<G>.npz          the entity names' hashes and their record (.json): derived data the same
                           way (``kblam.store.names``)

Why not fixed names (``keys.f16``)? Appends can go to the same file, but a rewrite (``compact()``,
``rebuild()``) must not touch files the committed manifest still names, so it writes new files and
the manifest switches to them in one atomic step; the generation in the name keeps them apart.
Physical rows only ever grow until ``compact()``, which writes fresh, dense files under new names.
Logical order (the order of ``triples()``, ``embeddings()`` and ``key_matrix()``) is the physical
order of the live *slots* (rows not hidden), each slot showing the newest row that replaced it.
Without an overlay (a fresh or compacted store) logical rows are physical rows, so ``key_matrix()``
is a read-only memmap with no copy.

Durability. A mutation appends rows to the three data files (and/or writes a new overlay file under
a new name), fsyncs them and the folder, then commits by writing ``manifest.json`` atomically (temp
file in the folder, fsync, ``os.replace``, fsync of the folder). Nothing a committed manifest refers
to is ever modified: appends land past its committed lengths, and compaction writes new files and
deletes the old ones only after the new manifest is durable. So a crash at any point leaves either
the previous manifest (the appended tail is uncommitted garbage: ignored, reported by a warning and
truncated by the next writer) or the new one (all its data fsynced before it). A call that returned
was committed. Readers take no lock: they read the manifest, open its files and read only the
committed prefix; if a writer deleted a file in between (compaction), they re-read the manifest.

Checksums: sha256 per block of 256 rows (for the JSONL file, per 256 lines) lets an append re-hash
only the last partial block. ``open()`` checks sizes only and reads no row: a truncated embedding file
is reported with the rows still intact and the way out, ``KBStore.rebuild(path, encoder)``, which
re-encodes every embedding from ``triples-<G>.jsonl``. Every block is checked against its sha256 the
first time one of its rows is read in a process (so a flipped byte is an error, not an answer), and
``verify()`` re-reads everything. Triples are parsed when first read, too: a question over a
million-triple store (``view()``) reads its candidates' rows and triples only.

Encoding bypasses ``KBEncoder``'s per-text cache (at a million triples it would hold gigabytes):
the store itself is the cache. New triples are encoded in batches of 4096 with texts de-duplicated,
an update re-encodes only its value text (its key row is copied), and a value text already stored
(e.g. a year or a country shared by many facts) is copied from its stored row instead of encoded.

One writer at a time (``fcntl.flock``; POSIX only). A ``KBStore`` object is not thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from kblam.kb import (
    KEY_TEMPLATE,
    VALUE_TEMPLATE,
    KBFormatError,
    KnowledgeBase,
    Triple,
    _atomic_write,
    normalize_field,
)
from kblam.store.files import (
    _DATA,
    _F16,
    _I64,
    _OWN_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    KBStoreError,
    _Blocks,
    _check_blocks,
    _check_sizes,
    _file_name,
    _fsync_dir,
    _Lines,
    _lock,
    _manifest_text,
    _pid_alive,
    _read_lock_pid,
    _read_manifest,
    _read_overlay,
    _row_ranges,
    _Snapshot,
    _triple_line,
)

if TYPE_CHECKING:
    from kblam.encoder import KBEmbeddings, KBEncoder
    from kblam.prefilter import KBPrefilter
    from kblam.store.names import NameIndex

# A store of more rows than this looks up the triples a small change touches through its name index
# (KBStore._slots) instead of reading every triple first: a process's first edit of a million-triple
# store and a question took 5.7 to 10.3 s reading them all, 0.8 to 1.3 s through the index
# (benchmarks/speed.py); reading is linear in the rows, a twentieth of that at 50,000.
SLOT_MAP_ROWS = 50_000

# Rows per checksum block. A block is checked whole the first time any of its rows is read, and a
# question's 256 candidates are spread over as many blocks: 256 rows (192 KB of 384-d keys) keep the
# first questions over a million-row store from hashing most of its 1.5 GB of embeddings (4096 rows
# did), for a manifest of ~12,000 block entries (~1 MB) at that size. Once check() has saved each row's
# own checksum (kblam.store.rowsums), reads check rows instead.
BLOCK_ROWS = 256
BATCH_SIZE = 4096  # triples encoded and appended per step of add()/rebuild()
# The bytes of a stored line around its three strings: {"name":"","property":"","value":""}
_RECORD_OVERHEAD = len(_triple_line(Triple("n", "p", "v"))) - 1 - 3


def _as_triple(item: Any, number: int) -> Triple:
    try:
        if isinstance(item, Triple):
            return item
        if isinstance(item, dict):
            missing = [f for f in ("name", "property", "value") if f not in item]
            if missing:
                raise KBFormatError(f"record {item!r:.80} has no {', '.join(map(repr, missing))} key "
                                    "(KnowledgeBase.from_records understands other column names)")
            return Triple(item["name"], item["property"], item["value"])
        if isinstance(item, (tuple, list)) and len(item) == 3:
            return Triple(*item)
        raise KBFormatError(f"expected a Triple, a (name, property, value) tuple or a dict, got "
                            f"{type(item).__name__} {item!r:.80}")
    except KBFormatError as err:
        raise KBFormatError(err.reason, path="<KBStore.add>", line=number, unit="item") from None


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress(total: int | None, show: bool | None, desc: str):
    from tqdm.auto import tqdm

    if show is None:
        show = sys.stderr.isatty()
    return tqdm(total=total, unit="triple", desc=desc, disable=not show, dynamic_ncols=True)


def _encode_texts(encoder: KBEncoder, texts: list[str]) -> np.ndarray:
    """(n, dim) float32 for distinct texts, straight from the sentence encoder (no per-text cache)."""
    if not texts:
        return np.empty((0, encoder.dim), np.float32)
    out = encoder.model.encode(texts, batch_size=encoder.batch_size, convert_to_tensor=True,
                               show_progress_bar=False)
    if hasattr(out, "detach"):
        out = out.detach().float().cpu().numpy()
    arr = np.asarray(out, dtype=np.float32)
    if arr.shape != (len(texts), encoder.dim):
        raise KBStoreError(f"encoder {encoder.name!r} returned shape {arr.shape} for {len(texts)} texts, "
                           f"expected ({len(texts)}, {encoder.dim})")
    return arr


def _to_f16(arr: np.ndarray, what: str) -> np.ndarray:
    out = arr.astype(_F16)
    if not np.isfinite(out).all():
        raise KBStoreError(f"{what} embeddings hold values outside the float16 range (or NaN); "
                           "the store keeps float16, so this encoder cannot be stored as is")
    return out



class _State:
    """In-memory view of a snapshot: physical triples (read on demand), live slots, overlay, lookups."""

    def __init__(self, snap: _Snapshot):
        m = snap.manifest
        self.folder = snap.folder
        self.rows = int(m["rows"])
        self.phys = _Lines(snap)
        self.hidden, self.moves = _read_overlay(snap, self.rows)
        mask = np.ones(self.rows, dtype=bool)
        if self.hidden:
            mask[np.fromiter(self.hidden, _I64, len(self.hidden))] = False
        self.base = np.flatnonzero(mask).astype(_I64)
        if len(self.base) != m["count"]:
            raise KBStoreError(f"{snap.folder / MANIFEST} says {m['count']} triples but its rows and overlay "
                               f"give {len(self.base)}; the manifest is inconsistent")
        self._slot_of: dict[str, dict[str, int]] | None = None
        self._moved_to: dict[int, int] | None = None
        self.value_rows: dict[str, int] | None = None  # value text -> a row holding its embedding

    def read_slot_map(self) -> dict[str, dict[str, int]]:
        """name -> property -> slot, read from every triple (once; kept up to date by the changes): what a
        large add looks its triples up in. Smaller changes ask the name index (KBStore._slots)."""
        if self._slot_of is None:
            slot_of: dict[str, dict[str, int]] = {}
            for slot, t in zip(self.base.tolist(), self.phys.take(self.order()), strict=True):
                props = slot_of.setdefault(t.name, {})
                if t.property in props:
                    raise KBStoreError(f"{self.folder}: ({t.name!r}, {t.property!r}) is stored twice; the "
                                       "overlay file is inconsistent with the triples")
                props[t.property] = slot
            self._slot_of = slot_of
        return self._slot_of

    def current(self, slot: int) -> int:
        return self.moves.get(slot, slot)

    def moved_to(self) -> dict[int, int]:
        """row -> the slot it now holds, for the rows that replaced a slot's (built once, then kept)."""
        if self._moved_to is None:
            self._moved_to = {row: slot for slot, row in self.moves.items()}
        return self._moved_to

    def move(self, slot: int, row: int) -> None:
        """The slot's triple is now in `row`."""
        if self._moved_to is not None:
            self._moved_to.pop(self.moves.get(slot), None)
            self._moved_to[row] = slot
        self.moves[slot] = row

    def unmove(self, slot: int) -> None:
        if self._moved_to is not None:
            self._moved_to.pop(self.moves.get(slot), None)
        self.moves.pop(slot, None)

    def order(self) -> np.ndarray:
        order = self.base.copy()
        if self.moves:
            slots = np.fromiter(self.moves.keys(), _I64, len(self.moves))
            rows = np.fromiter(self.moves.values(), _I64, len(self.moves))
            order[np.searchsorted(self.base, slots)] = rows
        return order

    def identity(self) -> bool:
        return not self.hidden and not self.moves


# ------------------------------------------------------------------------------------------- the store


class KBStore:
    """A folder holding a KB's triples and float16 key/value embeddings, safe against crashes.

    Make one with ``KBStore.create(path, encoder)``, open one with ``KBStore.open(path[, encoder])``.
    Use it as a context manager (or call ``close()``) to release the writer lock promptly.
    """

    def __init__(self, folder: Path, encoder: KBEncoder | None, readonly: bool, lock_fd: int | None):
        # Internal: use create() / open() / rebuild().
        self.path = folder
        self.encoder = encoder
        self.readonly = readonly
        self._lock_fd = lock_fd
        self._release = weakref.finalize(self, os.close, lock_fd) if lock_fd is not None else None
        self._snap: _Snapshot | None = None
        self._state: _State | None = None
        self._blocks: dict[str, _Blocks] = {}
        self._maps: dict[str, np.ndarray] = {}
        self._tables: dict[str, _Blocks] = {}  # committed block tables for _check (per generation)
        self._logical: list[Triple] | None = None
        self._index: list | None = None  # [keys file, KBPrefilter, rows in it, generation mapped] (store.index)
        self._names: list | None = None  # [triples file, NameIndex, rows in it] (store.names)
        self._row_sums: list | None = None  # [keys file, RowSums or None] (store.rowsums)
        self._seen: tuple[int, int, int] | None = None  # manifest stat at the last reload() that read it

    # ------------------------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: str | os.PathLike, encoder: KBEncoder, *, key_template: str = KEY_TEMPLATE,
               value_template: str = VALUE_TEMPLATE, exist_ok: bool = False) -> KBStore:
        """A new, empty store at ``path`` (the folder is made if needed), opened for writing.

        With ``exist_ok=True`` an existing store is opened instead, provided its encoder and
        templates are the ones given.
        """
        folder = Path(path)
        for tpl, what in ((key_template, "key_template"), (value_template, "value_template")):
            try:
                Triple("n", "p", "v").key_text(tpl)
            except (KeyError, IndexError, ValueError, AttributeError) as err:
                raise ValueError(f"{what} {tpl!r} is not a template over name/property/value: {err}") from None
        if (folder / MANIFEST).exists():
            if not exist_ok:
                raise KBStoreError(f"a KB store already exists at {folder}; open it with KBStore.open, "
                                   "or pass exist_ok=True")
            store = cls.open(folder, encoder)
            stored = (store.key_template, store.value_template)
            if stored != (key_template, value_template):
                store.close()
                raise KBStoreError(f"the store at {folder} uses templates {stored[0]!r} / {stored[1]!r}, "
                                   f"not {key_template!r} / {value_template!r}")
            return store
        folder.mkdir(parents=True, exist_ok=True)
        store = cls(folder, encoder, False, _lock(folder))
        try:
            if (folder / MANIFEST).exists():
                raise KBStoreError(f"another process created a KB store at {folder} just now; open it instead")
            _refuse_orphaned_data(folder)
            files: dict[str, Any] = {}
            for kind in _DATA:
                name = _file_name(kind, 0)
                with open(folder / name, "xb") as fh:  # "x": never truncate a file that is there
                    os.fsync(fh.fileno())
                files[kind] = {"name": name, "bytes": 0, "blocks": []}
            files["overlay"] = None
            _fsync_dir(folder)
            body = {
                "format": FORMAT, "version": FORMAT_VERSION, "generation": 0, "count": 0, "rows": 0,
                "dim": int(encoder.dim), "encoder": encoder.name, "key_template": key_template,
                "value_template": value_template, "dtype": "float16", "byte_order": "little",
                "block_rows": BLOCK_ROWS, "files": files,
            }
            _atomic_write(folder / MANIFEST, _manifest_text(body))
            _fsync_dir(folder)
            store._reload()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, encoder: KBEncoder | None = None, *,
             readonly: bool = False) -> KBStore:
        """Open an existing store. ``encoder`` is needed only to add or update triples; if given, it
        must be the one the store was built with. ``readonly=True`` takes no lock and never blocks;
        it sees the generation committed when it opened (``reload()`` moves it to the newest)."""
        folder = Path(path)
        manifest = _read_manifest(folder)  # clear errors before taking the lock
        if encoder is not None:
            _check_encoder(folder, manifest, encoder)
        store = cls(folder, encoder, readonly, None if readonly else _lock(folder))
        try:
            store._reload(first=True)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def rebuild(cls, path: str | os.PathLike, encoder: KBEncoder, *, progress: bool | None = None) -> KBStore:
        """Re-encode every embedding from the triples file and write fresh, compact data files.

        The way back from damaged, truncated or missing embedding files (the triples file, the
        overlay and the manifest must be intact), and the way to move a store to another encoder.
        Returns the store, open for writing.
        """
        folder = Path(path)
        _read_manifest(folder)
        store = cls(folder, encoder, False, _lock(folder))
        try:
            snap = _Snapshot.read(folder, kinds=("triples",))
            try:
                meta = snap.manifest["files"]["triples"]
                block_rows = snap.manifest["block_rows"]
                bad = _Blocks.from_meta(meta, block_rows).damaged_blocks(snap.handles["triples"])
                if bad:
                    raise KBStoreError(f"{folder / meta['name']}: rows "
                                       f"{_row_ranges(bad, snap.manifest['rows'], block_rows)} "
                                       "do not match their checksums, so the triples cannot be trusted to "
                                       "re-encode; restore the folder from a backup")
                state = _State(snap)
                triples = state.phys.take(state.order())
                manifest = dict(snap.manifest, encoder=encoder.name, dim=int(encoder.dim))
            finally:
                snap.close()
            kt, vt = manifest["key_template"], manifest["value_template"]
            with _progress(len(triples), progress, "re-encoding KB") as bar:
                def chunks():
                    for batch in _batched(triples, BATCH_SIZE):
                        keys = [t.key_text(kt) for t in batch]
                        values = [t.value_text(vt) for t in batch]
                        texts = list(dict.fromkeys(keys + values))
                        emb = dict(zip(texts, _encode_texts(encoder, texts), strict=True))
                        bar.update(len(batch))
                        yield batch, np.stack([emb[k] for k in keys]), np.stack([emb[v] for v in values])

                store._write_fresh(manifest, chunks())
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def shared(cls, path: str | os.PathLike) -> KBStore:
        """A read-only store for this folder, kept per folder and thread (so its parsed triples and
        loaded pre-filter index are reused; checked blocks and the index's pages are shared by the whole
        process), moved to the newest generation on each call. What ``ask(question, "facts.kbstore")``
        uses. Per thread, because a KBStore is not thread-safe: one thread's reload() would swap the
        files under another's reads."""
        folder = Path(path).resolve()
        stores = _SHARED.__dict__.setdefault("stores", {})
        store = stores.get(folder)
        if store is None or store._snap is None:
            store = stores[folder] = cls.open(folder, readonly=True)
            while len(stores) > _SHARED_MAX:
                stores.pop(next(iter(stores))).close()
        else:
            store.reload()
        return store

    def _reload(self, first: bool = False) -> None:
        """(Re)read the committed generation from disk; a writer also drops uncommitted tails."""
        snap = _Snapshot.read(self.path)
        try:
            if self.encoder is not None:
                _check_encoder(self.path, snap.manifest, self.encoder)
            trailing = _check_sizes(snap)
            state = _State(snap)
        except BaseException:
            snap.close()
            raise
        files = snap.manifest["files"]
        if trailing and first:
            writer = _read_lock_pid(self.path)
            # A live writer's append in progress looks the same as a crash's leftovers: readers stay quiet then.
            if not self.readonly or writer is None or not _pid_alive(writer):
                shown = ", ".join(f"{files[k]['name']} ({n} bytes)" for k, n in trailing.items())
                warnings.warn(f"{self.path}: ignoring uncommitted bytes at the end of {shown}, left by an "
                              f"interrupted write; the store is at generation {snap.manifest['generation']} "
                              f"with {snap.manifest['count']} triples"
                              + ("" if self.readonly else "; the bytes were removed"), UserWarning, stacklevel=3)
        if trailing and not self.readonly:
            for kind in trailing:
                os.truncate(self.path / files[kind]["name"], files[kind]["bytes"])
        if self._snap is not None:
            self._snap.close()
        self._snap, self._state = snap, state
        self._blocks = {k: _Blocks.from_meta(files[k], snap.manifest["block_rows"]) for k in _DATA}
        self._maps, self._tables = {}, {}
        self._logical = None
        if first and not self.readonly:
            self._remove_strays()

    def reload(self) -> bool:
        """Move to the newest committed generation (for long-lived readers). True if it changed."""
        self._st()
        # Every commit replaces manifest.json (a new inode): an unchanged stat means an unchanged
        # generation, without parsing a manifest of thousands of block checksums on every ask.
        st = os.stat(self.path / MANIFEST)
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen or _read_manifest(self.path)["generation"] == self.generation:
            self._seen = seen
            return False
        self._reload()
        self._seen = seen
        return True

    def close(self) -> None:
        """Release the writer lock and the open files (memmaps already handed out stay valid)."""
        if self._snap is not None:
            self._snap.close()
            self._snap = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            self._release()
            self._lock_fd = None

    def __del__(self) -> None:
        try:  # not contextlib.suppress: at interpreter exit the module's globals may be gone already
            self.close()
        except Exception:  # noqa: BLE001, S110
            pass

    def __enter__(self) -> KBStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._snap is None:
            return f"KBStore({str(self.path)!r}, closed)"
        mode = "read-only" if self.readonly else "writer"
        return (f"KBStore({str(self.path)!r}, {len(self)} triples, generation {self.generation}, "
                f"encoder {self.encoder_name!r}, {mode})")

    # ------------------------------------------------------------------------------ reading

    def _st(self) -> _State:
        if self._snap is None or self._state is None:
            raise KBStoreError(f"the KBStore for {self.path} is closed")
        return self._state

    @property
    def _manifest(self) -> dict:
        self._st()
        return self._snap.manifest

    @property
    def generation(self) -> int:
        return int(self._manifest["generation"])

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def encoder_name(self) -> str:
        return self._manifest["encoder"]

    @property
    def key_template(self) -> str:
        return self._manifest["key_template"]

    @property
    def value_template(self) -> str:
        return self._manifest["value_template"]

    def __len__(self) -> int:
        return len(self._st().base)

    def __iter__(self) -> Iterator[Triple]:
        return iter(self.triples())

    def __contains__(self, item: object) -> bool:
        try:
            t = _as_triple(item, 1)
        except KBFormatError:
            return False
        return self.get(t.name, t.property) == t

    def triples(self) -> list[Triple]:
        """The live triples, in index order (the row order of embeddings() and key_matrix())."""
        st = self._st()
        if self._logical is None:
            self._logical = st.phys.take(st.order())
        return list(self._logical)

    def get(self, name: str, property: str) -> Triple | None:
        """The stored triple for (name, property), or None."""
        st = self._st()
        slot = self._find(normalize_field(name, "name"), normalize_field(property, "property"))
        return None if slot is None else st.phys[st.current(slot)]

    def index_of(self, name: str, property: str) -> int | None:
        """The row of (name, property) in triples()/embeddings()/key_matrix(), or None."""
        st = self._st()
        slot = self._find(normalize_field(name, "name"), normalize_field(property, "property"))
        return None if slot is None else int(np.searchsorted(st.base, slot))

    def _map(self, kind: str) -> np.ndarray:
        """Read-only memmap of the committed physical rows of keys or values."""
        mm = self._maps.get(kind)
        if mm is None:
            rows = int(self._manifest["rows"])
            if rows == 0:
                mm = np.zeros((0, self.dim), _F16)
            else:
                mm = np.memmap(self._snap.handles[kind], dtype=_F16, mode="r", shape=(rows, self.dim))
            self._maps[kind] = mm
        return mm

    def _check(self, kind: str, rows: np.ndarray | None = None) -> None:
        """Check the checksums of the blocks holding these committed physical rows (default: all),
        each block once per process: a damaged row is an error, never an embedding."""
        m = self._manifest
        table = self._tables.get(kind)
        if table is None:  # the committed block table, once per generation (thousands of entries at 1M rows)
            table = self._tables[kind] = _Blocks.from_meta(m["files"][kind], int(m["block_rows"]))
        blocks = None if rows is None else np.unique(np.asarray(rows, dtype=_I64).ravel() // table.block_rows).tolist()
        _check_blocks(self.path, kind, self._snap.handles[kind], table, int(m["rows"]), blocks)

    def _read_phys(self, kind: str, rows: np.ndarray) -> np.ndarray:
        """float16 rows of keys or values by physical row (any shape of index), checked: each row against
        its own saved checksum where check() saved one (kblam.store.rowsums), else its block's sha256;
        a row that does not match its checksum is judged by its block's sha256."""
        from kblam.store import rowsums

        rows = np.asarray(rows, dtype=_I64)
        data = self._map(kind)[rows]
        sums = rowsums.current(self) if rows.size <= rowsums.MOST_ROWS else None
        if sums is None:
            self._check(kind, rows)
            return data
        flat = rows.ravel()
        summed = flat < sums.rows
        doubt = sums.mismatched(kind, flat[summed], data.reshape(flat.size, self.dim)[summed])
        if doubt.size or not summed.all():
            self._check(kind, np.concatenate([doubt, flat[~summed]]))
        return data

    def _logical_rows(self, kind: str) -> np.ndarray:
        st = self._st()
        self._check(kind)
        mm = self._map(kind)
        return mm if st.identity() else mm[st.order()]

    def key_matrix(self) -> np.ndarray:
        """The keys as float16 (M, dim), rows in triples() order.

        A read-only memmap (no copy) when nothing was updated or removed since the last compaction
        (always true after ``compact()``); otherwise the live rows gathered into a new array.
        """
        return self._logical_rows("keys")

    def value_matrix(self) -> np.ndarray:
        """The values as float16 (M, dim); a memmap under the same condition as key_matrix()."""
        return self._logical_rows("values")

    def max_triple_bytes(self) -> int:
        """An upper bound on any stored triple's UTF-8 bytes of name + property + value (replaced and
        removed rows included), from the longest line of the triples file: no triple is parsed. What a
        caller that must bound an answer span needs without reading a million triples."""
        return max(0, self._st().phys.max_line_bytes() - _RECORD_OVERHEAD)

    def view(self) -> StoreView:
        """(keys, values, triples) of this generation, read on demand by row (in triples() order).

        What the model's pre-filter reads: ``keys[rows]`` / ``values[rows]`` are float16 arrays of just
        those rows and ``triples[j]`` one triple, so a question over a million-triple store reads its
        candidates only. ``np.asarray(view.keys)`` is the whole key_matrix()."""
        st = self._st()
        order = None if st.identity() else st.order()
        return StoreView(_Rows(self, "keys", order), _Rows(self, "values", order), _Triples(self, order))

    def prefilter(self, *, progress: bool | None = None) -> KBPrefilter:
        """The FAISS pre-filter index over this store's keys, rows numbered as ``triples()``.

        The one saved in the store (``kblam.store.index``), memory-mapped, when it is valid for this
        store; otherwise (none yet, deleted, damaged, stale) it is built now, which is said once,
        and saved for the next process. Edits since the save are applied without a rebuild.
        """
        self._st()
        from kblam.store import index

        return index.current(self, progress=progress)

    def entity_names(self) -> NameIndex:
        """Which entity names the store holds, for the answer's guess of what the confidence will encode
        (``kblam.store.names``): saved beside the data, loaded once a process (built and saved if missing
        or stale), names appended since included. Hashes, not names: ``"marie curie" in index``."""
        self._st()
        from kblam.store import names

        return names.current(self)

    def embeddings(self) -> KBEmbeddings:
        """The live triples with float16 key/value tensors (M, dim), row j for triple j: copies of the rows
        as the store keeps them (and as KBEncoder.encode_kb returns them)."""
        import torch

        from kblam.encoder import KBEmbeddings

        triples = tuple(self.triples())
        keys = torch.from_numpy(np.array(self._logical_rows("keys"), dtype=np.float16))
        values = torch.from_numpy(np.array(self._logical_rows("values"), dtype=np.float16))
        return KBEmbeddings(triples, keys, values)

    def to_kb(self) -> KnowledgeBase:
        return KnowledgeBase(self.triples(), source=str(self.path))

    def check(self, *, progress: bool | None = None) -> None:
        """Check every block of the data files against its checksum now, and save a checksum of each row
        (``kblam.store.rowsums``), so that neither this process nor a later one hashes a whole block for
        the few rows a question reads: without them a new process's first questions over a million-triple
        store hashed their candidates' blocks (benchmarks/speed.py, docs/performance.md). Raises
        KBStoreError for a damaged block, as reading it would. About 3 s at a million triples."""
        from kblam.store import rowsums

        with _progress(len(self._st().phys), progress, "checking") as bar:
            rowsums.build(self, progress=lambda rows: bar.update(rows / 2))  # keys, then values
            self._check("keys")  # the last, partial block (rowsums covers whole ones)
            self._check("values")
            committed = self._st().phys.rows
            if committed:
                self._st().phys[committed - 1]  # the triples' last (maybe partial) block, read and checked

    def verify(self) -> None:
        """Re-read every committed byte of this generation and compare with the manifest's checksums.

        Raises KBStoreError naming each damaged file and row range, and what can be recovered."""
        m = self._manifest
        rows = int(m["rows"])
        problems, embeddings_bad, triples_bad = [], False, False
        for kind in _DATA:
            blocks = _Blocks.from_meta(m["files"][kind], m["block_rows"])
            fh = self._snap.handles[kind]
            size = os.fstat(fh.fileno()).st_size
            bad = blocks.damaged_blocks(fh)
            if size < blocks.bytes:
                problems.append(f"{blocks.name} is truncated ({size} of {blocks.bytes} bytes)")
            elif bad:
                problems.append(f"{blocks.name}: rows {_row_ranges(bad, rows, m['block_rows'])} do not match their checksums")
            if bad or size < blocks.bytes:
                embeddings_bad |= kind != "triples"
                triples_bad |= kind == "triples"
        ov = m["files"].get("overlay")
        if ov and (len(self._snap.overlay) != ov["bytes"]
                   or hashlib.sha256(self._snap.overlay).hexdigest() != ov["sha256"]):
            problems.append(f"{ov['name']} does not match its checksum")
            triples_bad = True
        if not problems:
            return
        if triples_bad:
            advice = ("the triples (or the record of which are live) are damaged: restore the folder from a "
                      "backup; the embedding files are " + ("damaged too" if embeddings_bad else "intact"))
        else:
            advice = (f"{m['files']['triples']['name']} is intact and holds all {m['count']} triples, so "
                      f"the embeddings can be re-encoded: KBStore.rebuild({str(self.path)!r}, encoder)")
        raise KBStoreError(f"{self.path} (generation {m['generation']}): " + "; ".join(problems) + f". {advice}")

    # ------------------------------------------------------------------------------ writing

    def add(self, triples: Iterable[Triple | tuple | dict], *, progress: bool | None = None) -> int:
        """Add triples (Triples, (name, property, value) tuples or dicts); returns how many were new
        or changed. A stored (name, property) given another value is updated in place; exact
        duplicates are skipped. Atomic: nothing is committed unless the whole call succeeds.
        Streams in batches of 4096 with a progress bar (``progress=None``: when stderr is a tty)."""
        encoder = self._writable(need_encoder="add")
        st = self._state
        total = len(triples) if hasattr(triples, "__len__") else None
        numbered = (_as_triple(item, i) for i, item in enumerate(triples, start=1))
        if total is None or total > BATCH_SIZE:
            st.read_slot_map()  # a large add looks every triple up: read them all once
        changed, repeated = 0, []
        with self._transaction() as tx, _progress(total, progress, "encoding KB") as bar:
            call_start = st.rows
            for batch in _batched(numbered, BATCH_SIZE):
                latest: dict[tuple[str, str], Triple] = {}
                for t in batch:
                    key = (t.name, t.property)
                    earlier = latest.get(key)
                    if earlier is None:
                        slot = self._find(*key)
                        if slot is not None and st.current(slot) >= call_start:
                            earlier = st.phys[st.current(slot)]  # set by an earlier batch of this call
                    if earlier is not None and earlier != t:
                        repeated.append(key)
                    latest[key] = t
                changed += self._append(list(latest.values()), encoder, tx)
                bar.update(len(batch))
            if changed:
                self._commit(tx)
        if repeated:
            shown = ", ".join(f"{n!r}/{p!r}" for n, p in dict.fromkeys(repeated[:5]))
            warnings.warn(f"{len(set(repeated))} (name, property) pair(s) were given several values in one add() "
                          f"({shown}{' ...' if len(repeated) > 5 else ''}); a store keeps one value per pair: "
                          "the last one given was kept", UserWarning, stacklevel=2)
        return changed

    def update(self, name: str, property: str, value: Any) -> None:
        """Replace the value of a stored (name, property) in place; re-encodes only the new value
        text. Raises KeyError if the store has no such pair."""
        encoder = self._writable(need_encoder="update")
        new = Triple(name, property, value)
        if self._find(new.name, new.property) is None:
            raise KeyError(f"no ({new.name!r}, {new.property!r}) in {self.path}; use add() for new triples")
        with self._transaction() as tx:
            if self._append([new], encoder, tx):
                self._commit(tx)

    def remove(self, name: str, property: str | None = None) -> int:
        """Remove one (name, property), or with ``property=None`` every triple of the entity.
        Returns the number removed; raises KeyError if nothing matches. Later indices shift down."""
        self._writable()
        st = self._state
        n = normalize_field(name, "name")
        props = self._slots(n)
        if property is None:
            slots = list(props.values())
        else:
            p = normalize_field(property, "property")
            slots = [props[p]] if p in props else []
        if not slots:
            what = repr(n) if property is None else f"({n!r}, {property!r})"
            raise KeyError(f"nothing to remove: no {what} in {self.path}")
        with self._transaction() as tx:
            for slot in slots:
                t = st.phys[st.current(slot)]
                if st._slot_of is not None:
                    del st._slot_of[t.name][t.property]
                    if not st._slot_of[t.name]:
                        del st._slot_of[t.name]
                st.unmove(slot)  # the row that replaced it is hidden already
                st.hidden.add(slot)
            st.base = st.base[~np.isin(st.base, np.asarray(slots, dtype=_I64))]
            self._logical = None
            tx["overlay"] = True
            self._commit(tx)
        return len(slots)

    def compact(self) -> None:
        """Rewrite the data files with only the live rows, in index order: new files, then an atomic
        manifest switch, then the old files are deleted. Afterwards key_matrix() is zero-copy."""
        self._writable()
        st = self._state
        if st.identity():
            return
        order = st.order()

        def chunks():
            for start in range(0, len(order), BLOCK_ROWS):
                rows = order[start:start + BLOCK_ROWS]
                yield st.phys.take(rows), self._read_phys("keys", rows), self._read_phys("values", rows)

        self._write_fresh(dict(self._manifest), chunks())

    # ------------------------------------------------------------------------------ internals

    def _writable(self, need_encoder: str | None = None) -> KBEncoder | None:
        self._st()
        if self.readonly:
            raise KBStoreError(f"{self.path} was opened read-only; KBStore.open(path, encoder) to change it")
        if need_encoder and self.encoder is None:
            raise KBStoreError(f"{self.path} was opened without an encoder, so it cannot {need_encoder} "
                               f"triples; KBStore.open(path, encoder) with the {self.encoder_name!r} encoder")
        return self.encoder

    @contextlib.contextmanager
    def _transaction(self):
        """One mutation; on any failure before the commit, go back to the committed state on disk."""
        tx: dict[str, Any] = {"handles": {}, "overlay": False, "appended": False, "new_files": []}
        try:
            yield tx
        except BaseException:
            for fh in tx["handles"].values():
                fh.close()
            try:
                self._reload()
                self._remove_strays(tx["new_files"])
            except Exception as err:  # keep the original error; say that recovery failed too
                self._state = None
                warnings.warn(f"{self.path}: could not re-read the committed state after a failed change "
                              f"({err}); reopen the store", UserWarning, stacklevel=3)
            raise
        finally:
            for fh in tx["handles"].values():
                fh.close()

    def _append(self, triples: list[Triple], encoder: KBEncoder, tx: dict) -> int:
        """Append rows for new or changed triples (uncommitted) and update the in-memory state."""
        st = self._state
        kt, vt = self.key_template, self.value_template
        entries = [(slot, t) for t in triples
                   if (slot := self._find(t.name, t.property)) is None or st.phys[st.current(slot)] != t]
        if not entries:
            return 0
        n, d = len(entries), self.dim
        keys, values = np.empty((n, d), np.float32), np.empty((n, d), np.float32)
        if st.value_rows is None and st._slot_of is not None:  # a large change: worth reading every triple
            st.value_rows = {}
            for row, t in enumerate(st.phys):
                st.value_rows.setdefault(t.value_text(vt), row)
        need: dict[str, list[tuple[np.ndarray, int]]] = {}
        copy_keys, copy_values = [], []
        for i, (slot, t) in enumerate(entries):
            key_text = t.key_text(kt)
            if slot is not None and st.phys[st.current(slot)].key_text(kt) == key_text:
                copy_keys.append((i, st.current(slot)))
            else:
                need.setdefault(key_text, []).append((keys, i))
            value_text = t.value_text(vt)
            row = None if st.value_rows is None else st.value_rows.get(value_text)
            if row is not None:
                copy_values.append((i, row))
            else:
                need.setdefault(value_text, []).append((values, i))
        texts = list(need)
        for text, vector in zip(texts, _encode_texts(encoder, texts), strict=True):
            for target, i in need[text]:
                target[i] = vector
        for target, kind, copies in ((keys, "keys", copy_keys), (values, "values", copy_values)):
            if copies:
                idx, rows = np.asarray(copies, dtype=_I64).T
                target[idx] = self._read_rows(kind, rows, tx)
        keys16, values16 = _to_f16(keys, "key"), _to_f16(values, "value")

        r0 = st.rows
        lines = [_triple_line(t) for _, t in entries]
        row_ends = np.arange(1, n + 1, dtype=_I64) * (d * 2)
        for kind, data, ends in (("triples", b"".join(lines), np.cumsum([len(x) for x in lines])),
                                 ("keys", keys16.tobytes(), row_ends), ("values", values16.tobytes(), row_ends)):
            fh = tx["handles"].get(kind)
            if fh is None:
                fh = tx["handles"][kind] = open(self.path / self._blocks[kind].name, "r+b")
            self._blocks[kind].append(fh, self.path, r0, data, ends)
            fh.flush()
        new_slots = []
        for i, (slot, t) in enumerate(entries):
            row = r0 + i
            st.phys.append(t)
            if st.value_rows is not None:
                st.value_rows.setdefault(t.value_text(vt), row)
            if slot is None:
                new_slots.append(row)
                if st._slot_of is not None:
                    st._slot_of.setdefault(t.name, {})[t.property] = row
            else:
                st.move(slot, row)
                st.hidden.add(row)
                tx["overlay"] = True
        st.rows += n
        if new_slots:
            st.base = np.concatenate([st.base, np.asarray(new_slots, dtype=_I64)])
        tx["appended"] = True
        self._logical = None
        return n

    def _slots(self, name: str) -> dict[str, int]:
        """property -> slot of an entity's stored triples. From the full map once a large add has read
        every triple; otherwise from the rows the name index holds for that name (kblam.store.names),
        checked against the overlay and the triples themselves: an edit of a million-triple store then
        reads a handful of rows, not a million. A store of up to SLOT_MAP_ROWS rows reads them
        all: a fraction of a second, and its value texts are then copied, not encoded again (_append)."""
        st = self._st()
        if st._slot_of is not None or st.rows <= SLOT_MAP_ROWS:
            return st.read_slot_map().get(name, {})
        from kblam.store import names

        moved_to = st.moved_to()  # a slot's replacement row -> the slot
        found: dict[str, int] = {}
        for row in names.current(self).rows_of(name):
            slot = moved_to.get(row, row)
            if (row in st.hidden and row not in moved_to) or st.current(slot) != row:
                continue  # removed, or replaced by a newer row
            t = st.phys[row]
            if t.name != name:
                continue  # another name with the same hash
            if t.property in found:
                raise KBStoreError(f"{self.path}: ({t.name!r}, {t.property!r}) is stored twice; the overlay "
                                   "file is inconsistent with the triples")
            found[t.property] = slot
        return found

    def _find(self, name: str, prop: str) -> int | None:
        return self._slots(name).get(prop)

    def _read_rows(self, kind: str, rows: np.ndarray, tx: dict) -> np.ndarray:
        """Stored embedding rows (float32), committed or appended earlier in this transaction."""
        committed = rows < int(self._manifest["rows"])
        out = np.empty((len(rows), self.dim), np.float32)
        out[committed] = self._read_phys(kind, rows[committed])
        if not committed.all():  # appended earlier in this transaction: not in the manifest yet
            row_bytes = self.dim * 2
            fd = tx["handles"][kind].fileno()  # flushed after each append
            out[~committed] = [np.frombuffer(os.pread(fd, row_bytes, r * row_bytes), dtype=_F16)
                               for r in rows[~committed].tolist()]
        return out

    def _commit(self, tx: dict) -> None:
        """fsync appended rows, write a changed overlay under a new name, then switch the manifest."""
        st, old = self._state, self._manifest
        generation = int(old["generation"]) + 1
        for fh in tx["handles"].values():
            fh.flush()
            os.fsync(fh.fileno())
        files = {k: self._blocks[k].meta() for k in _DATA}
        files["overlay"] = old["files"].get("overlay")
        overlay = self._snap.overlay
        if tx["overlay"]:
            files["overlay"], overlay = None, b""
            if st.hidden or st.moves:
                slots = np.sort(np.fromiter(st.moves.keys(), _I64, len(st.moves)))
                overlay = np.concatenate([
                    np.sort(np.fromiter(st.hidden, _I64, len(st.hidden))), slots,
                    np.fromiter((st.moves[s] for s in slots.tolist()), _I64, len(slots)),
                ]).astype(_I64).tobytes()
                name = _file_name("overlay", generation)
                tx["new_files"].append(name)
                with open(self.path / name, "wb") as fh:
                    fh.write(overlay)
                    fh.flush()
                    os.fsync(fh.fileno())
                files["overlay"] = {"name": name, "bytes": len(overlay), "sha256": hashlib.sha256(overlay).hexdigest(),
                                    "hidden": len(st.hidden), "moves": len(slots)}
                _fsync_dir(self.path)
        body = dict(old, generation=generation, rows=st.rows, count=len(st.base), files=files)
        _atomic_write(self.path / MANIFEST, _manifest_text(body))  # the commit point
        _fsync_dir(self.path)
        # Same data files, longer: the in-memory state is already this generation's.
        self._snap.manifest, self._snap.overlay = body, overlay
        self._maps, self._tables = {}, {}
        if tx["overlay"] and old["files"].get("overlay"):
            with contextlib.suppress(OSError):
                os.unlink(self.path / old["files"]["overlay"]["name"])
        self._after_commit("refresh")

    def _write_fresh(self, manifest: dict, chunks: Iterable[tuple[list[Triple], np.ndarray, np.ndarray]]) -> None:
        """Write the given live rows into new data files (compact/rebuild), commit, delete the old ones."""
        generation = int(manifest["generation"]) + 1
        # A rewrite may change the block size (the manifest records it); BLOCK_ROWS is the current default.
        manifest = dict(manifest, block_rows=BLOCK_ROWS)
        blocks = {k: _Blocks(_file_name(k, generation), 0, [], BLOCK_ROWS) for k in _DATA}
        d = int(manifest["dim"])
        committed = False
        try:
            rows = 0
            with contextlib.ExitStack() as stack:
                handles = {k: stack.enter_context(open(self.path / blocks[k].name, "w+b")) for k in _DATA}
                for batch, keys, values in chunks:
                    lines = [_triple_line(t) for t in batch]
                    row_ends = np.arange(1, len(batch) + 1, dtype=_I64) * (d * 2)
                    for kind, data, ends in (
                            ("triples", b"".join(lines), np.cumsum([len(x) for x in lines])),
                            ("keys", _to_f16(np.asarray(keys), "key").tobytes(), row_ends),
                            ("values", _to_f16(np.asarray(values), "value").tobytes(), row_ends)):
                        blocks[kind].append(handles[kind], self.path, rows, data, ends)
                    rows += len(batch)
                for fh in handles.values():
                    fh.flush()
                    os.fsync(fh.fileno())
            _fsync_dir(self.path)
            files = {k: blocks[k].meta() for k in _DATA}
            files["overlay"] = None
            body = dict(manifest, generation=generation, rows=rows, count=rows, files=files)
            _atomic_write(self.path / MANIFEST, _manifest_text(body))  # the commit point
            committed = True
            _fsync_dir(self.path)
        except BaseException:
            if not committed:
                with contextlib.suppress(Exception):
                    committed = _read_manifest(self.path)["generation"] == generation
            if not committed:  # the new files are garbage; the old generation stands
                for b in blocks.values():
                    with contextlib.suppress(OSError):
                        os.unlink(self.path / b.name)
            if self._snap is not None:
                with contextlib.suppress(Exception):
                    self._reload()
            raise
        self._reload()
        # The old files (and any crash leftovers) go; readers holding them open keep reading them.
        self._remove_strays()
        self._after_commit("rebuild")

    def _after_commit(self, what: str) -> None:
        """Keep a saved pre-filter index current (kblam.store.index). The change is committed already,
        so a failure here is a warning: the index is rebuilt when it is next used."""
        from kblam.store import index, names, rowsums

        try:
            if what != "refresh":
                names.cleanup(self)  # they cover the old data files: built anew when next used
                rowsums.cleanup(self)
            index.refresh(self) if what == "refresh" else index.rebuild(self)
        except Exception as err:  # noqa: BLE001 - derived data; the commit stands
            warnings.warn(f"{self.path}: the change is committed, but updating the saved pre-filter index "
                          f"failed ({type(err).__name__}: {err}); it is rebuilt when next used",
                          UserWarning, stacklevel=4)

    def _remove_strays(self, names: Iterable[str] | None = None) -> None:
        """Delete store files (all, or ``names``) that the manifest does not refer to: left by a crash
        or a failed change. Only a writer does this."""
        m = self._manifest
        keep = {m["files"][k]["name"] for k in _DATA}
        if m["files"].get("overlay"):
            keep.add(m["files"]["overlay"]["name"])
        for name in os.listdir(self.path) if names is None else names:
            if _OWN_FILE.match(name) and name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(self.path / name)


_SHARED = threading.local()  # KBStore.shared(): .stores, folder -> this thread's read-only store, oldest first
_SHARED_MAX = 4


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a KB store folder (it holds a manifest.json)."""
    return (Path(path) / MANIFEST).is_file()


def load_kb(path: str | os.PathLike) -> KBStore | KnowledgeBase:
    """A KB given by path: a folder is a store (``KBStore.shared``: read-only, one per folder, kept at
    the newest generation), anything else a KB file (``KnowledgeBase.from_file``); each says what is
    wrong with a path that is neither."""
    return KBStore.shared(path) if Path(path).is_dir() else KnowledgeBase.from_file(path)


class StoreView(NamedTuple):
    keys: _Rows
    values: _Rows
    triples: _Triples


class _Stale:
    """A view holds one generation's row order; it stays valid while the data files do (appends keep
    every committed row in place), and refuses to read after compact()/rebuild() rewrote them."""

    def __init__(self, store: KBStore, order: np.ndarray | None):
        # Held weakly: a view kept in a cache (kblam.kb_cache) must not keep its store open.
        self._store_ref, self._order = weakref.ref(store), order
        self._files = store._manifest["files"]["keys"]["name"]
        self._count = len(store)

    @property
    def _store(self) -> KBStore:
        store = self._store_ref()
        if store is None:
            raise KBStoreError("the store of this view was closed and released; open it again")
        return store

    def _phys(self, rows: Any) -> np.ndarray:
        store = self._store
        if store._snap is None or store._manifest["files"]["keys"]["name"] != self._files:
            raise KBStoreError(f"{store.path}: the store was compacted, rebuilt or closed since this view was "
                               "made; take a new one with store.view()")
        rows = np.arange(self._count)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=_I64)
        if rows.size and (rows.min() < -self._count or rows.max() >= self._count):
            raise IndexError(f"row out of range for a view of {self._count} triples")
        rows = rows % max(self._count, 1)
        return rows if self._order is None else self._order[rows]

    def __len__(self) -> int:
        return self._count


class _Rows(_Stale):
    """Logical rows of a store's keys or values (float16), each block's checksum checked on first read."""

    def __init__(self, store: KBStore, kind: str, order: np.ndarray | None):
        super().__init__(store, order)
        self._kind = kind
        self.shape = (self._count, store.dim)
        self.dtype = np.dtype(_F16)
        self.ndim = 2

    def __getitem__(self, rows: Any) -> np.ndarray:
        return self._store._read_phys(self._kind, self._phys(rows))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._order is None:  # the memmap itself, no copy (every block checked first)
            rows = self._phys(slice(None))
            self._store._check(self._kind, rows)
            whole = self._store._map(self._kind)[: self._count]
        else:
            whole = self[slice(None)]
        return whole if dtype is None else whole.astype(dtype)


class _Triples(_Stale):
    """Logical triples of a store; a triple is parsed when it is first asked for."""

    def __getitem__(self, row: int | slice) -> Triple | list[Triple]:
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        return self._store._state.phys[int(self._phys(row))]

    def take(self, rows: Iterable[int]) -> list[Triple]:
        """The triples of these rows: one check of the view for all of them (a question's 256 candidates
        row by row spent 1.4 ms on the checks, 0.1 ms on the triples)."""
        from kblam.store import rowsums

        store = self._store
        sums = rowsums.current(store)
        return store._state.phys.take(self._phys(list(rows)), None if sums is None else sums.lines())


def _refuse_orphaned_data(folder: Path) -> None:
    """A folder with store data files but no manifest is a store that lost its manifest, not an empty
    folder: creating a store there would write over data that restoring the manifest gives back.
    Empty files (a create() that died before its manifest) hold nothing and are cleared."""
    own = sorted(f for f in os.listdir(folder) if _OWN_FILE.match(f))
    held = [f for f in own if (folder / f).stat().st_size > 0]
    if held:
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise KBStoreError(f"{folder} holds KB store data files ({shown}) but no {MANIFEST}: the manifest was "
                           "deleted or the folder was copied incompletely. Nothing was changed. Restore "
                           f"{MANIFEST} from where it came (then KBStore.open works), or move these files "
                           "away to start a new store here")
    for name in own:
        os.unlink(folder / name)


def _check_encoder(folder: Path, manifest: dict, encoder: KBEncoder) -> None:
    if encoder.name != manifest["encoder"]:
        raise KBStoreError(f"{folder} was encoded with {manifest['encoder']!r}, but the encoder given is "
                           f"{encoder.name!r}; open it with the {manifest['encoder']!r} encoder, or re-encode "
                           f"everything with KBStore.rebuild(path, encoder)")
    if int(encoder.dim) != int(manifest["dim"]):
        raise KBStoreError(f"{folder} holds {manifest['dim']}-dim embeddings from {manifest['encoder']!r}, but "
                           f"the encoder given ({encoder.name!r}) makes {encoder.dim}-dim ones")


