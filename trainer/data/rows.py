"""Parse and validate one row in the OpenAI messages format into plain dataclasses.

Everything a later stage relies on is checked here, so a malformed row fails with one message
naming the source, the row index and the problem (RowError), never with a traceback later on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from gptoss_cloud.contract.datafields import ROLES, THINKING_FIELDS, role_names
from gptoss_cloud.trainer.data.control import check_row
from gptoss_cloud.trainer.data.limits import loads
from gptoss_cloud.trainer.data.notes import Notes, RowError, clip, short
from gptoss_cloud.trainer.data.notes import Problem as _Problem
from gptoss_cloud.trainer.data.shapes import legacy_message, legacy_tools, map_message

EFFORTS = ("low", "medium", "high")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, rendered verbatim after the <|constrain|>json header
    id: str | None = None


@dataclass
class ChatMessage:
    role: str
    content: str | None = None
    thinking: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None  # tool results
    name: str | None = None  # tool results: the function's name
    train: bool = True
    index: int = 0  # position in the row's messages (for error messages)


@dataclass
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict | None = None


@dataclass
class Row:
    messages: list[ChatMessage]
    tools: list[ToolSpec] = field(default_factory=list)
    reasoning_effort: str | None = None


def _missing(v: Any) -> bool:
    # Parquet and hub datasets fill absent struct fields with None.
    return v is None


def _text(content: Any, where: str) -> str | None:
    if _missing(content):
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise _Problem(f"{where}: content part of type {short(kind)} is not supported (text only)")
        return "".join(parts)
    raise _Problem(f"{where}: content must be a string or a list of text parts, not {type(content).__name__}")


def _optional_str(raw: dict, key: str, where: str) -> str | None:
    v = raw.get(key)
    if _missing(v) or v == "":
        return None
    if not isinstance(v, str):
        raise _Problem(f"{where}: {key!r} must be a string, not {type(v).__name__}")
    return v


def _dumps(value: Any, where: str, what: str) -> str:
    try:  # NaN and Infinity are not JSON: the renderer (and any JSON reader) refuses them
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise _Problem(f"{where}: {what} hold a number that is not finite (NaN or Infinity is not JSON)") from None


def _json_text(value: Any, where: str) -> str:
    if _missing(value):
        return "{}"
    if isinstance(value, str):
        _, problem = loads(value, finite=True)
        if problem:
            raise _Problem(f"{where}: arguments are {problem}: {short(value)}")
        return value
    if isinstance(value, (dict, list)):
        return _dumps(value, where, "arguments")
    raise _Problem(f"{where}: arguments must be a JSON string or an object, not {type(value).__name__}")


def _function(raw: Any, where: str) -> tuple[dict, str]:
    """The function object of a tool call or tool definition (OpenAI's nested or flat form) and its name."""
    if not isinstance(raw, dict):
        raise _Problem(f"{where}: must be an object, not {type(raw).__name__}")
    fn = raw.get("function") if isinstance(raw.get("function"), dict) else raw
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _Problem(f"{where}: missing function name")
    return fn, name


def _tool_call(raw: Any, where: str) -> ToolCall:
    fn, name = _function(raw, where)
    at = f"{where} ({clip(name)})"
    return ToolCall(name=name, arguments=_json_text(fn.get("arguments"), at), id=_optional_str(raw, "id", at))


def _tool_spec(raw: Any, where: str, note) -> ToolSpec:
    fn, name = _function(raw, where)
    at = f"{where} ({clip(name)})"
    params = fn.get("parameters")
    if isinstance(params, str):
        params, problem = loads(params)
        if problem:
            raise _Problem(f"{at}: parameters are {problem}")
    if params is not None and not isinstance(params, dict):
        raise _Problem(f"{at}: parameters must be a JSON-schema object")
    params = _schema(_drop_nulls(params), note)
    if params is not None:
        _dumps(params, at, "parameters")
    return ToolSpec(name=name, description=_optional_str(fn, "description", at) or "", parameters=params)


def _schema(params: dict | None, note) -> dict | None:
    """Parameters as harmony can render them: it reads an object schema and renders anything else as
    ``(_: any) => any``, so a bare ``{name: {type: ...}}`` map (xlam-style datasets) is wrapped."""
    if not params or params.get("type") == "object":
        return params
    if all(isinstance(v, dict) and "type" in v for v in params.values()):
        note("bare_parameters")
        return {"type": "object", "properties": params}
    note("non_schema_parameters")
    return params


def _drop_nulls(v: Any) -> Any:
    # Parquet/hub rows unify struct fields across rows, so one tool's schema gains another's keys as
    # None (e.g. "required": None). A null-valued schema keyword means "absent" here.
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v]
    return v


def _thinking(raw: dict, field_thinking: str, where: str) -> str | None:
    """The analysis under any of its names; two names holding different text is an error naming both."""
    found: list[tuple[str, str]] = []
    for name in dict.fromkeys((field_thinking, *THINKING_FIELDS)):
        text = _text(raw.get(name), f"{where} {name}")
        if text and text.strip():
            found.append((name, text))
    for name, text in found[1:]:
        if text != found[0][1]:
            raise _Problem(f"{where}: {found[0][0]!r} and {name!r} hold different text (keep one)")
    return found[0][1] if found else None


def _train(raw: dict, role: str, where: str) -> bool:
    """``train: false`` or OpenAI's ``weight: 0`` leaves an assistant message untrained."""
    train, weight = raw.get("train"), raw.get("weight")
    if not _missing(train) and not isinstance(train, bool):
        raise _Problem(f"{where}: 'train' must be true or false")
    if not _missing(weight):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise _Problem(f"{where}: 'weight' must be 0 or 1, got {short(weight)}")
        if not _missing(train) and train != bool(weight):
            raise _Problem(f"{where}: 'train: {str(train).lower()}' and 'weight: {weight}' disagree")
        train = bool(weight)
    if not _missing(train) and role != "assistant":
        raise _Problem(f"{where}: '{'train' if _missing(weight) else 'weight'}' applies to assistant messages only")
    return train is not False


def _message(raw: Any, i: int, field_thinking: str, note) -> ChatMessage:
    where = f"message {i}"
    if not isinstance(raw, dict):
        raise _Problem(f"{where}: must be an object, not {type(raw).__name__}")
    role = raw.get("role")
    if role not in ROLES:
        hint = "; a ShareGPT row? set message_property_mappings: {role: from, content: value}" if "from" in raw else \
            "; map other names with the source's roles"
        raise _Problem(f"{where}: unknown role {short(role)} (expected one of {', '.join(ROLES)}{hint})")
    where = f"message {i} ({role})"
    train = _train(raw, role, where)
    content = raw.get("content")
    if role == "tool" and isinstance(content, (dict, list)) and not _is_parts(content):
        content = _dumps(content, where, "the result's values")  # a structured tool result: rendered as JSON text
    msg = ChatMessage(role=role, content=_text(content, where), index=i, train=train)
    thinking = _thinking(raw, field_thinking, where)
    if thinking and role != "assistant":
        note("thinking_not_assistant")
    if role == "assistant":
        msg.thinking = thinking
        calls = raw.get("tool_calls")
        if not _missing(calls):
            if not isinstance(calls, list):
                raise _Problem(f"{where}: tool_calls must be a list")
            msg.tool_calls = [_tool_call(c, f"{where} tool call {j}") for j, c in enumerate(calls)]
        if not (msg.content or "").strip() and not msg.thinking and not msg.tool_calls:
            raise _Problem(f"{where}: empty assistant turn (no content, thinking or tool_calls)")
        if not (msg.content or "").strip():
            msg.content = None
    elif role == "tool":
        if msg.content is None:
            raise _Problem(f"{where}: missing content")
        msg.tool_call_id = _optional_str(raw, "tool_call_id", where)
        msg.name = _optional_str(raw, "name", where)
    elif msg.content is None:
        raise _Problem(f"{where}: missing content")
    return msg


def _is_parts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in v)


def parse_row(raw: Any, *, source: str, row: int, field_messages: str = "messages", field_thinking: str = "thinking",
              field_tools: str = "tools", field_reasoning_effort: str = "reasoning_effort",
              properties: Mapping[str, str] | None = None, roles: Mapping[str, str] | None = None,
              notes: Notes | None = None) -> Row:
    """Validate one dataset row. Raises RowError naming source, row and problem.

    ``properties`` and ``roles`` rename message keys and roles (shapes.map_message); ``notes`` counts
    what was converted, dropped or defaulted on the way.
    """
    roles = roles if roles is not None else role_names({})
    pending = Notes()  # counted only if the row is accepted

    def note(kind: str, n: int = 1):
        pending.add(kind, source, row, n)

    try:
        if not isinstance(raw, dict):
            raise _Problem(f"must be a JSON object, not {type(raw).__name__}")
        msgs = raw.get(field_messages)
        if _missing(msgs):
            hint = " (a ShareGPT row: see message_property_mappings)" if "conversations" in raw else ""
            raise _Problem(f"missing {field_messages!r} (set the source's field_messages if it is named differently){hint}")
        if not isinstance(msgs, list) or not msgs:
            raise _Problem(f"{field_messages!r} must be a non-empty list of messages")
        msgs = [map_message(m, properties or {}, roles) for m in msgs]
        legacy = False
        for i, m in enumerate(msgs):
            msgs[i], converted = legacy_message(m, f"message {i}")
            legacy |= converted
        messages = [_message(m, i, field_thinking, note) for i, m in enumerate(msgs)]
        if not any(m.role == "assistant" for m in messages):
            raise _Problem("no assistant message to train on")
        tools_raw = raw.get(field_tools)
        if isinstance(tools_raw, str):  # some hub datasets store the tool list as JSON text
            tools_raw, problem = loads(tools_raw)
            if problem:
                raise _Problem(f"{field_tools!r} is a string but {problem}")
        if not _missing(raw.get("functions")):
            tools_raw, legacy = legacy_tools(tools_raw, raw["functions"], field_tools), True
        if not _missing(tools_raw) and not isinstance(tools_raw, list):
            raise _Problem(f"{field_tools!r} must be a list of function definitions")
        tools = [_tool_spec(t, f"tool {j}", note) for j, t in enumerate(tools_raw or [])]
        if legacy:
            note("legacy_functions")
        effort = raw.get(field_reasoning_effort)
        if not _missing(effort):
            if not isinstance(effort, str) or effort.lower() not in EFFORTS:
                raise _Problem(f"{field_reasoning_effort!r} must be one of {', '.join(EFFORTS)}, got {short(effort)}")
            effort = effort.lower()
        parsed = Row(messages=messages, tools=tools, reasoning_effort=effort)
        check_row(parsed)
    except _Problem as p:
        raise RowError(source, row, str(p)) from None
    if notes is not None:
        notes.update(pending)
    return parsed
