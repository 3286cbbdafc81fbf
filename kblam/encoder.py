"""The frozen sentence encoder that turns triples into key/value embeddings, with a per-text cache.

The cache is keyed by the text itself (one cache per encoder), so changing one triple's value
re-encodes that one value and nothing else.
"""

from __future__ import annotations

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

    def __init__(self, model, name: str | None = None, batch_size: int = 128, progress: bool | None = None):
        self.model = model
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.batch_size = batch_size
        self.progress = progress
        self._cache: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"KBEncoder({self.name!r}, dim={self.dim}, cached={len(self._cache)})"

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim) float32 embeddings; only texts not seen before reach the model."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            show = self.progress if self.progress is not None else len(missing) >= 1000
            vectors = self.model.encode(
                missing, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=show
            )
            for text, vector in zip(missing, vectors.float().cpu(), strict=True):
                self._cache[text] = vector
        if not texts:
            return torch.empty(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

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
        return KBEmbeddings(triples, self.encode(keys), self.encode(values))
