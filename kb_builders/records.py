"""Column/key aliases and record -> triple conversion shared by every loader."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kblam.kb import (
    FIELDS,
    MAX_FIELD_CHARS,
    KBFormatError,
    KnowledgeBase,
    Triple,
    _short_repr,
    normalize_field,
)

# Accepted header/key names per field, in priority order (matched case-insensitively).
ALIASES: dict[str, tuple[str, ...]] = {
    "name": ("name", "entity", "subject", "head", "s"),
    "property": ("property", "relation", "predicate", "attribute", "relationship", "p", "key"),
    "value": ("value", "object", "tail", "o", "answer"),
}


def preview(value: Any) -> str:
    """A short repr for messages, safe for values 10 MB long or nested thousands of levels deep."""
    return _short_repr(value, 50)


def _fold(name: str) -> str:
    return name.replace("\ufeff", "").strip().casefold()


def _quoted(names: Iterable[str], show: int = 12) -> str:
    names = list(names)
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return ", ".join(preview(n) for n in names[:show]) + more


@dataclass
class ColumnMap:
    """Which input column (or key) feeds each triple field."""

    fields: dict[str, str]
    extra: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_columns_arg(columns: Mapping[str, str] | None) -> dict[str, str]:
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise TypeError(f"columns= must be a dict like {{'name': 'Country'}}, got {type(columns).__name__}")
    unknown = [k for k in columns if k not in FIELDS]
    if unknown:
        raise ValueError(f"columns= keys must be among {', '.join(FIELDS)}; got {_quoted(unknown)}")
    return dict(columns)


def resolve_columns(available: Sequence[str], columns: Mapping[str, str] | None = None, *,
                    what: str = "column") -> ColumnMap:
    """Map name/property/value to entries of ``available`` (header cells or record keys).

    ``columns`` overrides the aliases for some fields. Raises KBFormatError (without a
    location; callers add it) when a field cannot be found.
    """
    overrides = check_columns_arg(columns)
    folded: dict[str, str] = {}
    for col in available:
        folded.setdefault(_fold(col), col)
    chosen: dict[str, str] = {}
    notes: list[str] = []
    missing: list[str] = []
    for f, wanted in overrides.items():
        col = wanted if wanted in available else folded.get(_fold(wanted))
        if col is None:
            raise KBFormatError(f"{what} {wanted!r} (given in columns= for {f!r}) not found; "
                                f"found {what}s: {_quoted(available)}")
        chosen[f] = col
    for f in FIELDS:
        if f in chosen:
            continue
        used = set(chosen.values())
        candidates = [folded[a] for a in ALIASES[f] if a in folded and folded[a] not in used]
        if not candidates:
            missing.append(f)
            continue
        chosen[f] = candidates[0]
        if len(candidates) > 1:
            notes.append(f"{_quoted(candidates)} could all be the {f!r} {what}; using {candidates[0]!r} "
                         f"(pass columns={{{f!r}: ...}} to choose)")
    if missing:
        accepted = "; ".join(f"{f}: {', '.join(ALIASES[f])}" for f in missing)
        found = _quoted(available) if available else "none"
        raise KBFormatError(
            f"missing the {' and '.join(repr(f) for f in missing)} {what}{'s' if len(missing) > 1 else ''}; "
            f"found {what}s: {found}; accepted names ({accepted}), or pass columns={{...}}")
    for f, col in chosen.items():
        exact = f in overrides and overrides[f] in available  # columns= named it exactly: no ambiguity
        same = [c for c in available if (c == col if exact else _fold(c) == _fold(col))]
        if len(same) > 1:
            if len(set(same)) == 1:
                raise KBFormatError(f"{what} {col!r} appears {len(same)} times; rename or remove the repeats")
            raise KBFormatError(f"{what}s {_quoted(same)} differ only in case, so any could be the {f!r} {what}; "
                                f"rename one, or pass columns={{{f!r}: ...}} with the exact name")
    used = set(chosen.values())
    extra = [c for c in available if c not in used]
    return ColumnMap({f: chosen[f] for f in FIELDS}, extra, notes)


def check_field(value: Any, field_name: str, max_chars: int | None = MAX_FIELD_CHARS) -> str:
    """``normalize_field`` plus the loaders' length limit; every failure is a KBFormatError."""
    try:
        text = normalize_field(value, field_name)
    except KBFormatError:
        raise
    except ValueError as err:  # str() of an int with more than sys.get_int_max_str_digits() digits
        raise KBFormatError(f"'{field_name}' cannot be converted to text ({err})") from None
    if max_chars is not None and len(text) > max_chars:
        raise KBFormatError(f"'{field_name}' is {len(text):,} characters long, over the limit of "
                            f"{max_chars:,} (the loaders' max_field_chars= changes it)")
    return text


def triples_from_fields(raw: Mapping[str, Any], cmap: ColumnMap | None = None,
                        max_chars: int | None = MAX_FIELD_CHARS) -> list[Triple]:
    """Build triples from ``raw[field]`` values. A list/tuple value gives one triple per item.

    Error reasons name the input column when it differs from the field, e.g.
    "empty 'name' field (column 'Country')".
    """
    clean: dict[str, Any] = {}
    for f in FIELDS:
        value = raw[f]
        col = cmap.fields[f] if cmap else f
        hint = f" (column {col!r})" if col != f else ""
        try:
            if f == "value" and isinstance(value, (list, tuple)):
                if not value:
                    raise KBFormatError("empty list for 'value'")
                clean[f] = [check_field(v, f, max_chars) for v in value]
            else:
                clean[f] = check_field(value, f, max_chars)
        except KBFormatError as err:
            raise KBFormatError(err.reason + hint) from None
    values = clean["value"] if isinstance(clean["value"], list) else [clean["value"]]
    return [Triple(clean["name"], clean["property"], v) for v in values]


class RecordReader:
    """Turns records (dicts with aliased keys, 3-sequences, Triples) into triples.

    Column resolution is cached per key set, and ignored keys are tallied for the report.
    """

    def __init__(self, columns: Mapping[str, str] | None = None, max_chars: int | None = MAX_FIELD_CHARS):
        self.columns = check_columns_arg(columns)
        self.max_chars = max_chars
        self._maps: dict[tuple[str, ...], ColumnMap] = {}
        self._extra: Counter[str] = Counter()
        self._notes: dict[str, None] = {}

    def read(self, item: Any) -> list[Triple]:
        if isinstance(item, Triple):  # already normalised; only the length limit is left to check
            return triples_from_fields(item.to_record(), max_chars=self.max_chars)
        if isinstance(item, Mapping):
            keys = tuple(k for k in item if isinstance(k, str))
            cmap = self._maps.get(keys)
            if cmap is None:
                cmap = self._maps[keys] = resolve_columns(keys, self.columns, what="key")
                self._notes.update(dict.fromkeys(cmap.notes))
            self._extra.update(cmap.extra)
            return triples_from_fields({f: item[c] for f, c in cmap.fields.items()}, cmap, self.max_chars)
        if isinstance(item, (list, tuple)):
            if len(item) != 3:
                raise KBFormatError(f"expected 3 items (name, property, value), got {len(item)}")
            return triples_from_fields(dict(zip(FIELDS, item, strict=True)), max_chars=self.max_chars)
        raise KBFormatError(f"expected a record (dict) or a (name, property, value) sequence, "
                            f"got {type(item).__name__} {preview(item)}")

    def problems(self) -> list[str]:
        out = list(self._notes)
        if self._extra:
            parts = ", ".join(f"{k!r} (in {n} record{'s' if n > 1 else ''})" for k, n in self._extra.items())
            out.append(f"ignored extra key(s): {parts}")
        return out


def read_all(reader: RecordReader, records: Iterable[Any], *, label: str, where: str,
             unit: str) -> tuple[list, int]:
    """Read every record into (triple, location, row) items; an error names `label` and the 1-based row."""
    items = []
    rows = 0
    for i, record in enumerate(records, start=1):
        rows += 1
        try:
            triples = reader.read(record)
        except KBFormatError as err:
            raise KBFormatError(err.reason, path=label, line=i, unit=unit) from None
        items.extend((t, f"{where}#{i}", i) for t in triples)
    return items, rows


def load_records(records: Iterable[Any], *, strict: bool = False, columns: Mapping[str, str] | None = None,
                 source: str | None = None, max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
    """Build a KnowledgeBase from in-memory records; errors say "record N" (1-based)."""
    label = source or "<records>"
    reader = RecordReader(columns, max_field_chars)
    items, rows = read_all(reader, records, label=label, where=label, unit="record")
    return KnowledgeBase._assemble(items, source=source, strict=strict, rows_read=rows,
                                   problems=reader.problems())
