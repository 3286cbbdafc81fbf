"""JSON and JSON Lines knowledge bases.

JSON: either a list of records (``[{"name": ..., "property": ..., "value": ...}, ...]``, keys
may use the CSV aliases, a record may also be a 3-item list) or an object mapping each name to
its properties (``{"Iron": {"symbol": "Fe"}}``). A list value gives one triple per item.
JSON Lines: one record per line; blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from kblam.kb import KBFormatError, KnowledgeBase

from .records import RecordReader, triples_from_fields
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


def _parse(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_JSONObject)


def _read_record(reader: RecordReader, item: Any) -> list:
    if isinstance(item, _JSONObject) and (key := item.repeated_key()) is not None:
        raise KBFormatError(f"key {key!r} appears twice in the same object")
    return reader.read(item)


def load_json(path: str | os.PathLike, *, strict: bool = False,
              columns: Mapping[str, str] | None = None) -> KnowledgeBase:
    source = os.fspath(path)
    p = check_file(path)
    text = read_text(p, utf8_only=True)
    try:
        data = _parse(text)
    except json.JSONDecodeError as err:
        hint = ("; if this is one object per line, use a .jsonl suffix or from_jsonl()"
                if err.msg == "Extra data" else "")
        raise KBFormatError(f"invalid JSON: {err.msg} (column {err.colno}){hint}",
                            path=source, line=err.lineno) from None
    if isinstance(data, list):
        items, rows, problems = _from_list(data, source, p.name, columns)
    elif isinstance(data, dict):
        items, rows, problems = _from_entity_map(data, source, p.name)
        if columns:
            problems.append("columns= ignored: the file maps names to {property: value} objects")
    else:
        raise KBFormatError(
            "top-level JSON must be a list of records or an object mapping each name to "
            f"{{property: value}}, got {type(data).__name__} {json.dumps(data)[:40]}", path=source)
    if not items:
        raise KBFormatError("contains no records", path=source)
    return KnowledgeBase._assemble(items, source=source, strict=strict, rows_read=rows, problems=problems)


def _from_list(data: list, source: str, fname: str, columns: Mapping[str, str] | None):
    reader = RecordReader(columns)
    items = []
    for i, record in enumerate(data, start=1):
        try:
            triples = _read_record(reader, record)
        except KBFormatError as err:
            raise KBFormatError(err.reason, path=source, line=i, unit="record") from None
        items.extend((t, f"{fname}#{i}", i) for t in triples)
    return items, len(data), reader.problems()


def _from_entity_map(data: _JSONObject, source: str, fname: str):
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
                f"{type(props).__name__} {json.dumps(props)[:40]}{hint}", path=source, line=e, unit="entity")
        if not props:
            empty.append(name)
        for q, (prop, value) in enumerate(props.pairs, start=1):
            rows += 1
            try:
                triples = triples_from_fields({"name": name, "property": prop, "value": value})
            except KBFormatError as err:
                raise KBFormatError(f"entity {name!r}, property {prop!r}: {err.reason}",
                                    path=source, line=e, unit="entity") from None
            where = f"{fname}[{json.dumps(name, ensure_ascii=False)}][{json.dumps(prop, ensure_ascii=False)}]"
            items.extend((t, where, (e, q)) for t in triples)
    problems = [f"skipped entities with no properties: {', '.join(map(repr, empty))}"] if empty else []
    return items, rows, problems


def load_jsonl(path: str | os.PathLike, *, strict: bool = False,
               columns: Mapping[str, str] | None = None) -> KnowledgeBase:
    source = os.fspath(path)
    p = check_file(path)
    text = read_text(p, utf8_only=True)
    reader = RecordReader(columns)
    items = []
    rows = 0
    # split("\n") rather than splitlines(): JSON strings may legally contain U+2028 and friends.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        rows += 1
        try:
            record = _parse(line)
        except json.JSONDecodeError as err:
            raise KBFormatError(f"invalid JSON: {err.msg} (column {err.colno})", path=source, line=n) from None
        try:
            triples = _read_record(reader, record)
        except KBFormatError as err:
            raise KBFormatError(err.reason, path=source, line=n) from None
        items.extend((t, f"{p.name}:{n}", n) for t in triples)
    return KnowledgeBase._assemble(items, source=source, strict=strict, rows_read=rows,
                                   problems=reader.problems())
