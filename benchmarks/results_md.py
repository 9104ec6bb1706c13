"""Shared by the benchmark scripts: replace one script's section of RESULTS.md."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(path: Path, section: str, text: str) -> None:
    """Replaces the section starting with the heading ``section`` in ``path`` (appends it
    if absent), up to the next ``## `` heading; other sections are kept."""
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = re.search(r"^## ", old[start + len(section) :], flags=re.M)
        end = start + len(section) + nxt.start() if nxt else len(old)
        new = old[:start] + text + ("\n" + old[end:] if nxt else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def emit(section: str, lines: list[str], write: bool) -> None:
    """Prints a script's section; with ``write`` (its ``--write``) replaces it in RESULTS.md."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(RESULTS, section, text)
