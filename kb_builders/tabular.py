"""CSV/TSV knowledge bases: a header row, then one triple per row."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping

from kblam.kb import KBFormatError, KnowledgeBase

from .records import resolve_columns, triples_from_fields
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


def load_csv(path: str | os.PathLike, *, strict: bool = False, delimiter: str | None = None,
             columns: Mapping[str, str] | None = None, encoding: str | None = None) -> KnowledgeBase:
    """Read a delimited file with a header row into a KnowledgeBase.

    Header names are matched case-insensitively against the aliases in ``records.ALIASES``
    (``columns`` overrides); other columns are ignored with a note in the report. Errors carry
    the physical line number (the header is line 1).
    """
    source = os.fspath(path)
    p = check_file(path)
    text = read_text(p, encoding)
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
            raise fail(f"malformed CSV ({err}); check the quoting of this row", start) from None
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.replace("\ufeff", "").strip() for cell in row]
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
            triples = triples_from_fields({f: row[i] for f, i in index.items()}, cmap)
        except KBFormatError as err:
            raise fail(err.reason, start) from None
        items.extend((t, f"{p.name}:{start}", start) for t in triples)
    if not rows:
        raise fail("has a header but no data rows", None)
    return KnowledgeBase._assemble(items, source=source, strict=strict, rows_read=rows, problems=problems)
