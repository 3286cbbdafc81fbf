"""Tables generated into a markdown file between two HTML-comment markers (docs/scale.md, docs/performance.md)."""

from __future__ import annotations

from pathlib import Path


def write_between(path: Path, begin: str, end: str, body: str, title: str) -> None:
    """Replace what lies between `begin` and `end` in `path` with `body` (append both if absent)."""
    table = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.is_file() else f"# {title}\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + table + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
