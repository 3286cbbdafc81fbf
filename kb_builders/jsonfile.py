"""JSON and JSON Lines knowledge bases.

JSON: either a list of records (``[{"name": ..., "property": ..., "value": ...}, ...]``, keys
may use the CSV aliases, a record may also be a 3-item list) or an object mapping each name to
its properties (``{"Iron": {"symbol": "Fe"}}``). A list value gives one triple per item.
JSON Lines: one record per line; blank lines are skipped.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from kblam.kb import KBFormatError, KnowledgeBase

from .records import MAX_FIELD_CHARS, RecordReader, preview, triples_from_fields
from .textio import check_file, read_text


class _JSONObject(dict):
    """A dict that remembers its key/value pairs in order, duplicates included.

    json.loads silently keeps only the last of repeated keys; for a KB that would drop facts.
    """

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.pairs = pairs

    def repeated_key(self) -> str | None:
        if len(self.pairs) == len(self):
            return None
        seen: set[str] = set()
        for key, _ in self.pairs:
            if key in seen:
                return key
            seen.add(key)
        return None


def _parse(text: str, *, path: str, line: int | None = None) -> Any:
    """json.loads with every failure a KBFormatError naming the file and line."""
    try:
        return json.loads(text, object_pairs_hook=_JSONObject)
    except json.JSONDecodeError as err:
        hint = ("; if this is one object per line, use a .jsonl suffix or from_jsonl()"
                if err.msg == "Extra data" and line is None else "")
        column = f"column {err.colno}" if line is None or err.lineno == 1 else f"line {err.lineno} column {err.colno}"
        raise KBFormatError(f"invalid JSON: {err.msg} ({column}){hint}",
                            path=path, line=err.lineno if line is None else line) from None
    except RecursionError:
        # json's C parser recurses once per level of nesting; a KB record needs three levels.
        raise KBFormatError("invalid JSON: nested too deeply (a KB needs at most a few levels)",
                            path=path, line=line) from None
    except ValueError as err:
        # Python refuses to parse integers of more than sys.get_int_max_str_digits() digits.
        digits = sys.get_int_max_str_digits()
        found = re.search(rf"\d{{{digits + 1},}}", text)
        if found is None:
            raise KBFormatError(f"invalid JSON: {err}", path=path, line=line) from None
        where = line if line is not None else text.count("\n", 0, found.start()) + 1
        raise KBFormatError(f"a number has more than {digits} digits; write it as a string",
                            path=path, line=where) from None


def _read_record(reader: RecordReader, item: Any) -> list:
    if isinstance(item, _JSONObject) and (key := item.repeated_key()) is not None:
        raise KBFormatError(f"key {key!r} appears twice in the same object")
    return reader.read(item)


def load_json(path: str | os.PathLike, *, strict: bool = False, columns: Mapping[str, str] | None = None,
              max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
    """Names, properties and values longer than ``max_field_chars`` are errors (None: no limit)."""
    source = os.fspath(path)
    p = check_file(path)
    data = _parse(read_text(p, utf8_only=True), path=source)
    if isinstance(data, list):
        items, rows, problems = _from_list(data, source, p.name, RecordReader(columns, max_field_chars))
    elif isinstance(data, dict):
        items, rows, problems = _from_entity_map(data, source, p.name, max_field_chars)
        if columns:
            problems.append("columns= ignored: the file maps names to {property: value} objects")
    else:
        raise KBFormatError(
            "top-level JSON must be a list of records or an object mapping each name to "
            f"{{property: value}}, got {type(data).__name__} {preview(data)}", path=source)
    if not items:
        raise KBFormatError("contains no records", path=source)
    return KnowledgeBase._assemble(items, source=source, strict=strict, rows_read=rows, problems=problems)


def _from_list(data: list, source: str, fname: str, reader: RecordReader):
    items = []
    for i, record in enumerate(data, start=1):
        try:
            triples = _read_record(reader, record)
        except KBFormatError as err:
            raise KBFormatError(err.reason, path=source, line=i, unit="record") from None
        items.extend((t, f"{fname}#{i}", i) for t in triples)
    return items, len(data), reader.problems()


def _from_entity_map(data: _JSONObject, source: str, fname: str, max_chars: int | None):
    items = []
    rows = 0
    empty = []
    for e, (name, props) in enumerate(data.pairs, start=1):
        if not isinstance(props, dict):
            # {"name": ..., "property": ..., "value": ...} at the top level is one record, not a map.
            is_record = {"name", "property", "value"} <= set(data)
            hint = "; a single record must be wrapped in a list: [{...}]" if is_record else ""
            raise KBFormatError(
                f"entity {name!r}: expected an object mapping property -> value, got "
                f"{type(props).__name__} {preview(props)}{hint}", path=source, line=e, unit="entity")
        if not props:
            empty.append(name)
        for q, (prop, value) in enumerate(props.pairs, start=1):
            rows += 1
            try:
                triples = triples_from_fields({"name": name, "property": prop, "value": value}, max_chars=max_chars)
            except KBFormatError as err:
                raise KBFormatError(f"entity {preview(name)}, property {preview(prop)}: {err.reason}",
                                    path=source, line=e, unit="entity") from None
            where = f"{fname}[{json.dumps(name, ensure_ascii=False)}][{json.dumps(prop, ensure_ascii=False)}]"
            items.extend((t, where, (e, q)) for t in triples)
    problems = [f"skipped entities with no properties: {', '.join(map(repr, empty))}"] if empty else []
    return items, rows, problems


def load_jsonl(path: str | os.PathLike, *, strict: bool = False, columns: Mapping[str, str] | None = None,
               max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
    """Names, properties and values longer than ``max_field_chars`` are errors (None: no limit)."""
    source = os.fspath(path)
    p = check_file(path)
    text = read_text(p, utf8_only=True)
    reader = RecordReader(columns, max_field_chars)
    items = []
    rows = 0
    # split("\n") rather than splitlines(): JSON strings may legally contain U+2028 and friends.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        rows += 1
        record = _parse(line, path=source, line=n)
        try:
            triples = _read_record(reader, record)
        except KBFormatError as err:
            raise KBFormatError(err.reason, path=source, line=n) from None
        items.extend((t, f"{p.name}:{n}", n) for t in triples)
    return KnowledgeBase._assemble(items, source=source, strict=strict, rows_read=rows,
                                   problems=reader.problems())
