"""The harmony checks on generated replies, on completions rendered by openai-harmony itself, and the
held-out rendering that gives each trained token its span kind."""

from __future__ import annotations

import pytest

from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.trainer.evaluation.checks import check_completion, rates

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def enc():
    from gptoss_cloud.trainer.chat import encoding

    return encoding()


def completion(enc, *messages, end: str = "<|return|>") -> list[int]:
    """What a model generates after `<|start|>assistant`: the messages as harmony renders them, the
    last one closed with ``end`` instead of the history's <|end|>."""
    start = enc.encode("<|start|>assistant", allowed_special="all")
    toks: list[int] = []
    for m in messages:
        toks += enc.render(m)
    assert toks[:len(start)] == start
    (end_tok,) = enc.encode(end, allowed_special="all")
    return toks[len(start):-1] + [end_tok]


def msg(channel: str, text: str, recipient: str | None = None):
    from openai_harmony import Message, Role

    m = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        m = m.with_recipient(recipient).with_content_type("<|constrain|>json")
    return m


def test_a_final_answer_with_analysis_passes(enc):
    c = check_completion(enc, completion(enc, msg("analysis", "Think."), msg("final", "Blue.")), {}, "medium")
    assert (c.ends_with_return, c.tool_args_valid, c.no_leak, c.analysis_present, c.valid) == (True, None, True, True, True)
    assert c.problems == []


def test_a_final_closed_like_history_or_cut_off_fails(enc):
    c = check_completion(enc, completion(enc, msg("final", "Blue."), end="<|end|>"), {}, "low")
    assert c.ends_with_return is False and not c.valid and c.analysis_present is None
    cut = completion(enc, msg("final", "Blue sky today"))[:-2]  # the token limit stopped it mid-answer
    c = check_completion(enc, cut, {}, "low")
    assert c.ends_with_return is False and not c.valid


def test_missing_analysis_fails_only_where_the_effort_asks_for_it(enc):
    toks = completion(enc, msg("final", "Blue."))
    assert check_completion(enc, toks, {}, "high").analysis_present is False
    assert check_completion(enc, toks, {}, "low").valid


@pytest.mark.parametrize("args, ok, problem", [
    ('{"city": "Oslo"}', True, None),
    ('{"city": 3}', False, "get_weather: arguments do not match its schema: city: 3 is not of type 'string'"),
    ('{"city": "Oslo"', False, "get_weather: arguments are not JSON (Expecting ',' delimiter at char 15)"),
    ('{"town": "Oslo"}', False, "get_weather: arguments do not match its schema: <root>: 'city' is a required property"),
])
def test_tool_call_arguments_parse_and_match_the_schema(enc, args, ok, problem):
    toks = completion(enc, msg("analysis", "Call it."), msg("commentary", args, recipient="functions.get_weather"), end="<|call|>")
    c = check_completion(enc, toks, {"get_weather": WEATHER}, "medium")
    assert c.ends_with_return is True and c.tool_args_valid is ok
    assert c.problems == ([] if problem is None else [problem])


def test_a_call_to_an_unknown_tool_fails(enc):
    toks = completion(enc, msg("commentary", "{}", recipient="functions.launch"), end="<|call|>")
    c = check_completion(enc, toks, {"get_weather": WEATHER}, "low")
    assert c.tool_args_valid is False and "call to unknown tool 'launch'" in c.problems


def test_control_token_text_inside_a_message_is_a_leak(enc):
    toks = completion(enc, msg("final", "Blue.<|end|><|start|>assistant"))
    c = check_completion(enc, toks, {}, "low")
    assert c.no_leak is False and "control-token text in a message: <|end|>, <|start|>" in c.problems


def test_unparseable_output_fails_every_format_check(enc):
    c = check_completion(enc, enc.encode("just text", allowed_special="all"), {}, "low")
    assert not c.valid and c.problems[0].startswith("not parseable as harmony")


def test_rates_count_only_the_replies_a_check_applies_to(enc):
    good = check_completion(enc, completion(enc, msg("final", "A")), {}, "low")
    bad = check_completion(enc, completion(enc, msg("final", "A"), end="<|end|>"), {}, "low")
    r = rates([good, bad])
    assert r["format_valid_rate"] == 0.5 and r["ends_with_return_rate"] == 0.5
    assert r["tool_args_valid_rate"] is None and r["analysis_present_rate"] is None


def test_held_out_rows_know_each_trained_tokens_kind(tmp_path, enc):
    import json

    from openai_harmony import Conversation, Message, Role

    from gptoss_cloud.trainer.evaluation.evaluate import held_out

    row = {"reasoning_effort": "high", "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}],
           "messages": [{"role": "user", "content": "Weather in Oslo?"},
                        {"role": "assistant", "thinking": "Need the tool.", "tool_calls": [
                            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                        {"role": "tool", "content": "rain", "name": "get_weather"},
                        {"role": "assistant", "content": "Rain."}]}
    f = tmp_path / "held.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}) + "\n")
    seqs = held_out(str(f), RunSpec())
    assert [(s.row, s.effort) for s in seqs] == [(0, "high"), (1, "medium")]
    first = seqs[0]
    kinds = {k for k, lab in zip(first.kinds, first.labels) if lab != -100}
    assert kinds == {"analysis", "call", "final"}
    assert first.tools == {"get_weather": WEATHER}
    # the prompt of the last trained run is what the model is given at inference: ends `<|start|>assistant`
    assert enc.decode(first.prompt).endswith("rain<|end|><|start|>assistant")
    conv = Conversation.from_messages([Message.from_role_and_content(Role.USER, "Hi")])
    assert enc.decode(seqs[1].prompt).endswith(enc.decode(enc.render_conversation_for_completion(conv, Role.ASSISTANT)[-8:]))


def test_a_malformed_held_out_row_names_the_file_and_row(tmp_path):
    from gptoss_cloud.trainer.data.rows import RowError
    from gptoss_cloud.trainer.evaluation.evaluate import held_out

    f = tmp_path / "held.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n{"messages": 3}\n')
    with pytest.raises(RowError) as e:
        held_out(str(f), RunSpec())
    assert str(f) in str(e.value) and "row 1" in str(e.value)
