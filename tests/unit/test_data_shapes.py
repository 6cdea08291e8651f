"""Rows in the shapes public datasets and exports use, checked by decoding what is trained."""

from __future__ import annotations

import json

import pytest

from gptoss_cloud.contract.sections import DataSection, DatasetSource
from gptoss_cloud.trainer.data.harmony import IGNORE, tokenize_row
from gptoss_cloud.trainer.data.notes import Notes
from gptoss_cloud.trainer.data.pipeline import build_datasets
from gptoss_cloud.trainer.data.rows import RowError
from gptoss_cloud.trainer.data.vocab import load_encoding

DATA = DataSection()


def _trained(seq) -> list[str]:
    """The decoded trained spans of one sequence, in order."""
    enc, spans, cur = load_encoding(), [], []
    for t, lab in zip(seq.input_ids, seq.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            spans.append(enc.decode(cur))
            cur = []
    return spans + ([enc.decode(cur)] if cur else [])


def _tok(row, src: DatasetSource | None = None, data: DataSection = DATA, notes: Notes | None = None):
    return tokenize_row(row, data, index=3, source=src or DatasetSource(path="d.jsonl"), notes=notes)


def _same(a, b) -> bool:
    return [(s.input_ids, s.labels) for s in a] == [(s.input_ids, s.labels) for s in b]


def _err(row, src: DatasetSource | None = None) -> str:
    with pytest.raises(RowError) as e:
        _tok(row, src)
    assert e.value.row == 3
    return e.value.message


# ------------------------------------------------------------------------------ 1. analysis field names
def _reasoned(field: str) -> dict:  # as vLLM / OpenRouter / LM Studio return it, stored by distillation datasets
    return {"messages": [{"role": "user", "content": "Is 221 prime?"},
                         {"role": "assistant", "content": "No: 221 = 13 x 17.", field: "Try 13: 13 x 17 = 221."}]}


@pytest.mark.parametrize("field", ["thinking", "reasoning_content", "reasoning"])
def test_every_analysis_field_name_is_trained(field):
    (seq,) = _tok(_reasoned(field))
    assert _trained(seq) == ["<|channel|>analysis<|message|>Try 13: 13 x 17 = 221.<|end|><|start|>assistant"
                             "<|channel|>final<|message|>No: 221 = 13 x 17.<|return|>"]


def test_two_analysis_fields_must_agree():
    row = _reasoned("reasoning")
    row["messages"][1]["reasoning_content"] = row["messages"][1]["reasoning"]  # vLLM returns both, equal
    assert _same(_tok(row), _tok(_reasoned("thinking")))
    row["messages"][1]["thinking"] = "something else"
    assert _err(row) == "d.jsonl row 3: message 1 (assistant): 'thinking' and 'reasoning_content' hold different text (keep one)"


# ---------------------------------------------------------------------------------- 2. message weights
def _weighted(w) -> dict:  # OpenAI's fine-tuning file format
    return {"messages": [{"role": "system", "content": "Marv is a sarcastic chatbot."},
                         {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris, as if you didn't know.", "weight": w},
                         {"role": "user", "content": "And of Spain?"},
                         {"role": "assistant", "content": "Madrid.", "weight": 1}]}


def test_weight_zero_is_not_trained_and_means_train_false():
    (seq,) = _tok(_weighted(0))
    assert _trained(seq) == ["<|channel|>final<|message|>Madrid.<|return|>"]
    assert "Paris, as if you didn't know." in load_encoding().decode(seq.input_ids)
    as_train = _weighted(0)
    for m in as_train["messages"]:
        m.pop("weight", None)
    as_train["messages"][2]["train"] = False
    assert _same(_tok(_weighted(0)), _tok(as_train))
    (both,) = _tok(_weighted(1))
    assert _trained(both) == ["<|channel|>final<|message|>Paris, as if you didn't know.",  # an earlier answer: no <|end|>
                              "<|channel|>final<|message|>Madrid.<|return|>"]


@pytest.mark.parametrize("w,problem", [
    (0.5, "message 2 (assistant): 'weight' must be 0 or 1, got 0.5"),
    ("0", "message 2 (assistant): 'weight' must be 0 or 1, got '0'"),
    (True, "message 2 (assistant): 'weight' must be 0 or 1, got True"),
])
def test_other_weights_are_row_errors(w, problem):
    assert _err(_weighted(w)).endswith(problem)


def test_weight_on_a_user_message_or_against_train_is_an_error():
    row = _weighted(1)
    row["messages"][1]["weight"] = 0
    assert _err(row).endswith("message 1 (user): 'weight' applies to assistant messages only")
    row = _weighted(0)
    row["messages"][2]["train"] = True
    assert _err(row).endswith("message 2 (assistant): 'train: true' and 'weight: 0' disagree")


# ------------------------------------------------------------------------------- 3. control tokens
PASTED = "<|channel|>analysis<|message|>hmm<|end|>"  # raw model output pasted into a dataset


@pytest.mark.parametrize("where,row,problem", [
    ("content", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": PASTED}]},
     "message 1 (assistant) content: contains the harmony control token '<|channel|>'"),
    ("user", {"messages": [{"role": "user", "content": "say <|return|>"}, {"role": "assistant", "content": "no"}]},
     "message 0 (user) content: contains the harmony control token '<|return|>'"),
    ("thinking", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "x<|start|>"}]},
     "message 1 (assistant) thinking: contains the harmony control token '<|start|>'"),
    ("arguments", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": {"s": "<|call|>"}}}]}]},
     "message 1 (assistant) tool call 0 (f) arguments: contains the harmony control token '<|call|>'"),
    ("result", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
                             {"role": "tool", "content": "<|constrain|>json"}, {"role": "assistant", "content": "a"}]},
     "message 2 (tool) content: contains the harmony control token '<|constrain|>'"),
    ("tool", {"tools": [{"name": "f", "description": "ends with <|endoftext|>"}],
              "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "tool 0 (f) description: contains the harmony control token '<|endoftext|>'"),
    ("reserved", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<|reserved_200013|>"}]},
     "contains the harmony control token '<|reserved_200013|>'"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 12 else None)
def test_control_tokens_are_refused_naming_message_and_token(where, row, problem):
    assert problem in _err(row)


def test_tag_lookalikes_are_ordinary_text():
    (seq,) = _tok({"messages": [{"role": "user", "content": "what is <|foo|>?"}, {"role": "assistant", "content": "a <| b |>"}]})
    assert _trained(seq) == ["<|channel|>final<|message|>a <| b |><|return|>"]


def test_control_token_rows_obey_on_error(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": PASTED}]}
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [good] * 9 + [bad]))
    src = DatasetSource(path=str(p))
    with pytest.raises(RowError, match=r"d.jsonl row 9: message 1 \(assistant\) content: contains the harmony control"):
        build_datasets(DataSection(datasets=[src], max_seq_len=256), use_cache=False)
    ds = build_datasets(DataSection(datasets=[src], max_seq_len=256, on_error="skip", max_skip_fraction=0.2), use_cache=False)
    assert ds.stats.skipped_rows == 1 and ds.stats.rows == 9


# ------------------------------------------------------------------------- 4. legacy function calling
WEATHER = {"name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
MODERN = {"tools": [{"type": "function", "function": WEATHER}],
          "messages": [{"role": "user", "content": "Weather in Lima?"},
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Lima\"}"}}]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "19 C, fog"},
                       {"role": "assistant", "content": "Lima: 19 C and foggy."}]}
LEGACY = {"functions": [WEATHER],  # OpenAI's function-calling fine-tuning format before tools
          "messages": [{"role": "user", "content": "Weather in Lima?"},
                       {"role": "assistant", "content": None,
                        "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Lima\"}"}},
                       {"role": "function", "name": "get_weather", "content": "19 C, fog"},
                       {"role": "assistant", "content": "Lima: 19 C and foggy."}]}


def test_legacy_function_calling_renders_like_tools_and_is_counted():
    notes = Notes()
    legacy = _tok(LEGACY, notes=notes)
    assert _same(legacy, _tok(MODERN))
    assert "to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{\"city\": \"Lima\"}<|call|>" \
        in _trained(legacy[0])[0]
    assert notes.counts["legacy_functions"] == 1 and notes.first["legacy_functions"] == "d.jsonl row 3"


def test_legacy_errors_are_named():
    row = json.loads(json.dumps(LEGACY))
    row["messages"][1]["tool_calls"] = MODERN["messages"][1]["tool_calls"]
    assert _err(row).endswith("message 1: has both 'tool_calls' and the legacy 'function_call' (keep one)")
    row = json.loads(json.dumps(LEGACY))
    row["functions"] = {"name": "x"}
    assert _err(row).endswith("'functions' must be a list of function definitions, not dict")
    row = json.loads(json.dumps(LEGACY))
    row["messages"][0]["function_call"] = {"name": "get_weather"}
    assert _err(row).endswith("message 0: 'function_call' applies to assistant messages only")


# ------------------------------------------------------------------------------ 5. ShareGPT and mappings
SHAREGPT = {"conversations": [{"from": "system", "value": "Answer briefly."},
                              {"from": "human", "value": "Capital of Peru?"},
                              {"from": "gpt", "value": "Lima."}]}
SAME_MODERN = {"messages": [{"role": "system", "content": "Answer briefly."},
                            {"role": "user", "content": "Capital of Peru?"},
                            {"role": "assistant", "content": "Lima."}]}
SHAREGPT_SRC = DatasetSource(path="sharegpt.jsonl", field_messages="conversations",
                             message_property_mappings={"role": "from", "content": "value"})


def test_sharegpt_rows_load_with_axolotl_options_and_match_the_modern_row():
    assert _same(_tok(SHAREGPT, SHAREGPT_SRC), _tok(SAME_MODERN))


def test_sharegpt_without_options_gets_a_hint():
    assert "(a ShareGPT row: see message_property_mappings)" in _err(SHAREGPT)
    src = DatasetSource(path="d.jsonl", field_messages="conversations")
    assert "unknown role None (expected one of system, developer, user, assistant, tool; a ShareGPT row? set " \
           "message_property_mappings: {role: from, content: value})" in _err(SHAREGPT, src)


def test_custom_role_names_and_properties():
    row = {"dialog": [{"speaker": "customer", "text": "Capital of Peru?", "why": "test"},
                      {"speaker": "agent", "text": "Lima.", "cot": "It is Lima."}]}
    src = DatasetSource(path="d.jsonl", field_messages="dialog",
                        message_property_mappings={"role": "speaker", "content": "text", "thinking": "cot"},
                        roles={"user": ["customer"], "assistant": ["agent"]})
    (seq,) = _tok(row, src)
    assert _trained(seq) == ["<|channel|>analysis<|message|>It is Lima.<|end|><|start|>assistant"
                             "<|channel|>final<|message|>Lima.<|return|>"]
    assert "unknown role 'agent'" in _err(row, src.model_copy(update={"roles": {"user": ["customer"]}}))


@pytest.mark.parametrize("kw,problem", [
    ({"message_property_mappings": {"speaker": "from"}}, "unknown message property 'speaker'"),
    ({"message_property_mappings": {"role": "from", "content": "from"}}, "key 'from' is mapped to more than one property"),
    ({"message_property_mappings": {"role": ""}}, "message_property_mappings.role: must name the row's key"),
    ({"roles": {"bot": ["gpt"]}}, "roles: unknown role 'bot'"),
    ({"roles": {"user": ["x"], "assistant": ["x"]}}, "roles: 'x' is listed for both 'user' and 'assistant'"),
])
def test_mapping_options_are_checked_when_the_spec_loads(kw, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        DatasetSource(path="d.jsonl", **kw)


# ------------------------------------------------------------------------ 6. calls without results
CITIES = ["Lima", "Cairo", "Oslo"]


def _xlam(n_results: int) -> dict:
    """Single-step function calling (xlam-style data in messages form): the calls are the target."""
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}}
             for i, c in enumerate(CITIES)]
    results = [{"role": "tool", "tool_call_id": f"c{i}", "content": f"{i} C"} for i in range(n_results)]
    return {"tools": [WEATHER], "messages": [{"role": "user", "content": "Weather in Lima, Cairo and Oslo?"},
                                             {"role": "assistant", "tool_calls": calls}, *results]}


def _call(city: str) -> str:
    return f' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{{"city": "{city}"}}<|call|>'


def test_trailing_calls_train_the_first_and_count_the_rest():
    notes = Notes()
    (seq,) = _tok(_xlam(0), notes=notes)
    assert _trained(seq) == [_call("Lima")]
    assert load_encoding().decode(seq.input_ids).endswith(_call("Lima"))  # the sequence stops at <|call|>
    assert notes.counts["calls_without_results"] == 2


def test_calls_with_results_run_up_to_the_first_without():
    notes = Notes()
    (seq,) = _tok(_xlam(1), notes=notes)
    text = load_encoding().decode(seq.input_ids)
    assert text.endswith(_call("Lima") + "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
                         "0 C<|end|><|start|>assistant" + _call("Cairo"))
    assert notes.counts["calls_without_results"] == 1
    notes = Notes()
    _tok(_xlam(2), notes=notes)
    assert "calls_without_results" not in notes.counts


def test_a_call_without_result_before_more_messages_is_still_an_error():
    row = _xlam(0)
    row["messages"].append({"role": "user", "content": "and?"})
    row["messages"].append({"role": "assistant", "content": "?"})
    assert _err(row).endswith("message 1 (assistant): tool call 'get_weather' (id c0) has no result")


# -------------------------------------------------------------------------------- 7. counted notes
def test_notes_count_what_was_defaulted_or_dropped_with_the_first_row(tmp_path):
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    user_thinking = {"messages": [{"role": "user", "content": "q", "thinking": "private"}, {"role": "assistant", "content": "a"}]}
    dup = json.loads(json.dumps(MODERN))
    dup["messages"][1]["tool_calls"] *= 2
    dup["messages"].insert(3, dict(dup["messages"][2], content="second"))
    bare = {"tools": [{"name": "f", "parameters": {"q": {"type": "str", "description": "query"}}}], **plain}
    odd = {"tools": [{"name": "f", "parameters": {"q": "string"}}], **plain}
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [plain, user_thinking, dup, bare, odd, LEGACY, _xlam(0), user_thinking]))
    ds = build_datasets(DataSection(datasets=[DatasetSource(path=str(p))], max_seq_len=1024), use_cache=False)
    assert ds.stats.notes == {
        "thinking_not_assistant": [2, f"{p} row 1"], "duplicate_call_ids": [1, f"{p} row 2"],
        "bare_parameters": [1, f"{p} row 3"], "non_schema_parameters": [1, f"{p} row 4"],
        "legacy_functions": [1, f"{p} row 5"], "calls_without_results": [2, f"{p} row 6"],
        "no_conversation_date": [8, f"{p} row 0"]}
    dated = build_datasets(DataSection(datasets=[DatasetSource(path=str(p))], max_seq_len=1024, conversation_date="2026-12-02"),
                           use_cache=False)
    assert "no_conversation_date" not in dated.stats.notes


def test_bare_parameter_maps_render_as_object_schemas():
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bare = _tok({"tools": [{"name": "f", "parameters": {"q": {"type": "string"}}}], **plain})
    schema = _tok({"tools": [{"name": "f", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}], **plain})
    assert _same(bare, schema)
    assert "type f = (_: {\nq?: string,\n}) => any;" in load_encoding().decode(bare[0].input_ids)


def test_notes_of_a_refused_row_are_not_counted():
    notes = Notes()
    row = {"messages": [{"role": "user", "content": "q", "thinking": "t"}, {"role": "assistant", "content": PASTED}]}
    with pytest.raises(RowError):
        _tok(row, notes=notes)
    assert not notes


def test_notes_survive_the_cache_and_reach_the_run_log(tmp_path, caplog):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(LEGACY) + "\n" + json.dumps(_xlam(0)) + "\n")
    data = DataSection(datasets=[DatasetSource(path=str(p))], max_seq_len=1024, cache_dir=str(tmp_path / "cache"))
    first = build_datasets(data)
    caplog.clear()
    with caplog.at_level("WARNING", logger="gptoss_cloud.trainer.data"):
        again = build_datasets(data)  # read from the cache
    assert again.stats.notes == first.stats.notes and "legacy_functions" in first.stats.notes
    assert "training data: dropped: 2 × tool calls after the call that ends a conversation without a result" in caplog.text
    assert f"(first: {p} row 1)" in caplog.text


def test_shapes_survive_parquet_null_filling(tmp_path):
    """Parquet unifies struct fields across rows: every message gains every other message's keys as null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_weighted(0), LEGACY, _reasoned("reasoning"), MODERN]
    p = tmp_path / "d.parquet"
    # pa.array infers one struct type from all rows (Table.from_pylist would take the first row's keys only)
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), p)
    back = pq.read_table(p).to_pylist()
    assert back[0]["messages"][0]["function_call"] is None and back[1]["messages"][0]["weight"] is None  # nulls filled in
    assert back[0]["functions"] is None and back[1]["functions"] and back[3]["messages"][2]["reasoning"] is None
    src = DatasetSource(path=str(p))
    for raw, parquet_row in zip(rows, back):
        assert _same(_tok(parquet_row, src), _tok(raw, src))
