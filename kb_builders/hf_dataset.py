"""Knowledge bases from Hugging Face ``datasets`` (in memory, or local files via load_dataset).

``datasets`` is imported inside the functions: it is slow to import and only needed here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

from kblam.kb import KBFormatError, KnowledgeBase

from .records import MAX_FIELD_CHARS, RecordReader, read_all, resolve_columns
from .textio import check_file

# suffix -> (datasets builder, extra builder arguments)
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
}


def _load_local(path: str | os.PathLike, split: str):
    import datasets
    from datasets.utils import logging as ds_logging

    p = check_file(path)
    builder = _BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise KBFormatError(f"from_dataset cannot read {p.suffix or 'files without a suffix'!r}; "
                            f"supported: {', '.join(_BUILDERS)}", path=path)
    name, extra = builder
    if name == "parquet":
        _check_parquet(p)
    if name == "csv":
        extra = {**extra, **_csv_as_strings(p, extra.get("sep", ","))}
    # A throwaway cache dir + keep_in_memory: converting a KB file should not leave Arrow copies
    # in ~/.cache. Progress bars and info logs are muted for the call and then restored.
    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # failures become our KBFormatError
    try:
        with tempfile.TemporaryDirectory(prefix="kblam-ds-") as cache:
            return datasets.load_dataset(name, data_files=os.fspath(p), split=split, cache_dir=cache,
                                         keep_in_memory=True, **extra)
    except Exception as err:
        raise KBFormatError(f"datasets could not read it: {_root_cause(err)}", path=path) from err
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        ds_logging.set_verbosity(verbosity)


def _root_cause(err: BaseException) -> str:
    """The innermost exception's first line: datasets wraps the parser's useful message (e.g. "EOF
    inside string starting at row 1") in a generic DatasetGenerationError."""
    for _ in range(10):  # a bounded walk: exception chains can loop
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _check_parquet(path) -> None:
    # datasets reports an empty or broken parquet file as a generic DatasetGenerationError; the
    # file's footer says it all in milliseconds, before datasets starts.
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise KBFormatError("file is empty", path=path)
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as err:
        raise KBFormatError(f"not a readable parquet file ({err})", path=path) from None
    if meta.num_rows == 0:
        names = ", ".join(repr(n) for n in meta.schema.names) or "none"
        raise KBFormatError(f"the parquet file has no rows (columns: {names})", path=path)


def _csv_as_strings(path, sep: str) -> dict[str, Any]:
    # pandas would turn "26" into 26.0 when a column also holds 7.874, and "NA" into a missing
    # value; declaring every header column a string (and only "" as missing) keeps values exact.
    import csv

    import datasets

    from .tabular import repeated_column
    from .textio import read_text

    lines = (ln for ln in read_text(path).splitlines() if ln.strip())
    header = next(csv.reader([next(lines, "")], delimiter=sep))
    if (repeat := repeated_column([c.strip() for c in header])) is not None:
        # pandas would rename the repeat to 'value.1' and the KB would quietly use the first.
        raise KBFormatError(repeat, path=path, line=1)
    features = datasets.Features({col: datasets.Value("string") for col in header})
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def load_dataset_kb(dataset_or_path: Any, *, strict: bool = False, columns: Mapping[str, str] | None = None,
                    split: str = "train", source: str | None = None,
                    max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
    """Build a KnowledgeBase from a ``datasets.Dataset``/``DatasetDict`` (``split`` picks from a
    dict) or a local .parquet/.csv/.tsv/.json/.jsonl file. Errors say "row N" (1-based).
    Names, properties and values longer than ``max_field_chars`` are errors (None: no limit)."""
    import datasets

    if isinstance(dataset_or_path, (str, os.PathLike)):
        source = source or os.fspath(dataset_or_path)
        where = os.path.basename(os.fspath(dataset_or_path))  # short locations, like the CSV loader
        ds = _load_local(dataset_or_path, split)
    else:
        ds = dataset_or_path
        where = source or "<dataset>"
    label = source or "<dataset>"
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise KBFormatError(f"no split {split!r}; available splits: {', '.join(ds)}", path=label)
        ds = ds[split]
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"expected a datasets.Dataset, DatasetDict or a file path, got {type(ds).__name__}")

    problems: list[str] = []
    names = ds.column_names  # None for some streaming datasets: then each row's keys are resolved
    if names is not None:
        try:
            cmap = resolve_columns(names, columns)
        except KBFormatError as err:
            raise KBFormatError(err.reason, path=label) from None
        problems.extend(cmap.notes)
        if cmap.extra:
            problems.append(f"ignored extra column(s): {', '.join(map(repr, cmap.extra))}")
        ds = ds.select_columns(list(cmap.fields.values()))
        columns = cmap.fields
    reader = RecordReader(columns, max_field_chars)
    items, rows = read_all(reader, ds, label=label, where=where, unit="row")
    if not rows:
        raise KBFormatError("the dataset has no rows", path=label)
    return KnowledgeBase._assemble(items, source=source, strict=strict, rows_read=rows,
                                   problems=problems + reader.problems())
