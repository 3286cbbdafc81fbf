"""Turn files and tables into ``kblam.kb.KnowledgeBase`` objects.

One module per input kind: ``tabular`` (CSV/TSV), ``jsonfile`` (JSON, JSON Lines), ``records``
(Python records, plus the aliases and validation every loader shares), ``hf_dataset``
(Hugging Face ``datasets``, imported only when used), ``files`` (choosing by suffix) and
``inspect`` (the report behind ``kblam kb inspect``).
"""

from .files import LOADERS, SUPPORTED_SUFFIXES, load_file
from .hf_dataset import load_dataset_kb
from .inspect import InspectResult, format_inspect, inspect_file, inspect_kb
from .jsonfile import load_json, load_jsonl
from .records import ALIASES, load_records
from .tabular import load_csv

__all__ = [
    "ALIASES",
    "LOADERS",
    "SUPPORTED_SUFFIXES",
    "InspectResult",
    "format_inspect",
    "inspect_file",
    "inspect_kb",
    "load_csv",
    "load_dataset_kb",
    "load_file",
    "load_json",
    "load_jsonl",
    "load_records",
]
