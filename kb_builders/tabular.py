"""CSV/TSV knowledge bases: a header row, then one triple per row."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping

from kblam.kb import KBFormatError, KnowledgeBase

from .records import MAX_FIELD_CHARS, resolve_columns, triples_from_fields
from .textio import check_file, read_text

DELIMITERS = ",;\t|"
_DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


def _count_unquoted(line: str, char: str) -> int:
    count, quoted = 0, False
    for c in line:
        if c == '"':
            quoted = not quoted
        elif c == char and not quoted:
            count += 1
    return count


def detect_delimiter(text: str) -> str:
    """Pick the delimiter among , ; tab |.

    The header is the most reliable witness (short column names rarely contain delimiters),
    so if exactly one candidate occurs in it we use that; otherwise csv.Sniffer decides from
    a sample, and failing that the candidate most frequent in the header wins (default ',').
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = lines[0] if lines else ""
    counts = {d: _count_unquoted(header, d) for d in DELIMITERS}
    present = [d for d in DELIMITERS if counts[d]]
    if len(present) == 1:
        return present[0]
    try:
        return csv.Sniffer().sniff("\n".join(lines[:50]), delimiters=DELIMITERS).delimiter
    except csv.Error:
        return max(present, key=counts.__getitem__) if present else ","


def repeated_column(header: list[str]) -> str | None:
    """A reason when a non-empty header cell appears more than once (which column would be meant?)."""
    named = [c for c in header if c]
    for col in dict.fromkeys(named):
        positions = [i for i, c in enumerate(header, start=1) if c == col]
        if len(positions) > 1:
            return (f"column {col!r} appears {len(positions)} times in the header (columns "
                    f"{', '.join(map(str, positions))}); rename or remove the repeats")
    return None


_CSV_MAX = 2**31 - 1  # csv stores the limit in a C long, 32 bits on Windows


def _allow_fields_up_to(max_chars: int | None) -> None:
    # The csv module's own field limit (131,072 characters by default) is process-wide. The KB's
    # limit is max_field_chars, checked per field after parsing, so raise csv's when a caller asks
    # for more; it is only ever raised, never lowered, so other users of csv are not cut short.
    wanted = _CSV_MAX if max_chars is None else min(max_chars + 1, _CSV_MAX)
    if csv.field_size_limit() < wanted:
        csv.field_size_limit(wanted)


def load_csv(path: str | os.PathLike, *, strict: bool = False, delimiter: str | None = None,
             columns: Mapping[str, str] | None = None, encoding: str | None = None,
             max_field_chars: int | None = MAX_FIELD_CHARS) -> KnowledgeBase:
    """Read a delimited file with a header row into a KnowledgeBase.

    Header names are matched case-insensitively against the aliases in ``records.ALIASES``
    (``columns`` overrides); other columns are ignored with a note in the report. A column name
    that appears twice is an error. Errors carry the physical line number (the header is line 1).
    Names, properties and values longer than ``max_field_chars`` are errors (None: no limit).
    """
    source = os.fspath(path)
    p = check_file(path)
    text = read_text(p, encoding)
    _allow_fields_up_to(max_field_chars)
    if delimiter is None:
        delimiter = "\t" if p.suffix.lower() == ".tsv" else detect_delimiter(text)
    # Only the delimiter is sniffed; a guessed quote character (e.g. from "Earth's") does more harm
    # than good. strict=True turns broken quoting into an error instead of silently merged rows.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"', strict=True)

    def fail(reason: str, line: int | None) -> KBFormatError:
        return KBFormatError(reason, path=source, line=line)

    header: list[str] | None = None
    index: dict[str, int] = {}
    cmap = None
    problems: list[str] = []
    items = []
    rows = 0
    rows_iter = iter(reader)
    while True:
        start = reader.line_num + 1  # a quoted field may span lines; report where the row starts
        try:
            row = next(rows_iter)
        except StopIteration:
            break
        except csv.Error as err:
            if "field larger than field limit" in str(err):
                raise fail(f"a field is longer than {csv.field_size_limit():,} characters: a quote opened in this "
                           "row and never closed makes the rest of the file one field (or the field is far over "
                           f"max_field_chars={max_field_chars})", start) from None
            raise fail(f"malformed CSV ({err}); check the quoting of this row", start) from None
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.replace("\ufeff", "").strip() for cell in row]
            if (repeat := repeated_column(header)) is not None:
                raise fail(repeat, start)
            named = [c for c in header if c]
            try:
                cmap = resolve_columns(named, columns)
            except KBFormatError as err:
                delim = _DELIMITER_NAMES.get(delimiter, repr(delimiter))
                raise fail(f"header {err.reason} (delimiter {delim})", start) from None
            index = {f: header.index(col) for f, col in cmap.fields.items()}
            problems.extend(cmap.notes)
            if cmap.extra:
                problems.append(f"ignored extra column(s): {', '.join(map(repr, cmap.extra))}")
            if len(named) < len(header):
                problems.append(f"ignored {len(header) - len(named)} column(s) with an empty header")
            continue
        if len(row) != len(header):
            delim = _DELIMITER_NAMES.get(delimiter, repr(delimiter))
            hint = (f"; a value containing {delim} must be in double quotes" if len(row) > len(header)
                    else f"; is a field missing, or is the delimiter not {delim}?")
            raise fail(f"expected {len(header)} fields as in the header, found {len(row)}{hint}", start)
        rows += 1
        try:
            triples = triples_from_fields({f: row[i] for f, i in index.items()}, cmap, max_field_chars)
        except KBFormatError as err:
            raise fail(err.reason, start) from None
        items.extend((t, f"{p.name}:{start}", start) for t in triples)
    if not rows:
        raise fail("has a header but no data rows", None)
    return KnowledgeBase._assemble(items, source=source, strict=strict, rows_read=rows, problems=problems)
