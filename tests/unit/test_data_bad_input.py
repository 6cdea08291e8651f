"""Malformed rows: one error naming source, row and problem; on_error skip counts them and has a ceiling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptoss_cloud.contract.errors import DataError
from gptoss_cloud.contract.sections import DataSection, DatasetSource
from gptoss_cloud.trainer.data.harmony import tokenize_row
from gptoss_cloud.trainer.data.pipeline import build_datasets
from gptoss_cloud.trainer.data.rows import RowError

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

BAD = [
    ({"conversation": [U, A]}, "missing 'messages'"),
    ({"messages": []}, "must be a non-empty list"),
    ([U, A], "must be a JSON object"),
    ({"messages": [U, {"role": "robot", "content": "x"}]}, "message 1: unknown role 'robot'"),
    ({"messages": [U, {"role": "assistant", "content": "  "}]}, "message 1 (assistant): empty assistant turn"),
    ({"messages": [U]}, "no assistant message"),
    ({"messages": [{"role": "user"}, A]}, "message 0 (user): missing content"),
    ({"messages": [U, A, {"role": "tool", "tool_call_id": "zz", "content": "r"}]}, "message 2 (tool): result without a matching call"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "zz", "content": "r"}, A]},
     "tool call 'f' (id c1) has no result"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c1", "content": "r"},
                   {"role": "tool", "tool_call_id": "c9", "content": "r"}, A]}, "message 3 (tool): result without a matching call"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city: Paris}"}}]}]},
     "message 1 (assistant) tool call 0 (f): arguments are not valid JSON"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}, "tool call 0: missing function name"),
    ({"messages": [U, A], "reasoning_effort": "extreme"}, "'reasoning_effort' must be one of low, medium, high"),
    ({"messages": [U, {**A, "train": "no"}]}, "'train' must be true or false"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, A]}, "content part of type 'image_url'"),
    ({"messages": [U, A], "tools": [{"type": "function", "function": {"description": "no name"}}]}, "tool 0: missing function name"),
    ({"messages": [U, A], "tools": "{not json"}, "'tools' is a string but not valid JSON"),
    # found by mutating the sample rows: each was a bare TypeError, AttributeError or the renderer's ValueError
    ({"messages": [U, {"role": "assistant", "tool_calls": [{**CALL, "id": ["c1"]}]}]}, "tool call 0 (f): 'id' must be a string, not list"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": 1, "content": "r"}, A]},
     "message 2 (tool): 'tool_call_id' must be a string, not int"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "name": 1, "content": "r"}, A]},
     "message 2 (tool): 'name' must be a string, not int"),
    ({"messages": [U, A], "tools": [{"name": "f", "description": True}]}, "tool 0 (f): 'description' must be a string, not bool"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": float("nan")}}}]}]},
     "tool call 0 (f): arguments hold a number that is not finite"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": Infinity}'}}]}]},
     "tool call 0 (f): arguments are not valid JSON (Infinity is not JSON)"),
    ({"messages": [U, A], "tools": [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"default": float("inf")}}}}]},
     "tool 0 (f): parameters hold a number that is not finite"),
    ({"messages": [U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c1", "content": {"t": float("nan")}}, A]},
     "message 2 (tool): the result's values hold a number that is not finite"),
]


@pytest.mark.parametrize("row,problem", BAD, ids=[p for _, p in BAD])
def test_malformed_row_is_named(row, problem):
    with pytest.raises(RowError) as e:
        tokenize_row(row, DataSection(), index=7, source=DatasetSource(path="data/chats.jsonl"))
    assert str(e.value.message).startswith("data/chats.jsonl row 7: ")
    assert problem in e.value.message
    assert e.value.row == 7 and e.value.source == "data/chats.jsonl"


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


GOOD = {"messages": [U, A]}


def test_invalid_json_line_fails_with_line_number(tmp_path):
    p = _write(tmp_path, [GOOD, "{oops", GOOD])
    with pytest.raises(RowError, match=r"d.jsonl row 1: line 2 is not valid JSON"):
        build_datasets(DataSection(datasets=[DatasetSource(path=str(p))], max_seq_len=128), use_cache=False)


def test_skip_counts_and_reports(tmp_path):
    rows = [GOOD] * 18 + ["{oops", {"messages": [U, {"role": "robot", "content": "x"}]}]
    p = _write(tmp_path, rows)
    data = DataSection(datasets=[DatasetSource(path=str(p))], max_seq_len=128, on_error="skip", max_skip_fraction=0.1)
    ds = build_datasets(data, use_cache=False)
    assert ds.stats.skipped_rows == 2 and ds.stats.rows == 18 and ds.stats.sequences == 18


def test_skip_fails_above_the_ceiling(tmp_path):
    rows = [GOOD] * 8 + ["{oops", {"messages": []}]
    p = _write(tmp_path, rows)
    data = DataSection(datasets=[DatasetSource(path=str(p))], max_seq_len=128, on_error="skip", max_skip_fraction=0.1)
    with pytest.raises(DataError, match=r"2 of 10 rows are malformed \(20.0% > data.max_skip_fraction 10.0%\); first: .*d.jsonl row 8"):
        build_datasets(data, use_cache=False)


def test_source_level_errors(tmp_path):
    with pytest.raises(DataError, match="dataset not found: .*nope.jsonl"):
        build_datasets(DataSection(datasets=[DatasetSource(path=str(tmp_path / "nope.jsonl"))]), use_cache=False)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="cannot tell the format of .*x.txt"):
        build_datasets(DataSection(datasets=[DatasetSource(path=str(tmp_path / "x.txt"))]), use_cache=False)
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="must hold a JSON list of rows"):
        build_datasets(DataSection(datasets=[DatasetSource(path=str(tmp_path / "x.json"))]), use_cache=False)
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        build_datasets(DataSection(datasets=[DatasetSource(path=str(tmp_path / "x.parquet"))]), use_cache=False)


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    p = _write(tmp_path, [GOOD, {"messages": [U, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "nope"}}]}]}])
    r = subprocess.run([sys.executable, "-m", "gptoss_cloud", "data", "tokenize", str(p), "--out", str(tmp_path / "o.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"error: {p} row 1: message 1 (assistant) tool call 0 (f): arguments are not valid JSON" in r.stderr
    assert "hint: fix the row, or set data.on_error: skip" in r.stderr


HUGE = "x" * 100_000


@pytest.mark.parametrize("row", [
    {"messages": [U, {"role": HUGE, "content": "x"}]},
    {"messages": [U, {**A, "weight": HUGE}]},
    {"messages": [U, A], "reasoning_effort": HUGE},
    {"messages": [{"role": "user", "content": [{"type": HUGE}]}, A]},
    {"messages": [U, {"role": "assistant", "tool_calls": [{"function": {"name": HUGE, "arguments": "{" + HUGE}}]}]},
    {"messages": [U, {"role": "assistant", "tool_calls": [{"id": HUGE, "function": {"name": HUGE}}]}, A]},
    {"messages": [U, A, {"role": "tool", "tool_call_id": HUGE, "name": HUGE, "content": "r"}]},
    {"messages": [U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": HUGE, "name": HUGE, "content": "r"}]},
    {"messages": [U, A], "tools": [{"name": HUGE, "parameters": "[" + HUGE}]},
    {"messages": [U, {"role": "assistant", "content": HUGE + "<|end|>"}], "tools": [{"name": HUGE, "description": "<|end|>"}]},
], ids=["role", "weight", "effort", "part", "arguments", "call-id", "orphan-result", "unmatched-result", "parameters", "control"])
def test_errors_quote_only_a_short_prefix_of_the_input(row):
    with pytest.raises(RowError) as e:
        tokenize_row(row, DataSection(), index=7, source=DatasetSource(path="data/chats.jsonl"))
    assert len(e.value.message) < 400, e.value.message[:500]
