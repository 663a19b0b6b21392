"""Markdown tables: the report's, the sweep summary's and the bench's."""
from __future__ import annotations


def md_table(head: list[str], cells: list[list[str]]) -> str:
    """A markdown table of these column heads and rows of cells (strings), ending with a newline."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
