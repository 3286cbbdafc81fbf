"""Knowledge-base data types: triples, the knowledge base itself, and load reports.

A knowledge base is an ordered list of (name, property, value) triples. KBLaM turns each
triple into a key sentence ("The {property} of {name}") and a value, so the order matters:
a triple's index is its slot in the KB. Indices are stable until a removal.

Loading from files lives in the ``kb_builders`` package; the ``from_*`` classmethods here
import it lazily (it imports this module, and this module must stay light: no torch).

Comparison rules: names, properties and values are compared exactly (case-sensitive) after
stripping leading/trailing whitespace. Two triples that are equal are *duplicates* and are
kept once (and counted). The same (name, property) with different values is a *conflict*:
all values are kept and reported, or rejected with ``strict=True``. Values listed together
in one JSON record (``"value": ["a", "b"]``) are a deliberate multi-valued fact, not a conflict.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import numbers
import os
import re
import reprlib
import sys
import tempfile
import warnings
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

FIELDS = ("name", "property", "value")

# The texts the sentence encoder embeds for a triple (the KBLaM paper's key sentence); adapters
# record the templates they were trained with, these are the defaults.
KEY_TEMPLATE = "The {property} of {name}"
VALUE_TEMPLATE = "{value}"

# The longest name, property or value a loader accepts, in characters; every loader (CSV, JSON,
# JSONL, records, datasets) takes max_field_chars= to change it (None: no limit). The sentence
# encoder reads only the first ~256 word pieces (about 1,000 characters) and the copy path the first
# max_value_tokens tokens, so a longer field adds nothing to an answer, while a 10 MB value costs
# seconds and memory on every ask.
MAX_FIELD_CHARS = 10_000

# How many examples reports and error messages show before saying "and N more".
_SHOW = 10


class KBFormatError(ValueError):
    """A knowledge-base file or record is malformed.

    ``path`` is the file (as given) or a source label, ``line`` is 1-based (the physical line
    for CSV and JSONL, the record/row number for JSON lists and datasets), ``reason`` says
    what is wrong. ``str()`` reads like ``"facts.csv, line 7: empty 'value' field"``.
    """

    def __init__(self, reason: str, *, path: str | os.PathLike | None = None,
                 line: int | None = None, unit: str = "line"):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        self.unit = unit
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [p for p in (self.path, None if self.line is None else f"{self.unit} {self.line}") if p]
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def __reduce__(self):
        # Keyword-only arguments would otherwise be lost when pickled (e.g. across processes).
        return (type(self), (self.reason,), self.__dict__)


def _type_name(value: Any) -> str:
    # JSON loaders use dict/list subclasses; users should read "dict", not a private class name.
    for base in (dict, list, tuple, set):
        if isinstance(value, base):
            return base.__name__
    return type(value).__name__


# reprlib stops at a fixed depth and length: a 10 MB value, or a list nested thousands of levels
# deep, gives a short message instead of a huge string or a RecursionError.
_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 50, 50, 4, 4


def _short_repr(value: Any, limit: int = 60) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """The text's words in lower case: what every name and property match in kblam compares (here, not in
    kblam.confidence, so that the store's name index reads names without importing torch)."""
    return _WORD.findall(text.lower())


def normalize_field(value: Any, field_name: str) -> str:
    """Return a triple field as a stripped, non-empty string, or raise KBFormatError.

    Names and properties must be strings; values may also be numbers or booleans (converted
    with ``str()``). ``None``, NaN, empty or whitespace-only fields are errors.
    """
    if value is None:
        raise KBFormatError(f"missing '{field_name}' (it is null/None)")
    if isinstance(value, str):
        text = value.strip()
    elif field_name == "value" and isinstance(value, numbers.Real):
        # numbers.Real covers bool, int, float and numpy scalars; NaN is how pandas spells "missing".
        if isinstance(value, float) and math.isnan(value):
            raise KBFormatError(f"missing '{field_name}' (it is NaN)")
        text = str(value)
    else:
        allowed = "a string, number or boolean" if field_name == "value" else "a string"
        raise KBFormatError(
            f"'{field_name}' must be {allowed}, got {_type_name(value)} {_short_repr(value)}"
        )
    if not text:
        raise KBFormatError(f"empty '{field_name}' field")
    return text


@dataclass(frozen=True)
class Triple:
    """One fact. Fields are normalised on construction (see ``normalize_field``)."""

    name: str
    property: str
    value: str

    def __post_init__(self) -> None:
        for f in FIELDS:
            object.__setattr__(self, f, normalize_field(getattr(self, f), f))

    def key_text(self, template: str = KEY_TEMPLATE) -> str:
        """The key sentence KBLaM encodes, by default "The {property} of {name}"."""
        return template.format(**self.to_record())

    def value_text(self, template: str = VALUE_TEMPLATE) -> str:
        return template.format(**self.to_record())

    def to_record(self) -> dict[str, str]:
        return {"name": self.name, "property": self.property, "value": self.value}

    def __str__(self) -> str:
        return f"{self.name} | {self.property} | {self.value}"


@dataclass
class Conflict:
    """Same (name, property) with different values. ``locations[i]`` is where ``values[i]`` came from."""

    name: str
    property: str
    values: list[str]
    locations: list[str]

    def __str__(self) -> str:
        shown = ", ".join(f"{v!r} ({loc})" for v, loc in zip(self.values, self.locations, strict=True))
        return f"{self.name} | {self.property}: {shown}"


@dataclass
class LoadReport:
    """What happened while building a knowledge base.

    ``rows_read`` counts input rows/records (plus triples offered to ``add()``); ``triples`` is
    the number kept now; ``duplicates`` counts exact duplicates merged; ``duplicate_examples``
    holds up to a few ``(triple, locations where it appeared)``; ``conflicts`` reflects the
    current contents; ``problems`` are warnings such as ignored extra columns.
    """

    source: str | None = None
    rows_read: int = 0
    triples: int = 0
    duplicates: int = 0
    duplicate_examples: list[tuple[Triple, list[str]]] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        src = self.source or "<in memory>"
        lines = [f"{src}: {self.triples} triples kept from {self.rows_read} rows read"]
        if self.duplicates:
            lines.append(f"exact duplicates merged: {self.duplicates}")
            for triple, locs in self.duplicate_examples:
                more = f" and {len(locs) - 3} more" if len(locs) > 3 else ""
                lines.append(f"  {triple}  (at {', '.join(locs[:3])}{more})")
        else:
            lines.append("exact duplicates merged: 0")
        lines.append(f"conflicts (same name and property, different values; all kept): {len(self.conflicts)}")
        lines.extend(f"  {c}" for c in self.conflicts[:_SHOW])
        if len(self.conflicts) > _SHOW:
            lines.append(f"  ... and {len(self.conflicts) - _SHOW} more")
        if self.problems:
            lines.append("problems:")
            lines.extend(f"  - {p}" for p in self.problems)
        return "\n".join(lines)


class _KBKeyError(KeyError):
    # KeyError's str() is the repr of its argument (quoted); our messages are sentences.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _as_triple(item: Any) -> Triple:
    if isinstance(item, Triple):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return Triple(*item)
    hint = "; use KnowledgeBase.from_records for dicts" if isinstance(item, dict) else ""
    raise KBFormatError(
        f"expected a Triple or a (name, property, value) sequence, got {_type_name(item)} "
        f"{_short_repr(item)}{hint}"
    )


def _clean_query(value: Any, field_name: str) -> str | None:
    # Lookups use the same normalisation as storage so " Iron " finds "Iron".
    return None if value is None else normalize_field(value, field_name)


class KnowledgeBase:
    """An ordered, de-duplicated collection of ``Triple``s with a load report.

    ``triples`` may hold ``Triple`` objects or (name, property, value) sequences; they are
    validated exactly as the file loaders do. With ``strict=True`` conflicting values for
    the same (name, property) raise ``KBFormatError`` (at construction and in ``add()``).
    """

    __hash__ = None  # mutable

    def __init__(self, triples: Iterable[Any] = (), *, strict: bool = False, source: str | None = None):
        self.strict = strict
        self._source = source
        self._triples: list[Triple] = []
        # triple -> (location shown in reports, origin); triples from one input row share an origin.
        self._meta: dict[Triple, tuple[str, Hashable]] = {}
        self._by_key: dict[tuple[str, str], list[Triple]] = {}
        self._dup_locations: dict[Triple, list[str]] = {}
        self._duplicates = 0
        self._rows_read = 0
        self._problems: list[str] = []
        self._edits = 0
        label = source or "<triples>"

        def located() -> Iterator[tuple[Triple, str, Hashable]]:
            for i, item in enumerate(triples, start=1):
                try:
                    triple = _as_triple(item)
                except KBFormatError as err:
                    raise KBFormatError(err.reason, path=label, line=i, unit="item") from None
                self._rows_read += 1
                yield triple, f"{label}#{i}", (label, i)

        self._ingest_all(located())

    # ----------------------------------------------------------------- building

    @classmethod
    def _assemble(cls, items: Iterable[tuple[Triple, str, Hashable]], *, source: str | None,
                  strict: bool, rows_read: int = 0, problems: Iterable[str] = ()) -> KnowledgeBase:
        """Build from ``(triple, location, origin)`` items; the entry point for ``kb_builders``.

        ``location`` is shown in reports ("facts.csv:12"); triples sharing an ``origin`` (one input
        row, e.g. a JSON list value) are a deliberate multi-valued fact, not a conflict.
        """
        kb = cls(strict=strict, source=source)
        kb._problems.extend(problems)
        kb._ingest_all(items)
        kb._rows_read = rows_read
        return kb

    def _ingest_all(self, items: Iterable[tuple[Triple, str, Hashable]]) -> None:
        for triple, location, origin in items:
            self._ingest(triple, location, origin)
        conflicts = self._conflicts()
        if conflicts and self.strict:
            raise KBFormatError(_conflict_message(conflicts), path=self._source)
        notes = []
        if self._duplicates:
            notes.append(f"merged {self._duplicates} exact duplicate triple(s)")
        if conflicts:
            notes.append(f"kept {len(conflicts)} conflicting (name, property) pair(s) with several values")
        if notes:
            warnings.warn(f"{self._source or 'knowledge base'}: {'; '.join(notes)}; see kb.report.summary()",
                          UserWarning, stacklevel=_caller_stacklevel())

    def _ingest(self, triple: Triple, location: str, origin: Hashable) -> Triple:
        if triple in self._meta:
            self._duplicates += 1
            if triple in self._dup_locations or len(self._dup_locations) < 5:
                self._dup_locations.setdefault(triple, [self._meta[triple][0]]).append(location)
            return triple
        self._triples.append(triple)
        self._meta[triple] = (location, origin)
        self._by_key.setdefault((triple.name, triple.property), []).append(triple)
        return triple

    def _conflicts(self) -> list[Conflict]:
        out = []
        for key, group in self._by_key.items():
            if len(group) > 1 and len({self._meta[t][1] for t in group}) > 1:
                out.append(Conflict(key[0], key[1], [t.value for t in group],
                                    [self._meta[t][0] for t in group]))
        return out

    def _next_origin(self, what: str) -> tuple[str, Hashable]:
        self._edits += 1
        return f"<{what} #{self._edits}>", (what, self._edits)

    def _rebuild_index(self) -> None:
        self._by_key = {}
        for t in self._triples:
            self._by_key.setdefault((t.name, t.property), []).append(t)

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_csv(cls, path: str | os.PathLike, *, strict: bool = False, delimiter: str | None = None,
                 columns: dict[str, str] | None = None, encoding: str | None = None,
                 max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
        """Read a CSV/TSV with a header row. See ``kb_builders.tabular.load_csv``.

        Every ``from_*`` loader takes ``max_field_chars`` (default ``MAX_FIELD_CHARS``, 10,000; None:
        no limit): a longer name, property or value is an error naming the file and line.
        """
        from kb_builders.tabular import load_csv

        return load_csv(path, strict=strict, delimiter=delimiter, columns=columns, encoding=encoding,
                        max_field_chars=max_field_chars)

    @classmethod
    def from_json(cls, path: str | os.PathLike, *, strict: bool = False,
                  columns: dict[str, str] | None = None,
                  max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
        """A JSON list of records, or ``{name: {property: value}}``. List values give one triple each."""
        from kb_builders.jsonfile import load_json

        return load_json(path, strict=strict, columns=columns, max_field_chars=max_field_chars)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, *, strict: bool = False,
                   columns: dict[str, str] | None = None,
                   max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
        """One JSON object per line; blank lines are skipped."""
        from kb_builders.jsonfile import load_jsonl

        return load_jsonl(path, strict=strict, columns=columns, max_field_chars=max_field_chars)

    @classmethod
    def from_records(cls, records: Iterable[Any], *, strict: bool = False,
                     columns: dict[str, str] | None = None, source: str | None = None,
                     max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
        """Dicts (keys: name/property/value or their aliases), 3-tuples/lists, or Triples."""
        from kb_builders.records import load_records

        return load_records(records, strict=strict, columns=columns, source=source,
                            max_field_chars=max_field_chars)

    @classmethod
    def from_dataset(cls, dataset_or_path: Any, *, strict: bool = False,
                     columns: dict[str, str] | None = None, split: str = "train",
                     max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
        """A ``datasets.Dataset`` (or DatasetDict), or a local .parquet/.csv/.json/.jsonl file."""
        from kb_builders.hf_dataset import load_dataset_kb

        return load_dataset_kb(dataset_or_path, strict=strict, columns=columns, split=split,
                               max_field_chars=max_field_chars)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw: Any) -> KnowledgeBase:
        """Dispatch on the suffix (.csv/.tsv/.txt, .json, .jsonl/.ndjson, .parquet)."""
        from kb_builders import load_file

        return load_file(path, **kw)

    @classmethod
    def load(cls, path: str | os.PathLike, **kw: Any) -> KnowledgeBase:
        """Same as ``from_file``; the counterpart of ``save``."""
        return cls.from_file(path, **kw)

    # ------------------------------------------------------------------ editing

    def add(self, triple_or_name: Triple | str | Any, property: Any = None, value: Any = None) -> Triple:
        """Add a Triple (or name, property, value). An exact duplicate is not added again (it is
        counted in ``report.duplicates``); the stored triple is returned either way."""
        if isinstance(triple_or_name, (Triple, tuple, list)):
            if property is not None or value is not None:
                raise TypeError("add() takes either a Triple or name, property and value, not both")
            triple = _as_triple(triple_or_name)
        elif property is None and value is None:
            raise TypeError("add() needs a Triple, or name, property and value")
        else:
            triple = Triple(triple_or_name, property, value)
        self._rows_read += 1
        location, origin = self._next_origin("add")
        if self.strict and triple not in self._meta:
            existing = self._by_key.get((triple.name, triple.property), [])
            if existing:
                values = ", ".join(repr(t.value) for t in existing)
                raise KBFormatError(
                    f"adding {triple} conflicts with existing value(s) {values} (strict=True; "
                    "use update() to replace the value)", path=self._source)
        return self._ingest(triple, location, origin)

    def remove(self, name: Triple | str, property: Any = None, value: Any = None) -> int:
        """Remove the triples matching the given fields (name alone removes a whole entity).
        Returns the number removed; raises KeyError if nothing matches. Order of the rest is kept."""
        if isinstance(name, Triple):
            if property is not None or value is not None:
                raise TypeError("remove() takes either a Triple or name[, property[, value]], not both")
            name, property, value = name.name, name.property, name.value
        n, p, v = _clean_query(name, "name"), _clean_query(property, "property"), _clean_query(value, "value")
        if n is None:
            raise TypeError("remove() needs at least a name")
        gone = [t for t in self._triples
                if t.name == n and (p is None or t.property == p) and (v is None or t.value == v)]
        if not gone:
            raise _KBKeyError(self._not_found(n, p, v))
        gone_set = set(gone)
        self._triples = [t for t in self._triples if t not in gone_set]
        for t in gone:
            del self._meta[t]
        self._rebuild_index()
        return len(gone)

    def update(self, name: str, property: str, value: Any) -> Triple:
        """Replace the value of (name, property). Several conflicting triples collapse into one,
        at the position of the first. Raises KeyError if there is no such triple."""
        new = Triple(name, property, value)
        key = (new.name, new.property)
        group = self._by_key.get(key)
        if not group:
            raise _KBKeyError(self._not_found(new.name, new.property, None))
        # Found by identity (the index holds the list's own objects): list.index compares triples field by
        # field (30 ms over 100,000 triples).
        try:
            position = list(map(id, self._triples)).index(id(group[0]))
        except ValueError:  # the index ever holding another object than the list: compare by value
            position = self._triples.index(group[0])
        meta = self._meta.get(new) or self._next_origin("update")
        for t in group:
            del self._meta[t]
        if len(group) == 1:  # the usual case: one triple replaced where it stands, no pass hashing every triple
            rest = self._triples.copy()
            rest[position] = new
        else:
            old = set(group)
            rest = [t for t in self._triples if t not in old]
            rest.insert(position, new)  # earlier triples are untouched, so the index still fits
        self._triples = rest
        self._meta[new] = meta
        self._by_key[key] = [new]
        return new

    def _not_found(self, name: str, prop: str | None, value: str | None) -> str:
        names = self.names
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            return f"no entity named {name!r} in the knowledge base ({len(names)} entities){hint}"
        props = list(dict.fromkeys(t.property for t in self._triples if t.name == name))
        if prop is not None and prop not in props:
            shown = ", ".join(map(repr, props[:_SHOW])) + (" ..." if len(props) > _SHOW else "")
            return f"{name!r} has no property {prop!r}; its properties are: {shown}"
        values = [t.value for t in self._triples if t.name == name and (prop is None or t.property == prop)]
        what = f"{name!r} / {prop!r}" if prop is not None else repr(name)
        return f"{what} has no value {value!r}; its values are: {', '.join(map(repr, values[:_SHOW]))}"

    # ------------------------------------------------------------------ reading

    def get(self, name: str, property: str) -> list[Triple]:
        """All triples for (name, property), in order; empty list if none."""
        return list(self._by_key.get((normalize_field(name, "name"), normalize_field(property, "property")),
                                     []))

    @property
    def triples(self) -> tuple[Triple, ...]:
        return tuple(self._triples)

    @property
    def names(self) -> list[str]:
        """Distinct entity names in order of first appearance."""
        return list(dict.fromkeys(t.name for t in self._triples))

    @property
    def properties(self) -> list[str]:
        """Distinct property names in order of first appearance."""
        return list(dict.fromkeys(t.property for t in self._triples))

    @property
    def source(self) -> str | None:
        return self._source

    @property
    def report(self) -> LoadReport:
        """A fresh snapshot: loading history plus conflicts in the current contents."""
        return LoadReport(
            source=self._source,
            rows_read=self._rows_read,
            triples=len(self._triples),
            duplicates=self._duplicates,
            duplicate_examples=[(t, list(locs)) for t, locs in self._dup_locations.items()],
            conflicts=self._conflicts(),
            problems=list(self._problems),
        )

    def to_records(self) -> list[dict[str, str]]:
        return [t.to_record() for t in self._triples]

    def __len__(self) -> int:
        return len(self._triples)

    def __iter__(self) -> Iterator[Triple]:
        return iter(list(self._triples))  # a copy, so editing while iterating is safe

    @overload
    def __getitem__(self, index: int) -> Triple: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Triple, ...]: ...
    def __getitem__(self, index):
        """``kb[i]`` is a Triple; ``kb[a:b]`` a tuple of Triples (``KnowledgeBase(kb[a:b])`` for a KB)."""
        if isinstance(index, slice):
            return tuple(self._triples[index])
        return self._triples[index]

    def __contains__(self, item: object) -> bool:
        try:
            return _as_triple(item) in self._meta
        except (KBFormatError, TypeError):
            return False

    def __eq__(self, other: object) -> bool:
        """Equal when both hold the same triples in the same order (reports are not compared)."""
        if not isinstance(other, KnowledgeBase):
            return NotImplemented
        return self._triples == other._triples

    def __repr__(self) -> str:
        src = f", source={self._source!r}" if self._source else ""
        return f"KnowledgeBase({len(self._triples)} triples{src})"

    # ------------------------------------------------------------------ saving

    def save(self, path: str | os.PathLike) -> None:
        """Write .jsonl, .json (a list of records) or .csv/.tsv by suffix, UTF-8, atomically."""
        save_triples(path, self._triples)


def save_triples(path: str | os.PathLike, triples: Iterable[Triple]) -> None:
    """Write triples as .jsonl, .json (a list of records) or .csv/.tsv by suffix, UTF-8, atomically
    (``KnowledgeBase.save``, and ``kblam kb export`` from a store)."""
    path = Path(path)
    try:
        text = triples_text(triples, path.suffix)
    except KBFormatError as err:
        raise KBFormatError(err.reason, path=path) from None
    _atomic_write(path, text)


def triples_text(triples: Iterable[Triple], suffix: str) -> str:
    """Triples as the text of a .jsonl, .json, .csv or .tsv file (save_triples; the server's export)."""
    kind = suffix.lower()
    if kind == ".jsonl":
        return "".join(json.dumps(t.to_record(), ensure_ascii=False) + "\n" for t in triples)
    if kind == ".json":
        return json.dumps([t.to_record() for t in triples], ensure_ascii=False, indent=2) + "\n"
    if kind in (".csv", ".tsv"):
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, delimiter="\t" if kind == ".tsv" else ",", lineterminator="\n")
        writer.writerow(FIELDS)
        writer.writerows((t.name, t.property, t.value) for t in triples)
        return buf.getvalue()
    raise KBFormatError(f"cannot save as {suffix or 'a file without suffix'!r}; use .jsonl, .json, .csv or .tsv")


def _caller_stacklevel() -> int:
    # Point warnings at the user's line, not at whichever loader module built the KB.
    level, frame = 2, sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or f"{os.sep}kb_builders{os.sep}" in frame.f_code.co_filename):
        level, frame = level + 1, frame.f_back
    return level


def _conflict_message(conflicts: list[Conflict]) -> str:
    lines = [f"{len(conflicts)} conflicting fact(s) (same name and property, different values); "
             "strict=True rejects them, strict=False keeps them all and lists them in kb.report:"]
    lines.extend(f"  {c}" for c in conflicts[:_SHOW])
    if len(conflicts) > _SHOW:
        lines.append(f"  ... and {len(conflicts) - _SHOW} more")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str | bytes) -> None:
    # Write to a temp file in the same directory, then rename over the target, so a crash never
    # leaves a half-written KB. The temp file is created 0600; give it the usual permissions.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else
              os.fdopen(fd, "w", encoding="utf-8", newline="")) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
