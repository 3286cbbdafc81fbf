"""The server's KB: one KBStore writer for every edit, read-only stores for everything that reads.

- Writes go through the store's single writer (its flock is held while the server runs, so `kblam kb
  update` on the same folder is refused with a clear message instead of racing it), one at a time
  under a lock. A write returns only after the store committed it (fsynced data, then an atomic
  manifest switch), so every acknowledged write survives a crash.
- The KB's version is the store's generation. `If-Match` with a version refuses a write made
  against another one (VersionMismatch -> 412).
- Reads use `KBStore.shared`: a read-only store per thread, moved to the newest generation on each
  call. The answering thread reads its own, so a batch reads one generation from its first step to
  its last, whatever is written meanwhile (kblam.serve.batching).
- An upload is written to a file this server names, in a folder it made; the client's file name
  chooses only which loader reads it (its suffix, from a fixed list) and how errors name it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kblam.kb import KBFormatError, KnowledgeBase, Triple, triples_text
from kblam.store import KBStore

UPLOAD_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


class VersionMismatch(Exception):
    def __init__(self, current: int, given: str):
        self.current = current
        super().__init__(f"If-Match {given!r} does not name the KB's current version {current}: it changed "
                         "since you read it; read it again and retry")


class Conflict(Exception):
    """A POST of triples whose (name, property) is stored with another value (PATCH changes a value)."""


def if_match(header: str | None, version: int) -> bool:
    """RFC 9110 If-Match against the version: a list of entity tags (quoted or not, W/ ignored) or `*`."""
    if header is None:
        return True
    for tag in header.split(","):
        tag = tag.strip().removeprefix("W/").strip('"')
        if tag == "*" or tag == str(version):
            return True
    return False


def display_name(filename: str | None) -> str:
    """An uploaded file's name as error messages show it: its last part, printable, at most 80 characters."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch if ch.isprintable() else "?" for ch in name)[:80]
    return name or "upload"


class KBService:
    def __init__(self, path: str | os.PathLike, encoder):
        self.path = Path(path).resolve()
        # The writer encodes with its own encoder object: a fast tokenizer must not be shared with the
        # answering thread (concurrent calls fail with "Already borrowed").
        self._writer = KBStore.open(self.path, encoder)
        # Paid here, once, not by the first questions and edits: every block's checksum, and each row's
        # saved for later processes (kblam.store.rowsums; without them each question hashes its
        # candidates' blocks on their first read: docs/performance.md), and the name index (built if missing).
        self._writer.check()
        self._writer.entity_names()
        self._lock = threading.Lock()
        self._uploads = tempfile.TemporaryDirectory(prefix="kblam-uploads-")

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        self._uploads.cleanup()

    def reader(self) -> KBStore:
        """This thread's read-only store at the newest committed generation."""
        return KBStore.shared(self.path)

    @contextmanager
    def _write(self, expected: str | None) -> Iterator[KBStore]:
        with self._lock:
            store = self._writer
            if not if_match(expected, store.generation):
                raise VersionMismatch(store.generation, expected)
            yield store

    # --- reading --------------------------------------------------------------------------------

    def find(self, *, name: str | None = None, property: str | None = None, q: str | None = None,
             offset: int = 0, limit: int = 50) -> tuple[int, int, list[Triple]]:
        """(version, matches, one page of them): exact name and property, `q` in any field (case-insensitive)."""
        store = self.reader()
        version = store.generation
        name = name.strip() or None if name else None  # stored fields are stripped; blank is no filter
        prop = property.strip() or None if property else None
        needle = q.strip().casefold() or None if q else None
        if name and prop:
            found = store.get(name, prop)
            items = [] if found is None else [found]
        else:
            items = store.triples()
        items = [t for t in items if (name is None or t.name == name) and (prop is None or t.property == prop)
                 and (needle is None or any(needle in f.casefold() for f in (t.name, t.property, t.value)))]
        return version, len(items), items[offset:offset + limit]

    def export(self, fmt: str) -> tuple[int, str]:
        store = self.reader()
        return store.generation, triples_text(store.triples(), "." + fmt)

    # --- writing --------------------------------------------------------------------------------

    def add(self, triples: list[Triple], expected: str | None = None) -> tuple[int, int]:
        """Add new triples (exact duplicates of stored ones are skipped): (version, how many were new)."""
        kb = KnowledgeBase(triples, strict=True)  # one request giving a pair two values is an error
        with self._write(expected) as store:
            taken = [(t, old) for t in kb if (old := store.get(t.name, t.property)) is not None and old != t]
            if taken:
                shown = "; ".join(f"({t.name!r}, {t.property!r}) is {old.value!r}" for t, old in taken[:5])
                raise Conflict(f"{len(taken)} triple(s) are stored with another value: {shown}"
                               f"{' ...' if len(taken) > 5 else ''}. Change a value with PATCH")
            added = store.add(list(kb), progress=False)
            return store.generation, added

    def update(self, name: str, property: str, value: str, expected: str | None = None) -> int:
        with self._write(expected) as store:
            store.update(name, property, value)  # KeyError when absent
            return store.generation

    def remove(self, name: str, property: str | None, expected: str | None = None) -> tuple[int, int]:
        with self._write(expected) as store:
            removed = store.remove(name, property)  # KeyError when absent
            return store.generation, removed

    def load_upload(self, data: bytes, filename: str | None) -> KnowledgeBase:
        """Read an uploaded KB file with the validating loaders; KBFormatError names the upload and line."""
        shown = display_name(filename)
        suffix = Path(shown).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise KBFormatError(f"unsupported file type {suffix or '(no suffix)'!r}; upload one of "
                                f"{', '.join(UPLOAD_SUFFIXES)}", path=shown)
        fd, tmp = tempfile.mkstemp(suffix=suffix, dir=self._uploads.name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            try:
                kb = KnowledgeBase.from_file(tmp, strict=True)
            except KBFormatError as err:
                # A reader's message may quote the file it read: name the upload, never this server's path.
                raise KBFormatError(err.reason.replace(tmp, shown), path=shown, line=err.line, unit=err.unit) from None
        finally:
            os.unlink(tmp)
        if not len(kb):
            raise KBFormatError("the file holds no triples", path=shown)
        return kb

    def import_kb(self, kb: KnowledgeBase, expected: str | None = None) -> tuple[int, int]:
        """Add or update every triple of an uploaded KB in one atomic commit: (version, new or changed)."""
        with self._write(expected) as store:
            changed = store.add(list(kb), progress=False)
            return store.generation, changed
