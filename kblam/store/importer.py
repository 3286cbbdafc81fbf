"""Import KB files into a store, in commits, resumably: what ``kblam kb import`` runs.

    stats = import_sources(store, ["facts.csv", "encoded/"], commit_every=65536)

Sources: a KB file (CSV/TSV, JSON, JSONL, parquet: ``KnowledgeBase.from_file``, column aliases and
all its checks), or a folder of ``*.parquet`` shards with columns ``name``, ``property`` and
``value``, read a batch at a time. Shards, or a parquet file, with ``key_emb`` and ``value_emb``
columns as well carry embeddings computed elsewhere (docs/scale.md shows how, across processes or
machines): those are stored as they are instead of encoded.

Resuming: the triples are added ``commit_every`` at a time, each batch one atomic ``add()``. An
import that is killed keeps every committed batch; run it again and the store skips what it holds
already (an exact duplicate is never stored twice nor encoded again), so it goes on where it stopped
and ends with every triple exactly once. A triple is identified by (name, property): a later row of
the sources with another value updates it, as ``KBStore.add`` does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kblam.kb import KBFormatError, KnowledgeBase, Triple
from kblam.store.files import KBStoreError

if TYPE_CHECKING:
    from kblam.store.core import KBStore

_SHARD_ROWS = 4096  # rows read from a parquet shard at a time


class _Precomputed:
    """A sentence-encoder stand-in that answers from the current batch's precomputed vectors: the
    store asks its encoder only for texts it does not hold, so this turns add() into a pure write."""

    def __init__(self, dim: int):
        self.dim = dim
        self.table: dict[str, np.ndarray] = {}

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, **_):
        missing = [t for t in texts if t not in self.table]
        if missing:
            raise KBStoreError(f"no precomputed embedding for {missing[0]!r} in this batch")
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def _parquet_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(source.glob("*.parquet"))
        if not files:
            raise KBFormatError("no *.parquet shards in this folder", path=source)
        return files
    return [source]


def _open_parquet(path: Path):
    """A pyarrow ParquetFile, or KBFormatError naming the file (pyarrow's own message does not)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as err:
        raise KBFormatError(f"cannot read it as parquet: {err}", path=path) from None


def _has_embeddings(source: Path) -> bool:
    if not (source.is_dir() or source.suffix.lower() == ".parquet"):
        return False
    names = set(_open_parquet(_parquet_files(source)[0]).schema_arrow.names)
    return {"key_emb", "value_emb"} <= names


def _shard_batches(source: Path, with_embeddings: bool) -> Iterator[tuple[list[Triple], Any, Any]]:
    """(triples, key embeddings, value embeddings) per batch of each shard, in file order."""
    columns = ["name", "property", "value"] + (["key_emb", "value_emb"] if with_embeddings else [])
    for path in _parquet_files(source):
        try:
            shard = _open_parquet(path)
            missing = [c for c in columns if c not in shard.schema_arrow.names]
            if missing:
                raise KBFormatError(f"missing column(s) {', '.join(missing)} (has {', '.join(shard.schema_arrow.names)})",
                                    path=path)
            row = 0
            for batch in shard.iter_batches(batch_size=_SHARD_ROWS, columns=columns):
                data = batch.to_pydict()
                triples = []
                for i, (n, p, v) in enumerate(zip(data["name"], data["property"], data["value"], strict=True)):
                    try:
                        triples.append(Triple(n, p, v))
                    except KBFormatError as err:
                        raise KBFormatError(err.reason, path=path, line=row + i + 1, unit="row") from None
                row += len(triples)
                if with_embeddings:
                    yield triples, np.asarray(data["key_emb"], np.float32), np.asarray(data["value_emb"], np.float32)
                else:
                    yield triples, None, None
        except (OSError, ValueError) as err:
            if isinstance(err, KBFormatError):
                raise
            raise KBFormatError(f"cannot read it as parquet: {err}", path=path) from None


def _file_batches(source: Path, strict: bool, bar) -> Iterator[tuple[list[Triple], None, None]]:
    kb = KnowledgeBase.from_file(source, strict=strict)
    triples = list(kb)
    if bar.total is None or bar.total < bar.n + len(triples):  # known once the file is read
        bar.total = bar.n + len(triples)
        bar.refresh()
    for start in range(0, len(triples), _SHARD_ROWS):
        yield triples[start:start + _SHARD_ROWS], None, None


def count_rows(source: Path) -> int | None:
    """Rows in a parquet source read shard by shard (from its metadata), for the progress bar; None
    for a KB file, which the loaders read whole (and count once read)."""
    if not (source.is_dir() or _has_embeddings(source)):
        return None
    return sum(_open_parquet(p).metadata.num_rows for p in _parquet_files(source))


def import_sources(store: KBStore, sources: list[str | os.PathLike], *, commit_every: int = 65_536,
                   strict: bool = False, progress: bool | None = None) -> dict[str, int]:
    """Add the triples of every source to ``store`` (opened for writing), ``commit_every`` per commit.
    Returns counts: rows read, triples new or changed, rows the store already held as they are."""
    from kblam.encoder import KBEncoder
    from kblam.store.core import _progress

    if commit_every < 1:
        raise ValueError(f"commit_every must be >= 1, got {commit_every}")
    paths = [Path(s) for s in sources]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
    counts = [count_rows(p) for p in paths]
    total = None if None in counts else sum(counts)
    stats = {"rows": 0, "changed": 0, "unchanged": 0}
    real_encoder = store.encoder
    with _progress(total, progress, f"importing into {store.path.name}") as bar:
        for path in paths:
            with_embeddings = _has_embeddings(path)
            if with_embeddings:
                lookup = _Precomputed(store.dim)
                store.encoder = KBEncoder(lookup, name=store.encoder_name)
                batches = _shard_batches(path, True)
            elif path.is_dir():  # shards of triples only: read a batch at a time, encoded here
                batches = _shard_batches(path, False)
            else:
                batches = _file_batches(path, strict, bar)
            try:
                pending: list[Triple] = []
                for triples, keys, values in batches:
                    if with_embeddings:
                        if keys.shape != (len(triples), store.dim) or values.shape != keys.shape:
                            raise KBFormatError(f"embeddings of shape {keys.shape} / {values.shape}; the store "
                                                f"holds {store.dim}-d ones ({store.encoder_name})", path=path)
                        kt, vt = store.key_template, store.value_template
                        for t, k, v in zip(triples, keys, values, strict=True):
                            lookup.table[t.key_text(kt)] = k
                            lookup.table[t.value_text(vt)] = v
                    pending.extend(triples)
                    while len(pending) >= commit_every:
                        _commit(store, pending[:commit_every], stats, bar)
                        pending = pending[commit_every:]
                    if with_embeddings and not pending:
                        lookup.table = {}  # every vector in it is stored now
                if pending:
                    _commit(store, pending, stats, bar)
            finally:
                store.encoder = real_encoder
    return stats


def _commit(store: KBStore, triples: list[Triple], stats: dict[str, int], bar) -> None:
    with warnings.catch_warnings():
        # Several values for one (name, property) across the sources: the last wins, as in add().
        warnings.filterwarnings("ignore", message=r".*several values in one add")
        changed = store.add(triples, progress=False)
    stats["rows"] += len(triples)
    stats["changed"] += changed
    stats["unchanged"] += len(triples) - changed
    bar.update(len(triples))
