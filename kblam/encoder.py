"""The frozen sentence encoder that turns triples into key/value embeddings, with a per-text cache.

The cache is keyed by the text itself (one cache per encoder), so changing one triple's value
re-encodes that one value and nothing else. A KB's texts (`keep=True`) stay as long as the encoder,
in float16 as a KBStore keeps them (half the memory; an encoder whose vectors float16 cannot hold keeps
float32); every other text (questions, what the confidence compares) goes to a cache of the `recent` last ones,
so that a server answering new questions for months does not grow by a vector per question.

The kept vectors are a KB's only copy: the KB cache reads a KnowledgeBase's embeddings through their row
numbers (`KBEncoder.kb_rows`, `KeptRows`) rather than a copy of them (1.5 KB a MiniLM triple less).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kblam.kb import KEY_TEMPLATE, VALUE_TEMPLATE, KnowledgeBase, Triple


@dataclass(frozen=True)
class KBEmbeddings:
    """A KB ready for the adapter: its triples and their key/value embeddings, row j for triple j."""

    triples: tuple[Triple, ...]
    keys: torch.Tensor  # (M, d)
    values: torch.Tensor  # (M, d)

    def __len__(self) -> int:
        return len(self.triples)


class KBEncoder:
    """Wraps a sentence-transformers model (or anything with `encode(list[str])` and a dimension)."""

    def __init__(self, model, name: str | None = None, batch_size: int = 128, progress: bool | None = None,
                 recent: int = 4096):
        self.model = model
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.batch_size = batch_size
        self.progress = progress
        self._cache = _KeptVectors(self.dim)  # the KBs' texts (encode(..., keep=True))
        # Other texts, least recently used first; a question and what its answer encodes after the forward
        # pass are read within one ask, so a few thousand are plenty (4,096 of MiniLM's: 6 MB).
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.recent = recent
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"KBEncoder({self.name!r}, dim={self.dim}, cached={len(self._cache) + len(self._recent)})"

    def __contains__(self, text: object) -> bool:
        """Whether `text` is cached (encoding it would not call the model)."""
        return text in self._cache or text in self._recent

    def encode(self, texts: Sequence[str], *, keep: bool = False) -> torch.Tensor:
        """(n, dim) float32 embeddings; only texts not cached reach the model. `keep`: a KB's texts, cached
        for good (their vectors rounded to float16); others are cached among the `recent` last."""
        return self._encode(texts, keep).float()

    def clear(self) -> None:
        """Forget every cached vector. A KB version that reads kept rows (KeptRows) keeps the old ones."""
        self._cache = _KeptVectors(self.dim)
        self._recent.clear()

    def _encode(self, texts: Sequence[str], keep: bool) -> torch.Tensor:
        """encode(), in the dtype the vectors are cached in: float16 when every text is a kept one."""
        cache, recent = self._fetch(texts, keep)
        if not texts:
            return torch.empty(0, self.dim)
        if keep or all(t in cache for t in texts):
            out = cache.take(texts)
        else:
            out = torch.empty(len(texts), self.dim)
            kept = [i for i, t in enumerate(texts) if t in cache]
            if kept:
                out[kept] = cache.take([texts[i] for i in kept]).float()
            others = [i for i, t in enumerate(texts) if t not in cache]
            out[others] = torch.stack([recent[texts[i]] for i in others])
        while len(recent) > self.recent:  # after reading them: one call may bring more than `recent` texts
            recent.popitem(last=False)
        return out

    @torch.no_grad()
    def _fetch(self, texts: Sequence[str], keep: bool) -> tuple[_KeptVectors, OrderedDict]:
        """Cache the texts not cached yet (kept for good with `keep`); the caches they are read from."""
        cache, recent = self._cache, self._recent
        missing = list(dict.fromkeys(t for t in texts if t not in cache and t not in recent))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        promoted = []  # recent texts now kept for good
        for t in dict.fromkeys(texts) if recent else ():  # a recent text used now: kept, or the most recent
            if t not in recent:
                continue
            if keep:
                promoted.append(t)
            else:
                recent.move_to_end(t)
        if promoted:
            cache.add(promoted, torch.stack([recent.pop(t) for t in promoted]))
        if missing:
            show = self.progress if self.progress is not None else len(missing) >= 1000
            vectors = self.model.encode(
                missing, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=show
            )
            vectors = vectors.float().cpu()
            if keep:
                cache.add(missing, vectors)
            else:
                recent.update(zip(missing, vectors, strict=True))
        return cache, recent

    def encode_kb(
        self,
        kb: KnowledgeBase | Sequence[Triple],
        key_template: str = KEY_TEMPLATE,
        value_template: str = VALUE_TEMPLATE,
    ) -> KBEmbeddings:
        """The KB's key and value embeddings, (M, dim) each: a copy of its kept rows (the caller's to change;
        kb_rows reads them without one). float16, as the encoder keeps them: the adapter's projection widens
        a chunk at a time, the key cosines 512 rows at a time, and float32 copies would double their memory."""
        triples, keys, values = self.kb_rows(kb, key_template, value_template)
        return KBEmbeddings(triples, keys.gathered(), values.gathered())

    def kb_rows(
        self,
        kb: KnowledgeBase | Sequence[Triple],
        key_template: str = KEY_TEMPLATE,
        value_template: str = VALUE_TEMPLATE,
    ) -> tuple[tuple[Triple, ...], KeptRows, KeptRows]:
        """(triples, keys, values): the KB's texts kept (encoded if need be), and their rows read in place."""
        triples = tuple(kb)
        if not triples:
            raise ValueError("the knowledge base is empty: add at least one triple before asking")
        keys = [t.key_text(key_template) for t in triples]
        values = [t.value_text(value_template) for t in triples]
        while True:  # again if clear() (another thread) came between the two: both read one set of kept rows
            kept, _ = self._fetch(keys, keep=True)
            if self._fetch(values, keep=True)[0] is kept:
                return triples, KeptRows(kept, kept.rows_of(keys)), KeptRows(kept, kept.rows_of(values))


class _KeptVectors:
    """A KB's texts' vectors, kept for good: text -> row of a few large float16 blocks (float32 for an
    encoder whose vectors float16 cannot hold).

    Not a dict of one tensor per text: each tensor object costs some hundreds of bytes beside a MiniLM
    vector's 768 (measured while developing: a KnowledgeBase of 100,000 triples held 0.66 KB a triple
    more so), and a KB's rows are gathered by index in one call rather than stacked one by one.
    """

    BLOCK = 1 << 16  # rows a block holds once full; the last one grows by doubling up to it

    def __init__(self, dim: int):
        self.dim = dim
        self.rows: dict[str, int] = {}
        self._blocks: list[torch.Tensor] = []
        self.dtype = torch.float16
        # add() writes rows then names them: one writer at a time (an edit in one thread may encode while
        # another thread's question does); readers only look up rows already named.
        self._lock = threading.Lock()

    def __contains__(self, text: object) -> bool:
        return text in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, texts: Sequence[str], vectors: torch.Tensor) -> None:
        """Keep the vectors (n, dim) of n texts not kept yet."""
        with self._lock:
            new = [i for i, t in enumerate(texts) if t not in self.rows]  # another thread may have kept some
            self._add([texts[i] for i in new], vectors[new])

    def _add(self, texts: list[str], vectors: torch.Tensor) -> None:
        if self.dtype == torch.float16 and not bool(torch.isfinite(vectors.half()).all()):
            self.dtype = torch.float32  # beyond float16's range: every vector kept in float32 from now on
            self._blocks = [block.float() for block in self._blocks]
        done, at = 0, len(self.rows)
        while done < len(texts):
            block, offset = divmod(at, self.BLOCK)
            if block == len(self._blocks):  # a new block starts empty and grows below
                self._blocks.append(torch.empty(0, self.dim, dtype=self.dtype))
            rows = self._blocks[block]
            if offset == rows.shape[0]:  # the last block is full below BLOCK rows: double it
                grown = torch.empty(min(self.BLOCK, max(256, 2 * offset, offset + len(texts) - done)), self.dim,
                                    dtype=self.dtype)
                grown[:offset] = rows
                rows = self._blocks[block] = grown
            n = min(len(texts) - done, rows.shape[0] - offset)
            rows[offset:offset + n] = vectors[done:done + n]
            done, at = done + n, at + n
        self.rows.update(zip(texts, range(len(self.rows), at), strict=True))

    def rows_of(self, texts: Sequence[str]) -> torch.Tensor:
        """(n,) row numbers of kept texts: a row never changes (vectors are only ever added)."""
        return torch.tensor([self.rows[t] for t in texts], dtype=torch.long)

    def take(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim) vectors of kept texts, in self.dtype."""
        return self.take_rows(self.rows_of(texts))

    def take_rows(self, index: torch.Tensor) -> torch.Tensor:
        """(*index.shape, dim) vectors of rows `index` (a copy), in self.dtype."""
        shape, index = index.shape, index.reshape(-1)
        blocks = self._blocks  # read once: growth or a switch to float32 replaces the list's tensors
        if len(blocks) == 1:
            return blocks[0][index].view(*shape, self.dim)
        out = torch.empty(len(index), self.dim, dtype=blocks[0].dtype)
        block, offset = index // self.BLOCK, index % self.BLOCK
        for b, rows in enumerate(blocks):
            here = (block == b).nonzero()[:, 0]
            if len(here):
                out[here] = rows[offset[here]]
        return out.view(*shape, self.dim)

    def run(self, start: int, count: int) -> torch.Tensor | None:
        """Rows start .. start + count - 1 as a view, or None where they do not lie in one block."""
        block, offset = divmod(start, self.BLOCK)
        if offset + count > self.BLOCK:
            return None
        return self._blocks[block][offset:offset + count]


class KeptRows:
    """A KB's key (or value) embeddings as row numbers into an encoder's kept vectors: no copy of them.

    Read as an (M, dim) float16 tensor is, for what a KB's embeddings are read for (the adapter's projection,
    the key norms and cosines, the pre-filter's candidates): `rows[i:j]` (a view where those rows lie in
    order in one block, as a KB encoded afresh has its keys) and `rows[index]` (gathered); `rows[:]` is
    the whole matrix. Read only: an edit of the KB changes its row numbers (`index`), never a vector (other
    KBs may read the same text's row). Hand-written rather than a tensor subclass: three operations are
    needed, and a subclass would have to answer for all of torch's.
    """

    def __init__(self, kept: _KeptVectors, index: torch.Tensor):
        self.vectors = kept
        self.index = index  # (M,) int64
        self._starts: list[int] | None = None  # positions where a run of consecutive rows in one block starts

    def set(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Point `positions` at other kept rows (an edit of the KB); nobody may be reading these."""
        self.index[positions] = rows
        self._starts = None

    def __len__(self) -> int:
        return self.index.shape[0]

    def __repr__(self) -> str:
        return f"KeptRows({len(self)} rows of {self.vectors.dim})"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.vectors.dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.vectors.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return 2

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            if start < stop and self._one_run(start, stop):
                return self.vectors.run(int(self.index[start]), stop - start)
        return self.vectors.take_rows(self.index[key])

    def _one_run(self, start: int, stop: int) -> bool:
        """Whether positions start .. stop - 1 read consecutive rows of one block (a view of them). Found from
        the runs' starts, computed once: the cosines read a KB 512 rows at a time, and four torch calls a
        read to check it cost more than the read (~6 ms a question at 100,000 triples)."""
        starts = self._starts
        if starts is None:
            index = self.index
            block = index // self.vectors.BLOCK
            starts = self._starts = (((index.diff() != 1) | (block.diff() != 0)).nonzero()[:, 0] + 1).tolist()
        return bisect.bisect_right(starts, start) == bisect.bisect_left(starts, stop)

    def gathered(self) -> torch.Tensor:
        """The (M, dim) matrix as a tensor of its own (a copy, never a view of the kept vectors)."""
        return self.vectors.take_rows(self.index)

    def copy(self, index: torch.Tensor | None = None) -> KeptRows:
        """Rows of the same kept vectors with their own row numbers (`index`, else a copy of these)."""
        return KeptRows(self.vectors, self.index.clone() if index is None else index)
