"""``kblam kb inspect``: what a KB file contains and what looks wrong with it."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kblam.display import printable
from kblam.kb import Conflict, KnowledgeBase, LoadReport, Triple

from .files import load_file


@dataclass
class InspectResult:
    path: str
    triples: int
    entities: int
    properties: int
    top_properties: list[tuple[str, int]]
    rows_read: int
    duplicates: int
    duplicate_examples: list[tuple[Triple, list[str]]]
    conflicts: list[Conflict]
    problems: list[str]
    sample: list[Triple] = field(default_factory=list)
    report: LoadReport | None = None


def inspect_file(path: str | os.PathLike, *, top: int = 10, **kw: Any) -> InspectResult:
    """Load ``path`` non-strictly (``kw`` goes to the loader) and summarise it.

    A file that cannot be loaded raises KBFormatError / FileNotFoundError, as loading would.
    """
    kw["strict"] = False  # inspect is for seeing conflicts, not failing on them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the duplicate/conflict warning is what we report below
        kb = load_file(path, **kw)
    return inspect_kb(kb, top=top, path=os.fspath(path))


def inspect_kb(kb: KnowledgeBase, *, top: int = 10, path: str | None = None) -> InspectResult:
    report = kb.report
    counts = Counter(t.property for t in kb)
    return InspectResult(
        path=path or kb.source or "<in memory>",
        triples=len(kb),
        entities=len(kb.names),
        properties=len(counts),
        top_properties=counts.most_common(top),
        rows_read=report.rows_read,
        duplicates=report.duplicates,
        duplicate_examples=report.duplicate_examples,
        conflicts=report.conflicts,
        problems=report.problems,
        sample=list(kb[:3]),
        report=report,
    )


def format_inspect(result: InspectResult, *, max_conflicts: int = 20) -> str:
    r = result
    lines = [
        r.path,
        f"  triples:          {r.triples} (from {r.rows_read} rows)",
        f"  entities:         {r.entities}",
        f"  properties:       {r.properties}",
    ]
    if r.top_properties:
        lines.append("  top properties:   " + ", ".join(f"{p} ({n})" for p, n in r.top_properties))
    lines.append(f"  duplicates:       {r.duplicates} exact duplicate(s) merged")
    for triple, locs in r.duplicate_examples:
        more = f" and {len(locs) - 3} more" if len(locs) > 3 else ""
        lines.append(f"    {triple}  (at {', '.join(locs[:3])}{more})")
    lines.append(f"  conflicts:        {len(r.conflicts)} (same name and property, different values; all kept)")
    for c in r.conflicts[:max_conflicts]:
        lines.append(f"    {c}")
    if len(r.conflicts) > max_conflicts:
        lines.append(f"    ... and {len(r.conflicts) - max_conflicts} more")
    lines.append(f"  problems:         {len(r.problems) or 'none'}")
    lines.extend(f"    - {p}" for p in r.problems)
    if r.sample:
        lines.append("  first triples as the model sees them (key -> value):")
        lines.extend(f"    {t.key_text()} -> {t.value_text()}" for t in r.sample)
    # Each entry is one line; KB text inside it may hold newlines or terminal escapes.
    return "\n".join(printable(line) for line in lines)
