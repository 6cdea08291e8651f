"""Does a completion still speak harmony? The checks ``eval`` runs on each generated reply.

- ``ends_with_return``: a final answer closes with ``<|return|>`` (not cut off by the token limit, not
  closed with ``<|end|>`` as history is); a reply that is a tool call closes with ``<|call|>`` instead.
- ``tool_args_valid``: each call names a tool of the conversation and its arguments are JSON matching
  that tool's parameter schema.
- ``no_leak``: no control-token text (``<|channel|>``, ``<|end|>``, ...) inside any message's text.
- ``analysis_present``: an analysis message exists when the reasoning effort is medium or high.

Each check is True, False, or None where it does not apply (no tool call, low effort).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

CONTROL_TEXT = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
                "<|endoftext|>", "<|startoftext|>")
CHECKS = ("ends_with_return", "tool_args_valid", "no_leak", "analysis_present")


@dataclass
class Checked:
    ends_with_return: bool | None = None
    tool_args_valid: bool | None = None
    no_leak: bool | None = None
    analysis_present: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return all(getattr(self, c) is not False for c in CHECKS)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "valid": self.valid}


def _special(enc, text: str) -> int:
    (tok,) = enc.encode(text, allowed_special="all")
    return tok


def _schema_problem(args: Any, schema: dict | None) -> str | None:
    if not schema:
        return None
    import jsonschema

    try:
        jsonschema.validate(args, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        return f"{where}: {e.message}"
    except jsonschema.SchemaError as e:
        return f"the tool's own schema is invalid: {e.message}"
    return None


def check_completion(enc, tokens: list[int], tools: dict[str, dict | None], effort: str) -> Checked:
    """``tokens``: what the model generated after ``<|start|>assistant``; ``tools``: name -> parameters."""
    from openai_harmony import HarmonyError, Role

    c = Checked()
    try:
        messages = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    except HarmonyError as e:
        c.ends_with_return = c.no_leak = False
        c.problems.append(f"not parseable as harmony: {str(e)[:200]}")
        return c
    texts = [(m, "".join(getattr(p, "text", "") for p in m.content)) for m in messages]
    calls = [(m, t) for m, t in texts if (m.recipient or "").startswith("functions.")]
    last = tokens[-1] if tokens else None
    if calls:
        c.ends_with_return = last == _special(enc, "<|call|>") or None
        if c.ends_with_return is None:
            c.problems.append("the tool call is not closed with <|call|>")
            c.ends_with_return = False
    else:
        c.ends_with_return = any(m.channel == "final" for m, _ in texts) and last == _special(enc, "<|return|>")
        if not c.ends_with_return:
            c.problems.append("no final answer closed with <|return|> (cut off, or closed like history)")
    if calls:
        c.tool_args_valid = True
        for m, text in calls:
            name = m.recipient.removeprefix("functions.")
            if name not in tools:
                c.tool_args_valid = False
                c.problems.append(f"call to unknown tool {name!r}")
                continue
            try:
                args = json.loads(text)
            except json.JSONDecodeError as e:
                c.tool_args_valid = False
                c.problems.append(f"{name}: arguments are not JSON ({e.msg} at char {e.pos})")
                continue
            if (problem := _schema_problem(args, tools[name])) is not None:
                c.tool_args_valid = False
                c.problems.append(f"{name}: arguments do not match its schema: {problem}")
    leaks = sorted({t for _, text in texts for t in CONTROL_TEXT if t in text})
    c.no_leak = not leaks
    if leaks:
        c.problems.append(f"control-token text in a message: {', '.join(leaks)}")
    if effort in ("medium", "high"):
        c.analysis_present = any(m.channel == "analysis" and text.strip() for m, text in texts)
        if not c.analysis_present:
            c.problems.append(f"no analysis at reasoning effort {effort}")
    return c


def rates(checked: list[Checked]) -> dict[str, float | None]:
    """Per check, the share of the replies it applies to that pass; ``format_valid_rate`` over all."""
    out: dict[str, float | None] = {}
    for name in CHECKS:
        vals = [getattr(c, name) for c in checked if getattr(c, name) is not None]
        out[f"{name}_rate"] = sum(vals) / len(vals) if vals else None
    out["format_valid_rate"] = sum(c.valid for c in checked) / len(checked) if checked else None
    return out
