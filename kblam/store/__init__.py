"""A persistent knowledge-base store: triples and their key/value embeddings in one folder.

    store = KBStore.create("facts.kbstore", encoder)      # or KBStore.open(path, encoder)
    store.add(kb)                                         # encodes only what is new or changed

``core`` is the store (its docstring has the layout and the durability rules); ``files`` the
manifest, checksummed data files and snapshots it is built on.
"""

from kblam.store.core import BATCH_SIZE, BLOCK_ROWS, KBStore, is_store, load_kb
from kblam.store.files import FORMAT, FORMAT_VERSION, KBStoreError

__all__ = ["BATCH_SIZE", "BLOCK_ROWS", "FORMAT", "FORMAT_VERSION", "KBStore", "KBStoreError", "is_store", "load_kb"]
