"""Line-level checks of JSON-lines input for ``fope-preprocess``: find the file and line of a
malformed record, or copy a file without its bad lines (``--skip-bad-lines``).

A record is good when its line is blank or parses as a JSON object. ``.gz`` files are read
through gzip. A ``.json`` file holding one JSON document (an array, not JSON lines) is left to
the loader.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path


def is_jsonl(path: str) -> bool:
    """JSON-lines input: ``.jsonl[.gz]``, or a ``.json[.gz]`` whose first character is not ``[``."""
    if ".jsonl" in Path(path).name:
        return True
    with _open(path) as f:
        head = f.read(4096).lstrip()
    return not head.startswith("[")


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def _problem(line: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    return None


def bad_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, what is wrong)`` for every malformed line of ``path`` (1-based)."""
    try:
        with _open(path) as f:
            for number, line in enumerate(f, 1):
                problem = _problem(line)
                if problem:
                    yield number, problem
    except UnicodeDecodeError as err:
        yield -1, f"not UTF-8 text ({err})"


def first_bad_line(paths: list[str]) -> str | None:
    """``FILE:LINE: problem`` of the first malformed line among JSON-lines ``paths``, or None."""
    for path in paths:
        if is_jsonl(path):
            for number, problem in bad_lines(path):
                where = path if number < 0 else f"{path}:{number}"
                return f"{where}: {problem}"
    return None


def without_bad_lines(path: str, out: Path) -> int:
    """Copy ``path`` to ``out`` (plain text) without its malformed lines; returns how many."""
    skipped = 0
    with _open(path) as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            if _problem(line):
                skipped += 1
            else:
                g.write(line if line.endswith("\n") else line + "\n")
    return skipped
