"""Rows in other shapes -> the OpenAI messages format that rows.parse_row reads.

Two kinds of reshaping, both before validation so every later check (roles, tool matching, control
tokens) applies to converted rows exactly as to native ones:

- a source's ``message_property_mappings`` and ``roles`` (Axolotl's option names): ShareGPT's
  ``{"from": "human", "value": ...}`` or any custom key names become ``role``/``content``;
- OpenAI's legacy function calling: the row's ``functions`` list, an assistant's ``function_call``
  and role ``function`` results become ``tools``, ``tool_calls`` and role ``tool``.
"""

from __future__ import annotations

from typing import Any, Mapping

from gptoss_cloud.trainer.data.notes import Problem


def map_message(raw: Any, properties: Mapping[str, str], roles: Mapping[str, str]) -> Any:
    """One message with its keys renamed by ``properties`` and its role by ``roles``."""
    if not isinstance(raw, dict):
        return raw  # parse_row names the problem
    msg = dict(raw)
    for prop, key in properties.items():
        if key in raw:
            msg[prop] = raw[key]
            if key != prop and key not in properties:
                msg.pop(key, None)
    role = msg.get("role")
    if isinstance(role, str):
        msg["role"] = roles.get(role, role)
    return msg


def legacy_message(msg: Any, where: str) -> tuple[Any, bool]:
    """(the message in today's form, whether it used legacy function calling)."""
    if not isinstance(msg, dict):
        return msg, False
    if msg.get("role") == "function":  # a function's result, named by the function
        out = {k: v for k, v in msg.items() if k != "role"}
        return {"role": "tool", **out}, True
    call = msg.get("function_call")
    if call is None:
        return msg, False
    if msg.get("role") != "assistant":
        raise Problem(f"{where}: 'function_call' applies to assistant messages only")
    if msg.get("tool_calls") is not None:
        raise Problem(f"{where}: has both 'tool_calls' and the legacy 'function_call' (keep one)")
    if not isinstance(call, dict):
        raise Problem(f"{where}: 'function_call' must be an object with name and arguments")
    out = {k: v for k, v in msg.items() if k != "function_call"}
    out["tool_calls"] = [{"type": "function", "function": call}]
    return out, True


def legacy_tools(tools: Any, functions: Any, field_tools: str) -> list:
    """The row's tools plus its legacy ``functions`` (the flat ``{name, description, parameters}`` form)."""
    if not isinstance(functions, list):
        raise Problem(f"'functions' must be a list of function definitions, not {type(functions).__name__}")
    if tools is not None and not isinstance(tools, list):
        raise Problem(f"{field_tools!r} must be a list of function definitions")
    return list(tools or []) + functions
