"""Harmony rendering and label masks.

Expected token ids come from openai-harmony itself, rendering conversations this file builds by hand
from harmony Message objects; expected masks are the trained spans written out as text. Neither
uses the conversion or masking code under test.
"""

from __future__ import annotations

import json

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

from gptoss_cloud.contract.sections import DataSection
from gptoss_cloud.trainer.data.harmony import IGNORE, tokenize_row
from gptoss_cloud.trainer.data.vocab import load_encoding

KEEP = RenderConversationConfig(auto_drop_analysis=False)
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"name": "get_time", "description": "Local time", "parameters": WEATHER},  # flat form is accepted too
]


@pytest.fixture(scope="module")
def enc():
    return load_encoding()


# ------------------------------------------------------------------------------- hand-built harmony
def H_sys(effort="medium", **kw):
    sc = SystemContent.new().with_reasoning_effort(ReasoningEffort[effort.upper()])
    for k, v in kw.items():
        setattr(sc, k, v)
    return Message.from_role_and_content(Role.SYSTEM, sc)


def H_dev(instructions=None, tools=None):
    dc = DeveloperContent.new()
    if instructions:
        dc = dc.with_instructions(instructions)
    if tools:
        dc = dc.with_function_tools(tools)
    return Message.from_role_and_content(Role.DEVELOPER, dc)


def H_user(t):
    return Message.from_role_and_content(Role.USER, t)


def H_an(t):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel("analysis")


def H_fin(t):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel("final")


def H_call(name, args):
    return (Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
            .with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))


def H_res(name, t):
    return (Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), t)
            .with_channel("commentary").with_recipient("assistant"))


H_TOOLS = [ToolDescription.new("get_weather", "Weather now", WEATHER), ToolDescription.new("get_time", "Local time", WEATHER)]


def expected(enc, msgs):
    conv = Conversation.from_messages(msgs)
    if msgs[-1].channel == "final":
        return enc.render_conversation_for_training(conv, KEEP)
    return enc.render_conversation(conv, KEEP)


def trained_spans(enc, seq):
    """Contiguous trained runs, decoded."""
    out, cur = [], []
    for t, lab in zip(seq.input_ids, seq.labels):
        assert lab in (IGNORE, t)
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            out.append(enc.decode(cur))
            cur = []
    if cur:
        out.append(enc.decode(cur))
    return out


def run(row, **data):
    return tokenize_row(row, DataSection(**data))


# ------------------------------------------------------------------------------------- cases
def u(t):
    return {"role": "user", "content": t}


def a(content=None, thinking=None, **kw):
    m = {"role": "assistant"}
    if content is not None:
        m["content"] = content
    if thinking is not None:
        m["thinking"] = thinking
    return {**m, **kw}


def call(i, name, args):
    return {"id": i, "type": "function", "function": {"name": name, "arguments": args}}


def test_single_turn(enc):
    [s] = run({"messages": [u("Hi"), a("Hello!")]})
    assert s.input_ids == expected(enc, [H_sys(), H_user("Hi"), H_fin("Hello!")])
    assert trained_spans(enc, s) == ["<|channel|>final<|message|>Hello!<|return|>"]
    assert s.row == 0


def test_single_turn_thinking_is_kept_unlike_harmony_default(enc):
    row = {"messages": [u("2+2?"), a("4", thinking="Add.")], "reasoning_effort": "low"}
    [s] = run(row)
    msgs = [H_sys("low"), H_user("2+2?"), H_an("Add."), H_fin("4")]
    assert s.input_ids == expected(enc, msgs)
    assert trained_spans(enc, s) == [
        "<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"]
    # The pitfall this pipeline avoids: openai-harmony 0.0.8's default drops the only response's analysis.
    naive = enc.render_conversation_for_training(Conversation.from_messages(msgs))
    assert "Add." not in enc.decode(naive)


def test_harmony_default_drops_analysis_before_first_final_only(enc):
    # Why we never rely on auto_drop_analysis: with three responses it keeps the middle one's analysis.
    msgs = [H_sys(), H_user("q1"), H_an("A1"), H_fin("F1"), H_user("q2"), H_an("A2"), H_fin("F2"),
            H_user("q3"), H_an("A3"), H_fin("F3")]
    text = enc.decode(enc.render_conversation_for_training(Conversation.from_messages(msgs)))
    assert "A1" not in text and "A2" in text and "A3" in text


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_effort_from_spec_and_row(enc, effort):
    row = {"messages": [u("x"), a("y")]}
    [s] = run(row, reasoning_effort=effort)
    assert s.input_ids == expected(enc, [H_sys(effort), H_user("x"), H_fin("y")])
    other = "low" if effort != "low" else "high"
    [s2] = run({**row, "reasoning_effort": effort.upper()}, reasoning_effort=other)  # the row wins
    assert s2.input_ids == s.input_ids


def test_system_content_options(enc):
    row = {"messages": [u("x"), a("y")]}
    [s] = run(row, knowledge_cutoff=None, conversation_date="2025-01-31", model_identity="You are Tiny.")
    sysm = H_sys(knowledge_cutoff=None, conversation_start_date="2025-01-31", model_identity="You are Tiny.")
    assert s.input_ids == expected(enc, [sysm, H_user("x"), H_fin("y")])
    text = enc.decode(s.input_ids)
    assert "Current date: 2025-01-31" in text and "Knowledge cutoff" not in text
    [plain] = run(row)
    assert "Current date" not in enc.decode(plain.input_ids)  # never today's date implicitly


def test_system_and_developer_become_developer_instructions(enc):
    row = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "developer", "content": "Use French."},
                        u("Hi"), a("Salut.")]}
    [s] = run(row)
    assert s.input_ids == expected(enc, [H_sys(), H_dev("Be terse.\n\nUse French."), H_user("Hi"), H_fin("Salut.")])
    assert trained_spans(enc, s) == ["<|channel|>final<|message|>Salut.<|return|>"]


def test_multi_turn_no_thinking_trains_every_response(enc):
    row = {"messages": [u("a"), a("A"), u("b"), a("B"), u("c"), a("C")]}
    [s] = run(row)
    assert s.input_ids == expected(enc, [H_sys(), H_user("a"), H_fin("A"), H_user("b"), H_fin("B"),
                                         H_user("c"), H_fin("C")])
    # Earlier final answers close with <|end|>, untrained; only the last one ends with a trained <|return|>.
    assert trained_spans(enc, s) == ["<|channel|>final<|message|>A", "<|channel|>final<|message|>B",
                                     "<|channel|>final<|message|>C<|return|>"]
    [last] = run(row, train_on="last")
    assert last.input_ids == s.input_ids
    assert trained_spans(enc, last) == ["<|channel|>final<|message|>C<|return|>"]


def test_several_tool_calls_interleaved_with_results_by_id(enc):
    row = {
        "messages": [
            {"role": "system", "content": "Use tools."},
            u("Weather in Oslo and time in Lima?"),
            a(thinking="Two calls.", tool_calls=[call("c1", "get_weather", '{"city":"Oslo"}'),
                                                 call("c2", "get_time", {"city": "Lima"})]),
            {"role": "tool", "tool_call_id": "c2", "content": "08:00"},  # results out of order: matched by id
            {"role": "tool", "tool_call_id": "c1", "content": {"temp": -3}},
            a("Oslo -3, Lima 08:00.", thinking="Both back."),
        ],
        "tools": TOOLS,
        "reasoning_effort": "high",
    }
    [s] = run(row)
    msgs = [H_sys("high"), H_dev("Use tools.", H_TOOLS), H_user("Weather in Oslo and time in Lima?"),
            H_an("Two calls."), H_call("get_weather", '{"city":"Oslo"}'), H_res("get_weather", '{"temp": -3}'),
            H_call("get_time", '{"city": "Lima"}'), H_res("get_time", "08:00"),
            H_an("Both back."), H_fin("Oslo -3, Lima 08:00.")]
    assert s.input_ids == expected(enc, msgs)
    assert trained_spans(enc, s) == [
        "<|channel|>analysis<|message|>Two calls.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city":"Oslo"}<|call|>',
        ' to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>{"city": "Lima"}<|call|>',
        "<|channel|>analysis<|message|>Both back.<|end|><|start|>assistant<|channel|>final<|message|>Oslo -3, Lima 08:00.<|return|>",
    ]
    text = enc.decode(s.input_ids)
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>08:00<|end|>" in text


def test_results_matched_by_name_without_ids_and_preamble(enc):
    row = {"messages": [
        u("Time and weather?"),
        a("Checking.", tool_calls=[{"name": "get_time", "arguments": "{}"}, {"name": "get_weather", "arguments": "{}"}]),
        {"role": "tool", "name": "get_weather", "content": "sun"},
        {"role": "tool", "name": "get_time", "content": "noon"},
        a("Noon, sunny."),
    ], "tools": TOOLS}
    [s] = run(row)
    pre = Message.from_role_and_content(Role.ASSISTANT, "Checking.").with_channel("commentary")
    msgs = [H_sys(), H_dev(None, H_TOOLS), H_user("Time and weather?"), pre, H_call("get_time", "{}"),
            H_res("get_time", "noon"), H_call("get_weather", "{}"), H_res("get_weather", "sun"), H_fin("Noon, sunny.")]
    assert s.input_ids == expected(enc, msgs)
    assert trained_spans(enc, s)[0] == (
        "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.get_time"
        "<|channel|>commentary <|constrain|>json<|message|>{}<|call|>")


THINKING_MULTI = {"messages": [u("q1"), a("F1", thinking="A1"), u("q2"), a("F2", thinking="A2"), u("q3"), a("F3", thinking="A3")]}


def test_expand_renders_each_response_as_at_inference(enc):
    seqs = run(THINKING_MULTI)
    assert len(seqs) == 3
    r1 = [H_sys(), H_user("q1"), H_an("A1"), H_fin("F1")]
    r2 = [H_sys(), H_user("q1"), H_fin("F1"), H_user("q2"), H_an("A2"), H_fin("F2")]
    r3 = [H_sys(), H_user("q1"), H_fin("F1"), H_user("q2"), H_fin("F2"), H_user("q3"), H_an("A3"), H_fin("F3")]
    for s, msgs, k in zip(seqs, (r1, r2, r3), (1, 2, 3)):
        assert s.input_ids == expected(enc, msgs)
        assert trained_spans(enc, s) == [
            f"<|channel|>analysis<|message|>A{k}<|end|><|start|>assistant<|channel|>final<|message|>F{k}<|return|>"]
        # The prompt is exactly what the model sees at inference for that response.
        first = next(i for i, x in enumerate(s.labels) if x != IGNORE)
        prompt = enc.render_conversation_for_completion(Conversation.from_messages(msgs[:-2]), Role.ASSISTANT)
        assert s.input_ids[:first] == prompt


def test_expand_last_and_last_mode_give_the_last_response(enc):
    r3 = [H_sys(), H_user("q1"), H_fin("F1"), H_user("q2"), H_fin("F2"), H_user("q3"), H_an("A3"), H_fin("F3")]
    for kw in ({"train_on": "last"}, {"thinking_turns": "last"}, {"thinking_turns": "last", "train_on": "all"}):
        [s] = run(THINKING_MULTI, **kw)
        assert s.input_ids == expected(enc, r3)
        assert trained_spans(enc, s) == [
            "<|channel|>analysis<|message|>A3<|end|><|start|>assistant<|channel|>final<|message|>F3<|return|>"]


def test_drop_removes_all_analysis(enc):
    plain = [H_sys(), H_user("q1"), H_fin("F1"), H_user("q2"), H_fin("F2"), H_user("q3"), H_fin("F3")]
    [s] = run(THINKING_MULTI, thinking_turns="drop")
    assert s.input_ids == expected(enc, plain)
    assert trained_spans(enc, s) == ["<|channel|>final<|message|>F1", "<|channel|>final<|message|>F2",
                                     "<|channel|>final<|message|>F3<|return|>"]
    [s] = run(THINKING_MULTI, thinking_turns="drop", train_on="last")
    assert trained_spans(enc, s) == ["<|channel|>final<|message|>F3<|return|>"]


def test_thinking_only_in_last_response_is_one_sequence(enc):
    row = {"messages": [u("q1"), a("F1"), u("q2"), a("F2", thinking="A2")]}
    [s] = run(row)
    assert s.input_ids == expected(enc, [H_sys(), H_user("q1"), H_fin("F1"), H_user("q2"), H_an("A2"), H_fin("F2")])
    assert trained_spans(enc, s) == ["<|channel|>final<|message|>F1",
                                     "<|channel|>analysis<|message|>A2<|end|><|start|>assistant<|channel|>final<|message|>F2<|return|>"]


def test_expand_keeps_analysis_between_tool_calls_of_the_current_response(enc):
    row = {"messages": [
        u("q1"), a(thinking="look", tool_calls=[call("x", "get_time", "{}")]),
        {"role": "tool", "tool_call_id": "x", "content": "noon"}, a("F1", thinking="got it"),
        u("q2"), a("F2", thinking="A2"),
    ], "tools": TOOLS}
    s1, s2 = run(row)
    head = [H_sys(), H_dev(None, H_TOOLS), H_user("q1")]
    assert s1.input_ids == expected(enc, head + [H_an("look"), H_call("get_time", "{}"), H_res("get_time", "noon"),
                                                 H_an("got it"), H_fin("F1")])
    assert s2.input_ids == expected(enc, head + [H_call("get_time", "{}"), H_res("get_time", "noon"), H_fin("F1"),
                                                 H_user("q2"), H_an("A2"), H_fin("F2")])
    assert trained_spans(enc, s2) == [
        "<|channel|>analysis<|message|>A2<|end|><|start|>assistant<|channel|>final<|message|>F2<|return|>"]


def test_train_false_excludes_a_message(enc):
    row = {"messages": [u("a"), a("A", train=False), u("b"), a("B")]}
    [s] = run(row)
    assert trained_spans(enc, s) == ["<|channel|>final<|message|>B<|return|>"]
    # Inside a run: the excluded analysis is untrained, the following final answer keeps its header.
    row = {"messages": [u("a"), a(thinking="secret", train=False), a("A")]}
    [s] = run(row)
    assert s.input_ids == expected(enc, [H_sys(), H_user("a"), H_an("secret"), H_fin("A")])
    assert trained_spans(enc, s) == ["<|start|>assistant<|channel|>final<|message|>A<|return|>"]


def test_reasoning_content_alias_and_text_parts(enc):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "He"}, {"type": "text", "text": "llo"}]},
                        {"role": "assistant", "reasoning_content": "greet", "content": "Hi"}]}
    [s] = run(row)
    assert s.input_ids == expected(enc, [H_sys(), H_user("Hello"), H_an("greet"), H_fin("Hi")])


def test_conversation_ending_in_a_tool_call(enc):
    row = {"messages": [u("time?"), a(tool_calls=[call("t", "get_time", "{}")])], "tools": TOOLS}
    [s] = run(row)
    assert s.input_ids == expected(enc, [H_sys(), H_dev(None, H_TOOLS), H_user("time?"), H_call("get_time", "{}")])
    assert trained_spans(enc, s) == [" to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"]


def test_custom_field_names():
    from gptoss_cloud.contract.sections import DatasetSource

    src = DatasetSource(path="x.jsonl", field_messages="conv", field_thinking="cot", field_tools="fns",
                        field_reasoning_effort="effort")
    row = {"conv": [u("q"), {"role": "assistant", "content": "a", "cot": "t"}], "fns": json.dumps(TOOLS), "effort": "low"}
    [s] = tokenize_row(row, DataSection(), source=src)
    enc = load_encoding()
    assert s.input_ids == expected(enc, [H_sys("low"), H_dev(None, H_TOOLS), H_user("q"), H_an("t"), H_fin("a")])


def test_drop_with_an_analysis_only_last_response(enc):
    row = {"messages": [u("q1"), a("F1"), u("q2"), a(thinking="just thinking")]}
    [s] = run(row, thinking_turns="drop")
    assert s.input_ids == expected(enc, [H_sys(), H_user("q1"), H_fin("F1")])
    assert trained_spans(enc, s) == ["<|channel|>final<|message|>F1<|return|>"]
    assert run(row, thinking_turns="drop", train_on="last") == []
