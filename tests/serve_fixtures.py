"""Helpers for the server's tests: a tiny model with the hash encoder, a store, and the app over them."""

from __future__ import annotations

from pathlib import Path

from conftest import HashEncoder, ask_model

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = ROOT / "examples" / "elements.csv"


def hash_encoder():
    from kblam.encoder import KBEncoder

    return KBEncoder(HashEncoder(), name="test/hash-encoder")


def tiny_model(encoder=None):
    """A tiny random Llama whose adapter quotes spans, as the shipped one does (answers are arbitrary)."""
    return ask_model("llama", encoder or hash_encoder(), retrieval_prior=True, null_slot=True,
                     span_kinds=["value", "fact"], query_rank=4)


def make_store(folder: Path, encoder, triples=None) -> Path:
    from kblam.kb import KnowledgeBase
    from kblam.store import KBStore

    with KBStore.create(folder, encoder) as store:
        if triples is not None:
            store.add(list(triples) if not isinstance(triples, Path) else list(KnowledgeBase.from_file(triples)),
                      progress=False)
    return folder


def make_app(model, store: Path, **config):
    from kblam.serve import ServeConfig, create_app

    config.setdefault("allowed_hosts", ["testserver"])
    return create_app(model, store, ServeConfig(**config), encoder=model.encoder)
