"""The store's files on disk: the manifest (the commit point), checksummed append-only data files,
and one committed generation read back (a snapshot). ``kblam.store.core`` builds the store on these;
its docstring describes the layout and the durability rules."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kblam.kb import KBFormatError, Triple, _atomic_write

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT = "kblam-kb-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = "writer.lock"

_F16 = np.dtype("<f2")
_I64 = np.dtype("<i8")
_DATA = ("triples", "keys", "values")
_SUFFIX = {"triples": "jsonl", "keys": "f16", "values": "f16"}
_OWN_FILE = re.compile(r"^(?:(?:triples|keys|values)-\d+\.(?:jsonl|f16)|overlay-\d+\.i64|\.manifest\.json\..+\.tmp)$")
_OPEN_RETRIES = 50


class KBStoreError(RuntimeError):
    """The store cannot be used as asked. The message says what is wrong and what can still be recovered."""


# --------------------------------------------------------------------------------------------- helpers


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_name(kind: str, generation: int) -> str:
    return f"{kind}-{generation:08d}.{_SUFFIX.get(kind, 'i64')}"


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _manifest_text(body: dict) -> str:
    """The manifest as written: indented, one line per checksum block ([end, "sha256"]) to stay readable.

    json's indented output runs its pure-Python encoder, which took 35 of 43 ms a commit over the
    ~12,000 block entries of a million-row store (measured while developing); the block lists are
    rendered here instead, where json.dumps leaves a placeholder for each."""
    body = {k: v for k, v in body.items() if k != "checksum"}
    body["checksum"] = hashlib.sha256(_canonical(body)).hexdigest()
    lists, files = {}, {}
    for kind, meta in body.get("files", {}).items():
        if isinstance(meta, dict) and meta.get("blocks"):
            mark = f"\0blocks of {kind}\0"
            lists[json.dumps(mark)] = meta["blocks"]
            meta = dict(meta, blocks=mark)
        files[kind] = meta
    text = json.dumps(dict(body, files=files) if lists else body, indent=1, ensure_ascii=False)
    for mark, blocks in lists.items():
        at = text.index(mark)
        pad = text[text.rindex("\n", 0, at) + 1:at]
        pad = pad[:len(pad) - len(pad.lstrip())]  # the indent of the "blocks" line
        # json's C encoder writes the list as [[end, "sha256"], [end, "sha256"], ...]: a line each.
        rows = json.dumps(blocks)[1:-1].replace("], [", f"],\n{pad} [")
        text = text.replace(mark, f"[\n{pad} {rows}\n{pad}]", 1)
    return text + "\n"


def _triple_line(t: Triple) -> bytes:
    return (json.dumps(t.to_record(), ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock_pid(folder: Path) -> int | None:
    try:
        text = (folder / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class _Blocks:
    """The committed extent of one append-only data file and a sha256 per block of BLOCK_ROWS rows."""

    def __init__(self, name: str, nbytes: int, blocks: list[list[Any]], block_rows: int):
        self.name = name
        self.block_rows = int(block_rows)
        self.bytes = nbytes
        self.blocks = [[int(end), str(sha)] for end, sha in blocks]
        self._tail: Any = None  # hasher of the partial last block, loaded on the first append

    @classmethod
    def from_meta(cls, meta: dict, block_rows: int) -> _Blocks:
        return cls(meta["name"], meta["bytes"], meta["blocks"], block_rows)

    def meta(self) -> dict:
        # The entries themselves are shared: append() replaces an entry, never changes one in place.
        return {"name": self.name, "bytes": self.bytes, "blocks": list(self.blocks)}

    def start(self, i: int) -> int:
        return self.blocks[i - 1][0] if i else 0

    def append(self, fh, folder: Path, rows_before: int, data: bytes, ends: np.ndarray) -> None:
        """Write rows (``data``, cumulative row ``ends``) at the committed end, updating block hashes."""
        view = memoryview(data)
        rows, pos, n = rows_before, 0, len(ends)
        fh.seek(self.bytes)
        while pos < n:
            in_block = rows % self.block_rows
            take = min(self.block_rows - in_block, n - pos)
            b0 = int(ends[pos - 1]) if pos else 0
            b1 = int(ends[pos + take - 1])
            if in_block == 0:
                hasher = hashlib.sha256()
            else:
                hasher = self._tail if self._tail is not None else self._load_tail(folder)
            chunk = view[b0:b1]
            fh.write(chunk)
            hasher.update(chunk)
            self.bytes += b1 - b0
            entry = [self.bytes, hasher.hexdigest()]
            if in_block == 0:
                self.blocks.append(entry)
            else:
                self.blocks[-1] = entry
            rows += take
            pos += take
            self._tail = hasher if rows % self.block_rows else None

    def _load_tail(self, folder: Path):
        i = len(self.blocks) - 1
        start, (end, sha) = self.start(i), self.blocks[i]
        with open(folder / self.name, "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start)
        hasher = hashlib.sha256(data)
        if len(data) != end - start or hasher.hexdigest() != sha:
            raise KBStoreError(f"{folder / self.name}: its last block (bytes {start}-{end}) does not match its "
                               "checksum, so nothing is appended to it; run KBStore.open(path).verify() for "
                               "the damage and KBStore.rebuild(path, encoder) to re-encode")
        return hasher

    def damaged_blocks(self, fh) -> list[int]:
        bad = []
        for i, (end, sha) in enumerate(self.blocks):
            start = self.start(i)
            data = _pread_all(fh.fileno(), end - start, start)
            if len(data) != end - start or hashlib.sha256(data).hexdigest() != sha:
                bad.append(i)
        return bad


def _row_ranges(blocks: list[int], rows: int, block_rows: int) -> str:
    spans = [f"{b * block_rows}-{min((b + 1) * block_rows, rows) - 1}" for b in blocks[:10]]
    return ", ".join(spans) + (f" and {len(blocks) - 10} more blocks" if len(blocks) > 10 else "")



# --------------------------------------------------------------------------------------- the snapshot


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not folder.is_dir():
            raise KBStoreError(f"no KB store at {folder}: the folder does not exist "
                               "(KBStore.create makes one)") from None
        own = sorted(f for f in os.listdir(folder) if _OWN_FILE.match(f) and not f.startswith("."))
        extra = (f"; its data files are here ({', '.join(own[:6])}), so the manifest was deleted or the "
                 "folder was copied incompletely: restore manifest.json from where it came") if own else ""
        raise KBStoreError(f"no KB store at {folder}: {MANIFEST} is missing{extra}") from None
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError as err:
        raise KBStoreError(f"{path} is not valid JSON ({err}); the manifest is damaged, the data files "
                           "alone cannot say which rows are committed: restore it from a backup") from None
    if body.get("format") != FORMAT:
        raise KBStoreError(f"{path} is not a KB store manifest (format {body.get('format')!r}, "
                           f"expected {FORMAT!r})")
    if not isinstance(body.get("version"), int) or body["version"] > FORMAT_VERSION:
        raise KBStoreError(f"{path} has store format version {body.get('version')!r}; this kblam reads "
                           f"up to version {FORMAT_VERSION}: upgrade kblam")
    checksum = body.pop("checksum", None)
    if checksum != hashlib.sha256(_canonical(body)).hexdigest():
        raise KBStoreError(f"{path} does not match its own checksum: the manifest was edited or damaged; "
                           "restore it from a backup")
    if body.get("dtype") != "float16" or body.get("byte_order") != "little":
        raise KBStoreError(f"{path}: unsupported embedding dtype {body.get('dtype')!r}/{body.get('byte_order')!r}")
    try:
        problem = _layout_problem(body)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        problem = f"missing or malformed field ({err!r})"
    if problem:
        raise KBStoreError(f"{path} is inconsistent: {problem}; restore it from a backup")
    return body


def _layout_problem(m: dict) -> str | None:
    """What is structurally wrong with a manifest (sizes, block tables), or None."""
    rows, dim, br = int(m["rows"]), int(m["dim"]), int(m["block_rows"])
    if rows < 0 or dim <= 0 or br <= 0 or not 0 <= int(m["count"]) <= rows or int(m["generation"]) < 0:
        return "negative or zero sizes"
    n_blocks = -(-rows // br)
    for kind in _DATA:
        meta = m["files"][kind]
        ends = [int(end) for end, _ in meta["blocks"]]
        if not isinstance(meta["name"], str) or not _OWN_FILE.match(meta["name"]):
            return f"bad file name {meta['name']!r}"
        if len(ends) != n_blocks or (ends and ends[-1] != meta["bytes"]) or (not ends and meta["bytes"]):
            return f"the block table of {meta['name']} does not cover its {rows} rows"
        if kind != "triples" and ends != [min((i + 1) * br, rows) * dim * 2 for i in range(n_blocks)]:
            return f"{meta['name']} block ends do not match {rows} rows of {dim} float16"
        if any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
            return f"{meta['name']} block ends are not increasing"
    ov = m["files"].get("overlay")
    if ov is not None and (int(ov["bytes"]) != 8 * (int(ov["hidden"]) + 2 * int(ov["moves"]))
                           or not _OWN_FILE.match(ov["name"])):
        return "the overlay entry is malformed"
    return None


class _Snapshot:
    """One committed generation, read from disk: manifest, open data files, triples, overlay."""

    def __init__(self, folder: Path, manifest: dict, handles: dict[str, Any], overlay: bytes):
        self.folder = folder
        self.manifest = manifest
        self.handles = handles
        self.overlay = overlay

    @classmethod
    def read(cls, folder: Path, kinds: tuple[str, ...] = _DATA) -> _Snapshot:
        """Open the files of the current manifest; retry if a writer replaced them meanwhile."""
        for _ in range(_OPEN_RETRIES):
            manifest = _read_manifest(folder)
            handles: dict[str, Any] = {}
            try:
                for kind in kinds:
                    handles[kind] = open(folder / manifest["files"][kind]["name"], "rb")
                ov = manifest["files"].get("overlay")
                overlay = (folder / ov["name"]).read_bytes() if ov else b""
            except FileNotFoundError as err:
                for fh in handles.values():
                    fh.close()
                if _read_manifest(folder)["generation"] != manifest["generation"]:
                    continue  # a writer committed and removed the old files: read the new generation
                missing = Path(err.filename).name
                way_out = (f"; {manifest['files']['triples']['name']} holds the triples, so "
                           f"KBStore.rebuild({str(folder)!r}, encoder) can re-encode them"
                           if missing.startswith(("keys-", "values-")) else
                           "; restore the folder from a backup")
                raise KBStoreError(f"{folder / missing} is missing but {MANIFEST} (generation "
                                   f"{manifest['generation']}) needs it{way_out}") from None
            return cls(folder, manifest, handles, overlay)
        raise KBStoreError(f"{folder} changed {_OPEN_RETRIES} times while being opened; try again")

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()


def _truncated_triples(snap: _Snapshot, size: int) -> KBStoreError:
    meta = snap.manifest["files"]["triples"]
    rows = int(snap.manifest["rows"])
    lines = _pread_all(snap.handles["triples"].fileno(), size, 0).count(b"\n")
    return KBStoreError(f"{snap.folder / meta['name']} is truncated: {min(lines, rows)} of {rows} rows intact "
                        f"({size} of {meta['bytes']} bytes); the triples after that are lost from this file, so "
                        "restore the folder from a backup (the embeddings alone cannot give them back)")


# ------------------------------------------------------------------------------- checked, lazy reads

# Blocks whose sha256 matched the manifest in this process, by (path, device, inode, start, end, sha256).
# Committed bytes never change, so one check per block per process is enough to turn a damaged row into
# an error rather than an answer; verify() re-reads everything regardless. The path is in the key so
# that a deleted file's inode, reused by another, is never taken as checked.
_VERIFIED: set[tuple[str, int, int, int, int, str]] = set()


def _block_key(fh, start: int, end: int, sha: str, st: os.stat_result | None = None
               ) -> tuple[str, int, int, int, int, str]:
    """`st`: the file's fstat, when the caller checks many blocks of it (one system call, not one a block)."""
    st = st or os.fstat(fh.fileno())
    return (str(fh.name), st.st_dev, st.st_ino, start, end, sha)


def _damage(folder: Path, kind: str, name: str, bad: list[int], rows: int, block_rows: int) -> KBStoreError:
    where = f"{folder / name}: rows {_row_ranges(bad, rows, block_rows)} do not match their checksums"
    if kind == "triples":
        advice = "these triples cannot be trusted: restore the folder from a backup"
    else:
        advice = (f"the embeddings can be re-encoded from the triples with KBStore.rebuild({str(folder)!r}, "
                  "encoder) if the triples are intact (KBStore.open(path).verify() checks every file)")
    return KBStoreError(f"{where} (the file was damaged after it was written); {advice}")


def _check_blocks(folder: Path, kind: str, fh, table: _Blocks, rows: int, blocks: Iterable[int] | None = None) -> None:
    """Compare the given blocks (default: all) of a committed data file with the manifest's sha256s
    (``table``: the manifest's block table, built once per generation by the caller), each block once per
    process; raise naming the damaged rows."""
    todo = range(len(table.blocks)) if blocks is None else blocks
    bad, st = [], os.fstat(fh.fileno())
    for b in todo:
        start, (end, sha) = table.start(b), table.blocks[b]
        key = _block_key(fh, start, end, sha, st)
        if key in _VERIFIED:
            continue
        data = _pread_all(fh.fileno(), end - start, start)
        if len(data) == end - start and hashlib.sha256(data).hexdigest() == sha:
            _VERIFIED.add(key)
        else:
            bad.append(b)
    if bad:
        raise _damage(folder, kind, table.name, sorted(bad), rows, table.block_rows)


_DERIVED_TEMP_AGE_S = 600  # a derived file's temp file older than this is a crash's leftover, not a save


class _DerivedFiles:
    """Where one kind of derived file (kblam.store.index, names, rowsums) lives in a store's folder: per
    generation G that saved one, a data file ``<prefix>-<G><suffix>`` and its record ``<prefix>-<G>.json``."""

    def __init__(self, prefix: str, suffix: str):
        self.prefix, self.suffix = prefix, suffix
        self._record = re.compile(rf"^{re.escape(prefix)}-(\d+)\.json$")

    def paths(self, folder: Path, generation: int) -> tuple[Path, Path]:
        """(data file, record) of a generation."""
        stem = f"{self.prefix}-{generation:08d}"
        return folder / f"{stem}{self.suffix}", folder / f"{stem}.json"

    def saved(self, folder: Path) -> list[tuple[int, Path]]:
        """(generation, record path) of every saved one in the folder, newest first."""
        found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := self._record.match(name))]
        return sorted(found, reverse=True)

    def usable_npz(self, folder: Path, problem, arrays: Iterable[str]) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
        """Each saved record, newest first, that ``problem(info, data file)`` finds usable, with the named
        arrays of its .npz; a record replaced by a newer save meanwhile, or unreadable, is skipped."""
        for generation, record in self.saved(folder):
            data_file = self.paths(folder, generation)[0]
            try:
                info = json.loads(record.read_text(encoding="utf-8"))
                if not isinstance(info, dict) or problem(info, data_file) is not None:
                    continue
                with np.load(data_file, allow_pickle=False) as data:
                    loaded = {name: data[name] for name in arrays}
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
                continue
            yield info, loaded

    def newest(self, folder: Path, problem) -> tuple[Path, dict | None, str | None] | None:
        """The newest record, what it holds and why it cannot be used (``problem(info, data file)``, None:
        it can); None when none is saved. What a `kblam kb inspect` line says."""
        saved = self.saved(folder)
        if not saved:
            return None
        generation, record = saved[0]
        try:
            info = json.loads(record.read_text(encoding="utf-8"))
            why = problem(info, self.paths(folder, generation)[0]) if isinstance(info, dict) else "not JSON"
        except (OSError, ValueError) as err:
            info, why = None, str(err)
        return record, info, why

    def cleanup(self, folder: Path, keep: int | None) -> None:
        """Writer only: see _cleanup_derived."""
        _cleanup_derived(folder, self.prefix, (self.suffix, ".json"), keep)

    def save_npz(self, store, arrays: dict[str, np.ndarray], info: dict) -> tuple[Path, dict] | None:
        """Save ``arrays`` (numpy's .npz) and their record (``info`` with the generation and the file's size
        and sha256) for the store's generation; the writer then drops older files. (data file, record) as
        written; None when the folder cannot be written (read-only, a full disk: what was built still
        serves this process)."""
        generation = store.generation
        data_file, record = self.paths(store.path, generation)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        payload = buffer.getvalue()  # 17 to 20 MB at a million triples: hashed here, not read back
        info = {**info, "generation": generation, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        try:
            _atomic_write(data_file, payload)
            _atomic_write(record, json.dumps(info, indent=1) + "\n")  # the record makes the file visible
        except OSError:
            return None
        if not store.readonly:
            self.cleanup(store.path, keep=generation)
        return data_file, info


def _block_shas(meta: dict, blocks: int) -> bytes:
    """The manifest's sha256s of a data file's first ``blocks`` blocks, joined: what a derived file's
    fingerprint hashes (in one update: 12,000 small ones took 13 ms at a million rows, measured while
    developing)."""
    return "".join(str(sha) for _, sha in meta["blocks"][:blocks]).encode()


def _whole_block_rows(manifest: dict) -> int:
    """The committed rows in whole checksum blocks: what a derived file covers, so that the manifest's
    sha256s of those blocks fingerprint it (a partial block's changes as rows are appended)."""
    br = int(manifest["block_rows"])
    return int(manifest["rows"]) // br * br


def _cleanup_derived(folder: Path, prefix: str, suffixes: tuple[str, ...], keep: int | None) -> None:
    """Writer only: delete a derived file kind's files (``<prefix>-<G><suffix>``: a saved pre-filter or
    name index) of generations other than ``keep``, and the temp files of its saves that a crash left."""
    ends = "|".join(re.escape(s) for s in suffixes)
    temp = re.compile(rf"^\.{re.escape(prefix)}-\d+(?:{ends})\..+\.tmp$")  # _atomic_write's temp names
    now = time.time()
    for name in os.listdir(folder):
        path = folder / name
        with contextlib.suppress(OSError, ValueError):
            if temp.match(name):
                if now - path.stat().st_mtime > _DERIVED_TEMP_AGE_S:
                    path.unlink()
            elif name.startswith(f"{prefix}-") and name.endswith(suffixes):
                if int(name[len(prefix) + 1:].split(".")[0]) != keep:
                    path.unlink()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _derived_file_problem(path: Path, info: dict, checked: set) -> str | None:
    """Why a derived file (a saved pre-filter or name index) does not match the size and sha256 its record
    holds, or None. The file is hashed once per process: ``checked`` keeps the (path, inode, size, sha256)
    that matched."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path.name} is missing"
    if st.st_size != info.get("bytes"):
        return f"{path.name} has {st.st_size} bytes, {info.get('bytes')} were written (truncated?)"
    key = (str(path), st.st_ino, st.st_size, str(info.get("sha256")))
    if key not in checked:
        if _sha256_file(path) != info.get("sha256"):
            return f"{path.name} does not match its checksum (damaged)"
        checked.add(key)
    return None


def _stored_triple(record: Any) -> Triple:
    """A Triple from a stored record. The store wrote it from a Triple (normalised) and its block's
    checksum matched, so plain strings are taken as they are: a million Triple() validations are most
    of the time of reading a large store's triples. Anything else goes through Triple's own checks."""
    if type(record) is dict and len(record) == 3:
        name, prop, value = record.get("name"), record.get("property"), record.get("value")
        if type(name) is str and type(prop) is str and type(value) is str:
            t = object.__new__(Triple)
            t.__dict__.update(name=name, property=prop, value=value)
            return t
    return Triple(record["name"], record["property"], record["value"])


class _Lines:
    """The triples of a snapshot's JSONL file, read on demand.

    Opening a store parses no triple: a block's checksum is checked and its line offsets found the
    first time one of its rows is asked for, and only the lines asked for are parsed (a question's
    256 candidates, not a million triples). ``all()`` parses everything, block by block. Rows a
    writer appends after the snapshot live in ``extra``.
    """

    def __init__(self, snap: _Snapshot):
        m = snap.manifest
        self.folder = snap.folder
        meta = m["files"]["triples"]  # this snapshot's committed table (a writer's appends come after it)
        self.table = _Blocks.from_meta(meta, int(m["block_rows"]))  # a copy: a writer's appends come after it
        self.fh = snap.handles["triples"]
        self.rows = int(m["rows"])
        self.block_rows = int(m["block_rows"])
        self.extra: list[Triple] = []
        self._starts: dict[int, np.ndarray] = {}  # block -> file offset of each line start, then the end
        self._parsed: dict[int, Triple] = {}
        self._all: list[Triple] | None = None
        self._max_line: int | None = None
        self._extra_max, self._extra_seen = 0, 0

    def __len__(self) -> int:
        return self.rows + len(self.extra)

    def append(self, triple: Triple) -> None:
        self.extra.append(triple)

    def __iter__(self) -> Iterator[Triple]:
        yield from self.all()

    def __getitem__(self, row: int) -> Triple:
        if row >= self.rows:
            return self.extra[row - self.rows]
        if self._all is not None:
            return self._all[row]
        t = self._parsed.get(row)
        if t is None:
            b, j = divmod(row, self.block_rows)
            starts = self._starts.get(b)
            if starts is None:
                starts = self._index_block(b, self._read_block(b))
            line = _pread_all(self.fh.fileno(), int(starts[j + 1] - starts[j]), int(starts[j]))
            t = self._parsed[row] = self._parse([line], b * self.block_rows + j)[0]
        return t

    def take(self, rows: Iterable[int], lines: tuple[np.ndarray, np.ndarray] | None = None) -> list[Triple]:
        """The triples of these rows. ``lines``: the offsets of the first rows' lines (and of the end of the
        last) and each line's crc32 (kblam.store.rowsums): such a row whose block was not read yet is read
        as its own line and checked against its crc32; one that does not match is read through its
        block, whose sha256 decides."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._all is None and len(rows) > self.rows // 8:
            self.all()  # most of the file: one pass is faster than line by line
        if lines is None or self._all is not None:
            return [self[r] for r in rows.tolist()]
        offsets, sums = lines
        fd, read, good = self.fh.fileno(), set(), []
        for r in rows.tolist():
            if r not in self._parsed and r not in read and r < len(sums) and r // self.block_rows not in self._starts:
                read.add(r)
                line = _pread_all(fd, int(offsets[r + 1] - offsets[r]), int(offsets[r]))
                if zlib.crc32(line) == sums[r]:
                    good.append((r, line))
        if good:
            try:  # one JSON document for all the lines read
                parsed = self._parse([line for _, line in good], 0)
            except KBStoreError:
                parsed = [self._parse([line], r)[0] for r, line in good]  # names the row that is not a triple
            self._parsed.update(zip((r for r, _ in good), parsed, strict=True))
        return [self[r] for r in rows.tolist()]  # parsed ones from _parsed; any other through its block

    def all(self) -> list[Triple]:
        if self._all is None:
            out: list[Triple] = []
            for b in range(len(self.table.blocks)):
                data = self._read_block(b)
                out.extend(self._parse(data[:-1].split(b"\n"), b * self.block_rows))
            self._all = out
            self._parsed.clear()
        return self._all + self.extra

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[Triple]:
        """The triples of rows [start, stop) (default: to the end, appended rows included), parsed a block
        at a time and not kept: what the store's name index reads (kblam.store.names) without holding a
        million Triples."""
        stop = len(self) if stop is None else stop
        if self._all is not None:
            yield from self.all()[start:stop]
            return
        committed = min(stop, self.rows)
        for b in range(start // self.block_rows, -(-committed // self.block_rows) if committed > start else 0):
            first = b * self.block_rows
            lines = self._read_block(b)[:-1].split(b"\n")
            lo, hi = max(start - first, 0), min(committed - first, len(lines))
            yield from self._parse(lines[lo:hi], first + lo)
        yield from self.extra[max(start - self.rows, 0):max(stop - self.rows, 0)]

    def max_line_bytes(self) -> int:
        """The longest line's bytes (newline excluded), committed rows and appended ones: one pass of
        newline search over the file, remembered, without parsing a triple."""
        if self._max_line is None:
            longest, fd, pos, end, carry = 0, self.fh.fileno(), 0, self.table.bytes, 0
            while pos < end:
                chunk = np.frombuffer(_pread_all(fd, min(1 << 26, end - pos), pos), dtype=np.uint8)
                if not len(chunk):
                    break
                ends = np.flatnonzero(chunk == 10)
                if len(ends):
                    lengths = np.diff(ends, prepend=-1) - 1
                    lengths[0] += carry  # the line that began in the previous chunk
                    longest, carry = max(longest, int(lengths.max())), len(chunk) - 1 - int(ends[-1])
                else:
                    carry += len(chunk)
                pos += len(chunk)
            self._max_line = longest
        for t in self.extra[self._extra_seen:]:  # rows a writer appended since the snapshot
            self._extra_max = max(self._extra_max, len(_triple_line(t)) - 1)
        self._extra_seen = len(self.extra)
        return max(self._max_line, self._extra_max)

    def _read_block(self, b: int) -> bytes:
        start, (end, sha) = self.table.start(b), self.table.blocks[b]
        data = _pread_all(self.fh.fileno(), end - start, start)
        key = _block_key(self.fh, start, end, sha)
        if key not in _VERIFIED:
            if len(data) != end - start or hashlib.sha256(data).hexdigest() != sha:
                raise _damage(self.folder, "triples", self.table.name, [b], self.rows, self.block_rows)
            _VERIFIED.add(key)
        lines = min(self.block_rows, self.rows - b * self.block_rows)
        if not data.endswith(b"\n") or data.count(b"\n") != lines:
            raise self._bad(b * self.block_rows, f"block {b} does not hold {lines} lines")
        return data

    def _index_block(self, b: int, data: bytes) -> np.ndarray:
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) + 1
        start = self.table.start(b)
        starts = self._starts[b] = np.concatenate([[0], ends]).astype(np.int64) + start
        return starts

    def _parse(self, lines: list[bytes], first: int) -> list[Triple]:
        try:
            return [_stored_triple(r) for r in json.loads(b"[" + b",".join(lines) + b"]")]
        except (ValueError, KeyError, TypeError, KBFormatError):
            for i, line in enumerate(lines):
                try:
                    _stored_triple(json.loads(line))
                except (ValueError, KeyError, TypeError, KBFormatError) as err:
                    raise self._bad(first + i, f"not a triple record ({err})") from None
            raise

    def _bad(self, row: int, why: str) -> KBStoreError:
        return KBStoreError(f"{self.folder / self.table.name}, line {row + 1}: {why}, although its checksum "
                            "matches (written by another program?); restore the folder from a backup")


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at end of file); one pread is capped near 2 GiB."""
    parts = []
    while size > 0:
        part = os.pread(fd, min(size, 1 << 30), offset)
        if not part:
            break
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)


def _read_overlay(snap: _Snapshot, rows: int) -> tuple[set[int], dict[int, int]]:
    ov = snap.manifest["files"].get("overlay")
    if not ov:
        return set(), {}
    name = snap.folder / ov["name"]
    if len(snap.overlay) != ov["bytes"] or hashlib.sha256(snap.overlay).hexdigest() != ov["sha256"]:
        raise KBStoreError(f"{name} does not match its size/checksum in the manifest: which rows are "
                           "updated or removed is unknown; restore the folder from a backup")
    arr = np.frombuffer(snap.overlay, dtype=_I64)
    h, k = int(ov["hidden"]), int(ov["moves"])
    if len(arr) != h + 2 * k or (len(arr) and (arr.min() < 0 or arr.max() >= rows)):
        raise KBStoreError(f"{name} is inconsistent with the manifest ({rows} rows)")
    hidden = set(arr[:h].tolist())
    moves = dict(zip(arr[h:h + k].tolist(), arr[h + k:].tolist(), strict=True))
    if any(s in hidden or r not in hidden for s, r in moves.items()):
        raise KBStoreError(f"{name} is inconsistent: a moved slot is hidden or its new row is not")
    return hidden, moves


def _check_sizes(snap: _Snapshot, kinds: tuple[str, ...] = _DATA) -> dict[str, int]:
    """Raise on truncation (naming the file and the intact rows); return trailing uncommitted bytes."""
    m = snap.manifest
    rows, row_bytes = int(m["rows"]), int(m["dim"]) * 2
    trailing, problems = {}, []
    for kind in kinds:
        meta = m["files"][kind]
        size = os.fstat(snap.handles[kind].fileno()).st_size
        if size > meta["bytes"]:
            trailing[kind] = size - meta["bytes"]
        elif size < meta["bytes"] and kind == "triples":
            raise _truncated_triples(snap, size)
        elif size < meta["bytes"]:
            problems.append(f"{snap.folder / meta['name']} is truncated: {size // row_bytes} of {rows} rows "
                            f"intact ({size} of {meta['bytes']} bytes)")
    if problems:
        raise KBStoreError("; ".join(problems) + f". {m['files']['triples']['name']} still holds all "
                           f"{m['count']} triples, so the embeddings can be re-encoded: "
                           f"KBStore.rebuild({str(snap.folder)!r}, encoder)")
    return trailing


def _lock(folder: Path) -> int:
    """Take the single-writer lock (non-blocking); returns its fd, held until close()."""
    if fcntl is None:  # pragma: no cover
        raise KBStoreError("writing a KB store needs fcntl.flock (POSIX); open it with readonly=True")
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _read_lock_pid(folder)
        who = f"process {pid}" if pid else "another process"
        raise KBStoreError(f"{folder} is open for writing by {who} (or by another KBStore in this one); "
                           "open it with readonly=True to read, or close the other writer first") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
