"""The frozen sentence encoder that turns triples into key/value embeddings, with a per-text cache.

The cache is keyed by the text itself (one cache per encoder), so changing one triple's value
re-encodes that one value and nothing else. A KB's texts (`keep=True`) stay as long as the encoder,
in float16 as a KBStore keeps them (half the memory; an encoder whose vectors float16 cannot hold keeps
float32); every other text (questions, what the confidence compares) goes to a cache of the `recent` last ones,
so that a server answering new questions for months does not grow by a vector per question.
"""

from __future__ import annotations

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
        self._cache: dict[str, torch.Tensor] = {}  # the KBs' texts (encode(..., keep=True))
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
        for t in dict.fromkeys(texts) if recent else ():  # a recent text used now: kept, or the most recent
            if t not in recent:
                continue
            if keep:
                cache[t] = _kept(recent.pop(t))
            else:
                recent.move_to_end(t)
        if missing:
            show = self.progress if self.progress is not None else len(missing) >= 1000
            vectors = self.model.encode(
                missing, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=show
            )
            vectors = vectors.float().cpu()
            (cache if keep else recent).update(zip(missing, _kept(vectors) if keep else vectors, strict=True))
        out = torch.stack([cache[t] if t in cache else recent[t] for t in texts]) if texts else torch.empty(0, self.dim)
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


def _kept(vectors: torch.Tensor) -> torch.Tensor:
    """A KB's vectors as the encoder keeps them: float16, unless float16 cannot hold them."""
    half = vectors.half()
    return half if bool(torch.isfinite(half).all()) else vectors
