"""Decoding dataset bytes into rows under limits: a file's bytes are untrusted input.

A row nested thousands of levels deep makes ``json.loads`` (and every recursive walk after it) raise
``RecursionError``; a single undecodable byte would otherwise fail the whole file with no line number.
Both become a RowError in place of that one row, so ``on_error: skip`` counts them like any other
malformed row, and ``fail`` names the file and the line.
"""

from __future__ import annotations

import json
from typing import Any

from gptoss_cloud.contract.errors import DataError

from gptoss_cloud.trainer.data.notes import RowError

# Deepest nesting a row may have. Real rows reach ~10 (a tool schema inside a tool list inside a row);
# 64 leaves room for deep schemas while keeping every later recursive step (schema cleanup, JSON
# re-encoding of arguments, the renderer) far from Python's recursion limit.
MAX_DEPTH = 64
# Largest JSONL line. A 128k-token conversation is well under 1 MiB of text; a line of 32 MiB is not a
# conversation but a mistake (or an attack) that would otherwise be decoded and held in memory whole.
MAX_ROW_BYTES = 32 * 1024 * 1024


def depth_problem(obj: Any, limit: int | None = None) -> str | None:
    """None when ``obj`` nests at most ``limit`` (MAX_DEPTH) levels, else the problem. Iterative: no recursion limit."""
    limit = MAX_DEPTH if limit is None else limit
    stack = [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        if d > limit:
            return f"nested deeper than {limit} levels"
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return None


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def loads(text: str, finite: bool = False) -> tuple[Any, str | None]:
    """(the value, None), or (None, the problem) for text that is not JSON or nests too deep.

    ``finite``: also refuse Python's NaN/Infinity extension (for text rendered verbatim as JSON)."""
    try:
        obj = json.loads(text, parse_constant=_not_json) if finite else json.loads(text)
    except RecursionError:
        return None, f"nested deeper than {MAX_DEPTH} levels"
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        return None, f"not valid JSON ({e.msg} at {at})"
    except ValueError as e:  # from _not_json
        return None, f"not valid JSON ({e})"
    return obj, depth_problem(obj)


def jsonl_rows(data: bytes, name: str) -> list[Any]:
    """One row per non-blank line; a line that cannot be a row becomes a RowError naming its line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows: list[Any] = []
    # Split the bytes on newlines only: str.splitlines would also split on U+2028, U+0085 and other
    # characters that JSON allows raw inside a string, cutting a valid row in two.
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line.strip():
            continue
        if len(line) > MAX_ROW_BYTES:
            rows.append(RowError(name, len(rows), f"line {n} is {len(line)} bytes, over the row limit of {MAX_ROW_BYTES}"))
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = line[e.start : e.start + 1]
            rows.append(RowError(name, len(rows), f"line {n} is not UTF-8 (byte {e.start + 1} of the line: {bad!r})"))
            continue
        obj, problem = loads(text)
        rows.append(RowError(name, len(rows), f"line {n} is {problem}") if problem else obj)
    return rows


def json_rows(data: bytes, name: str) -> list[Any]:
    """The rows of a JSON document (a list, or {"data": [...]}); a too-deep row becomes a RowError."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name} is not UTF-8 text (line {line}, byte {e.start})") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise DataError(f"{name} is nested deeper than the JSON decoder allows") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{name} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{name} must hold a JSON list of rows (or {{\"data\": [...]}}), not {type(obj).__name__}")
    return checked(obj, name)


def checked(rows: list[Any], name: str) -> list[Any]:
    """Rows from any source with every too-deep row replaced by its RowError."""
    out = []
    for i, r in enumerate(rows):
        problem = depth_problem(r)
        out.append(RowError(name, i, f"row is {problem}") if problem else r)
    return out
