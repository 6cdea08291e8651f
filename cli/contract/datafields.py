"""The names a dataset row may use for its messages' roles and properties.

Shared by the spec (which checks a source's ``message_property_mappings`` and ``roles`` when it is
loaded, so a typo fails once, before any row is read) and the data pipeline (which reads rows with
them). The option names are Axolotl's, so a dataset section written for Axolotl carries over.
"""

from __future__ import annotations

from typing import Mapping

ROLES = ("system", "developer", "user", "assistant", "tool")
# Every name under which datasets and inference servers store the assistant's analysis: transformers
# treats all three as one field; vLLM, OpenRouter and LM Studio return `reasoning`.
THINKING_FIELDS = ("thinking", "reasoning_content", "reasoning")
MESSAGE_PROPERTIES = ("role", "content", *THINKING_FIELDS, "tool_calls", "tool_call_id", "name", "train", "weight",
                      "function_call")
# ShareGPT's role names, read without configuration (Axolotl's defaults do the same).
DEFAULT_ROLE_NAMES = {"human": "user", "gpt": "assistant"}


def check_property_mappings(mappings: Mapping[str, str]) -> dict[str, str]:
    """``{property: key in the row}``; a property we do not know is an error naming it."""
    for prop, key in mappings.items():
        if prop not in MESSAGE_PROPERTIES:
            raise ValueError(f"message_property_mappings: unknown message property {prop!r} "
                             f"(expected one of {', '.join(MESSAGE_PROPERTIES)})")
        if not isinstance(key, str) or not key:
            raise ValueError(f"message_property_mappings.{prop}: must name the row's key, got {key!r}")
    keys = list(mappings.values())
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ValueError(f"message_property_mappings: key {dup!r} is mapped to more than one property")
    return dict(mappings)


def role_names(roles: Mapping[str, list[str]]) -> dict[str, str]:
    """The row's role name -> our role: the defaults, then ``roles`` (``{our role: [row's names]}``) over them."""
    out = {r: r for r in ROLES} | DEFAULT_ROLE_NAMES
    seen: dict[str, str] = {}
    for role, names in roles.items():
        if role not in ROLES:
            raise ValueError(f"roles: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        for name in names:
            if name in seen and seen[name] != role:
                raise ValueError(f"roles: {name!r} is listed for both {seen[name]!r} and {role!r}")
            seen[name] = out[name] = role
    return out
