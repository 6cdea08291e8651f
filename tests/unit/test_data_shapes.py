"""Rows in the shapes public datasets and exports use, checked by decoding what is trained."""

from __future__ import annotations

import json

import pytest

from gptoss_cloud.spec import DataSection, DatasetSource
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
