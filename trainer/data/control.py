"""Refuse harmony's control tokens written as text inside a row (and text that cannot be encoded).

The renderer encodes ``<|channel|>`` in content as ordinary text tokens, so a row holding raw model
output would teach the model to print its own control tags as prose. The official chat template
refuses such rows; so do we, for every text that is rendered: content, thinking, tool names,
arguments and results, and tool definitions. The same pass refuses unpaired surrogates (a JSON
escape such as ``\ud800`` decodes to one), which the renderer would fail on with a bare ValueError.
"""

from __future__ import annotations

import functools
import json
import re

from gptoss_cloud.trainer.data.notes import Problem, clip

_TAG = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")


@functools.lru_cache(maxsize=1)
def _specials() -> frozenset[str]:
    from gptoss_cloud.trainer.data.vocab import load_encoding

    return frozenset(load_encoding().special_tokens_set)  # the vocabulary's own list, reserved ones too


def check_text(text: str | None, where: str) -> None:
    if not text:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to text no renderer can encode
        raise Problem(f"{where}: holds an unpaired surrogate {text[e.start]!r} at character {e.start}, "
                      "which is not Unicode text") from None
    if "<|" not in text:
        return
    for m in _TAG.finditer(text):
        if m.group() in _specials():
            raise Problem(f"{where}: contains the harmony control token {m.group()!r} as text "
                          "(raw model output?); it would be trained as literal tags")


def check_row(row) -> None:
    """Every rendered text of a parsed rows.Row."""
    for m in row.messages:
        where = f"message {m.index} ({m.role})"
        check_text(m.content, f"{where} content")
        check_text(m.thinking, f"{where} thinking")
        check_text(m.name, f"{where} name")
        for j, c in enumerate(m.tool_calls):
            check_text(c.name, f"{where} tool call {j} name")
            check_text(c.arguments, f"{where} tool call {j} ({clip(c.name)}) arguments")
    for j, t in enumerate(row.tools):
        check_text(t.name, f"tool {j} name")
        check_text(t.description, f"tool {j} ({clip(t.name)}) description")
        if t.parameters is not None:
            check_text(json.dumps(t.parameters, ensure_ascii=False), f"tool {j} ({clip(t.name)}) parameters")
