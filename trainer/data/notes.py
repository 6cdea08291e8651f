"""What reading a row reports: a refusal (Problem, RowError), or what it changed without refusing it.

A row in an older or foreign shape is converted, a field we cannot render is dropped, a missing
setting is defaulted — each is worth training on, none may pass silently. ``data preview``, ``data
tokenize`` and the run's dataset statistics list these counts per kind.
"""

from __future__ import annotations

from gptoss_cloud.contract.errors import DataError

# kind -> (what happened, description)
KINDS: dict[str, tuple[str, str]] = {
    "legacy_functions": ("converted", "legacy function calling (functions, function_call, role function) read as tools"),
    "bare_parameters": ("converted", "tool parameters given as a bare property map, wrapped in an object schema"),
    "non_schema_parameters": ("defaulted", "tool parameters that are not a JSON Schema object, rendered as (_: any) => any"),
    "thinking_not_assistant": ("dropped", "thinking on a non-assistant message (only the assistant's analysis is rendered)"),
    "duplicate_call_ids": ("defaulted", "duplicate tool_call_id within one turn: results matched to calls in order"),
    "calls_without_results": ("dropped", "tool calls after the call that ends a conversation without a result: "
                                         "harmony stops there, so only that call is trained"),
    "no_conversation_date": ("defaulted", "no 'Current date:' line (vLLM writes today's date at inference): "
                                          "set data.conversation_date"),
}


class Notes:
    """Counts per kind and where each kind first occurred ("<source> row <n>"). Picklable (worker processes)."""

    def __init__(self, counts: dict[str, int] | None = None, first: dict[str, str] | None = None):
        self.counts: dict[str, int] = dict(counts or {})
        self.first: dict[str, str] = dict(first or {})

    def add(self, kind: str, source: str, row: int, n: int = 1) -> None:
        assert kind in KINDS, kind
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.first.setdefault(kind, f"{source} row {row}")

    def update(self, other: "Notes") -> None:
        """Add ``other``'s counts; ``first`` keeps the earlier occurrence (merge in input order)."""
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
            self.first.setdefault(kind, other.first[kind])

    def __bool__(self) -> bool:
        return bool(self.counts)

    def rows(self) -> list[tuple[str, str, int, str]]:
        """(what happened, description, count, first row), in KINDS order."""
        return [(KINDS[k][0], KINDS[k][1], self.counts[k], self.first[k]) for k in KINDS if k in self.counts]

    def lines(self) -> list[str]:
        return [f"{what}: {n} × {desc} (first: {first})" for what, desc, n, first in self.rows()]

    def to_json(self) -> dict:
        return {k: [self.counts[k], self.first[k]] for k in self.counts}

    @classmethod
    def from_json(cls, doc: dict) -> "Notes":
        return cls({k: v[0] for k, v in doc.items()}, {k: v[1] for k, v in doc.items()})


def short(v, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters: an error message never echoes a whole row's value."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def clip(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters (names quoted into error locations)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Problem(Exception):
    """A row cannot be read: rows.parse_row turns it into a RowError naming source and row."""


class RowError(DataError):
    """One malformed row: ``on_error: skip`` counts these, ``fail`` raises them."""

    def __init__(self, source: str, row: int, problem: str):
        super().__init__(f"{source} row {row}: {problem}", hint="fix the row, or set data.on_error: skip")
        self.source, self.row, self.problem = source, row, problem

    def __reduce__(self):  # crosses process boundaries (parallel tokenization)
        return (type(self), (self.source, self.row, self.problem))
