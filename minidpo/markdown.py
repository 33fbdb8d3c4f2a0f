"""The Markdown tables minidpo's reports write (data report, evaluation, model card): one writer for all of them."""

from __future__ import annotations


def cell(value) -> str:
    """A value as one table cell: `|` escaped and line breaks as `<br>`, so any text keeps the table's shape."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


def table(header, rows) -> list[str]:
    """The lines of a Markdown table: a header row, its rule, then one line per row (cells through `cell`)."""
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return out
