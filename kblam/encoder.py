"""The frozen sentence encoder that turns triples into key/value embeddings, with a per-text cache.

The cache is keyed by the text itself (one cache per encoder), so changing one triple's value
re-encodes that one value and nothing else. A KB's texts (`keep=True`) stay as long as the encoder,
in float16 as a KBStore keeps them (half the memory; an encoder whose vectors float16 cannot hold keeps
float32); every other text (questions, what the confidence compares) goes to a cache of the `recent` last ones,
so that a server answering new questions for months does not grow by a vector per question.
"""

from __future__ import annotations

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

    @torch.no_grad()
    def _encode(self, texts: Sequence[str], keep: bool) -> torch.Tensor:
        """encode(), in the dtype the vectors are cached in: float16 when every text is a kept one."""
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

    def encode_kb(
        self,
        kb: KnowledgeBase | Sequence[Triple],
        key_template: str = KEY_TEMPLATE,
        value_template: str = VALUE_TEMPLATE,
    ) -> KBEmbeddings:
        triples = tuple(kb)
        if not triples:
            raise ValueError("the knowledge base is empty: add at least one triple before asking")
        keys = [t.key_text(key_template) for t in triples]
        values = [t.value_text(value_template) for t in triples]
        # float16, as the encoder keeps them: a KB's embeddings are read by the adapter's projection (in
        # float32, a chunk at a time) and the key cosines, and float32 copies would double their memory.
        return KBEmbeddings(triples, self._encode(keys, keep=True), self._encode(values, keep=True))


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

    def clear(self) -> None:
        self.rows.clear()
        self._blocks.clear()
        self.dtype = torch.float16

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

    def take(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim) vectors of kept texts, in self.dtype."""
        index = torch.tensor([self.rows[t] for t in texts], dtype=torch.long)
        if len(self._blocks) == 1:
            return self._blocks[0][index]
        out = torch.empty(len(index), self.dim, dtype=self.dtype)
        block, offset = index // self.BLOCK, index % self.BLOCK
        for b, rows in enumerate(self._blocks):
            here = (block == b).nonzero()[:, 0]
            if len(here):
                out[here] = rows[offset[here]]
        return out
