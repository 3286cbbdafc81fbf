"""Pick a loader from a file's suffix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kblam.kb import KBFormatError, KnowledgeBase

from .hf_dataset import load_dataset_kb
from .jsonfile import load_json, load_jsonl
from .tabular import load_csv

LOADERS = {
    ".csv": load_csv,
    ".tsv": load_csv,
    ".txt": load_csv,
    ".json": load_json,
    ".jsonl": load_jsonl,
    ".ndjson": load_jsonl,
    ".parquet": load_dataset_kb,
}
SUPPORTED_SUFFIXES = tuple(LOADERS)


def load_file(path: str | os.PathLike, **kw: Any) -> KnowledgeBase:
    """Load a KB file, choosing the loader by suffix (case-insensitive); ``kw`` goes to the loader."""
    suffix = Path(path).suffix.lower()
    loader = LOADERS.get(suffix)
    if loader is None:
        kind = f"file type {suffix!r}" if suffix else "a file without a suffix"
        raise KBFormatError(f"unsupported {kind}; supported: {', '.join(SUPPORTED_SUFFIXES)}", path=path)
    return loader(path, **kw)
