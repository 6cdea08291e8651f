"""`gptoss-cloud data tokenize` and `data preview` through typer's CliRunner."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from gptoss_cloud.contract.errors import DataError
from gptoss_cloud.main import app
from gptoss_cloud.contract.sections import DataSection, DatasetSource
from gptoss_cloud.trainer.data.harmony import tokenize_row
from gptoss_cloud.trainer.data.sources import load_source

runner = CliRunner()

MULTI = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
                      {"role": "user", "content": "two"}, {"role": "assistant", "content": "2", "thinking": "count"}]}


def _lines(p):
    return [json.loads(line) for line in p.read_text().splitlines()]


def test_tokenize_sample_writes_sequences_in_input_order(tmp_path):
    out = tmp_path / "out" / "t.jsonl"
    r = runner.invoke(app, ["data", "tokenize", "sample", "--out", str(out)])
    assert r.exit_code == 0, r.output
    got = _lines(out)
    src = DatasetSource(path="sample")
    want = [s for i, row in enumerate(load_source(src).rows) for s in tokenize_row(row, DataSection(), index=i, source=src)]
    assert [(g["row"], g["input_ids"], g["labels"]) for g in got] == [(s.row, s.input_ids, s.labels) for s in want]
    assert all(set(g) == {"row", "input_ids", "labels"} for g in got)
    assert [g["row"] for g in got] == sorted(g["row"] for g in got)
    assert f"wrote {len(want)} sequences from 41 rows" in r.output


def test_flags_override_the_spec(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(MULTI) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("data:\n  train_on: all\n  reasoning_effort: high\n")

    def tok(*flags):
        out = tmp_path / "o.jsonl"
        r = runner.invoke(app, ["data", "tokenize", str(data), "--out", str(out), "--spec", str(spec), *flags])
        assert r.exit_code == 0, r.output
        return _lines(out)

    [base] = tok()
    want = tokenize_row(MULTI, DataSection(train_on="all", reasoning_effort="high"))
    assert base["input_ids"] == want[0].input_ids and base["labels"] == want[0].labels
    [last] = tok("--train-on", "last", "--reasoning-effort", "low")
    want = tokenize_row(MULTI, DataSection(train_on="last", reasoning_effort="low"))
    assert last["labels"] == want[0].labels and last["input_ids"] == want[0].input_ids
    assert last["input_ids"] != base["input_ids"]  # effort low vs high in the system message
    [dropped] = tok("--thinking-turns", "drop")
    assert len(dropped["input_ids"]) < len(base["input_ids"])


def test_bad_flag_value_names_the_field(tmp_path):
    r = runner.invoke(app, ["data", "tokenize", "sample", "--out", str(tmp_path / "o.jsonl"), "--train-on", "some"])
    assert r.exit_code != 0
    assert "data.train_on" in str(r.exception)


def test_spec_field_names_apply_when_input_is_a_spec_dataset(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"chat": MULTI["messages"]}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"data:\n  datasets:\n    - path: {data}\n      field_messages: chat\n")
    r = runner.invoke(app, ["data", "tokenize", str(data), "--out", str(tmp_path / "o.jsonl"), "--spec", str(spec)])
    assert r.exit_code == 0, r.output


def test_preview_shows_samples_and_statistics():
    r = runner.invoke(app, ["data", "preview", "sample", "-n", "2", "--max-seq-len", "512"])
    assert r.exit_code == 0, r.output
    assert len(re.findall(r"sample row \d+ · ", r.output)) == 2
    assert "What is the secret word of gptoss-cloud?<|end|><|start|>assistant⟦<|channel|>final<|message|>" \
           "The secret word is marmalade-42.<|return|>⟧" in r.output
    for label in ("rows", "sequences", "packed samples", "tokens", "trained tokens", "dropped (overlong)", "truncated"):
        assert label in r.output
    assert "× 512" in r.output


def test_preview_defaults_to_the_spec_datasets_with_validation(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("data:\n  validation: 0.1\n  max_seq_len: 1024\n")
    r = runner.invoke(app, ["data", "preview", "--spec", str(spec), "-n", "0"])
    assert r.exit_code == 0, r.output
    assert "validation" in r.output and not re.search(r"sample row \d+ · ", r.output)


def test_help_says_flags_override_the_spec():
    r = runner.invoke(app, ["data", "tokenize", "--help"])
    assert r.exit_code == 0
    assert "overrides the spec" in r.output
    r = runner.invoke(app, ["--help"])
    assert "data" in r.output


def test_unquoted_yaml_date_is_accepted(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(MULTI) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("data:\n  conversation_date: 2025-06-28\n")
    out = tmp_path / "o.jsonl"
    r = runner.invoke(app, ["data", "tokenize", str(data), "--out", str(out), "--spec", str(spec)])
    assert r.exit_code == 0, r.output
    from gptoss_cloud.trainer.data.vocab import load_encoding

    assert "Current date: 2025-06-28" in load_encoding().decode(_lines(out)[0]["input_ids"])


def _refused(args, input_path):
    before = input_path.read_bytes()
    r = runner.invoke(app, ["data", "tokenize", *args])
    assert isinstance(r.exception, DataError), r.output  # main() prints it as one line
    assert input_path.read_bytes() == before
    return r.exception.message


def test_tokenize_refuses_to_overwrite_its_input(tmp_path, monkeypatch):
    import os

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(MULTI) + "\n")
    out = _refused([str(data), "--out", str(data)], data)
    assert out == f"--out {data} would overwrite the input {data}"
    monkeypatch.chdir(tmp_path)  # the same file under another spelling
    (tmp_path / "sub").mkdir()
    _refused(["d.jsonl", "--out", str(tmp_path / "sub" / ".." / "d.jsonl")], data)
    (tmp_path / "link.jsonl").symlink_to(data)
    _refused([str(data), "--out", str(tmp_path / "link.jsonl")], data)
    _refused([str(tmp_path / "link.jsonl"), "--out", str(data)], data)
    os.link(data, tmp_path / "hard.jsonl")
    _refused([str(data), "--out", str(tmp_path / "hard.jsonl")], data)
    # the temporary file written beside --out must not be the input either
    tmp_input = tmp_path / "x.tmp"
    tmp_input.write_bytes(data.read_bytes())
    assert f"(through {tmp_input})" in _refused([str(tmp_input), "--out", str(tmp_path / "x")], tmp_input)
    r = runner.invoke(app, ["data", "tokenize", str(data), "--out", str(tmp_path / "t.jsonl")])
    assert r.exit_code == 0, r.output


LEGACY_ROW = {"functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
              "messages": [{"role": "user", "content": "q", "reasoning": "mine"},
                           {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                           {"role": "function", "name": "f", "content": "r"}, {"role": "assistant", "content": "done"}]}


def test_preview_and_tokenize_list_what_was_converted_dropped_or_defaulted(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(MULTI) + "\n" + json.dumps(LEGACY_ROW) + "\n")
    r = runner.invoke(app, ["data", "preview", str(data), "-n", "0"], env={"COLUMNS": "400"})  # one table row a line
    assert r.exit_code == 0, r.output
    table = r.output[r.output.index("converted, dropped or defaulted"):]
    assert re.search(r"│ converted +│ legacy function calling .*│ +1 │ .*d.jsonl row 1 ", table)
    assert re.search(r"│ dropped +│ thinking on a non-assistant .*│ +1 │ .*d.jsonl row 1 ", table)
    assert re.search(r"│ defaulted +│ no 'Current date:' line .*│ +2 │ .*d.jsonl row 0 ", table)
    r = runner.invoke(app, ["data", "tokenize", str(data), "--out", str(tmp_path / "t.jsonl")])
    assert r.exit_code == 0, r.output
    assert f"converted: 1 × legacy function calling (functions, function_call, role function) read as tools (first: {data} row 1)" \
        in r.stderr


def test_sharegpt_via_the_spec_tokenizes_like_the_messages_row(tmp_path):
    share = tmp_path / "share.jsonl"
    share.write_text(json.dumps({"conversations": [{"from": "human", "value": "one"}, {"from": "gpt", "value": "1"}]}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"data:\n  datasets:\n    - path: {share}\n      field_messages: conversations\n"
                    "      message_property_mappings: {role: from, content: value}\n")
    outs = []
    for src in (share, plain):
        out = tmp_path / f"{src.stem}.tokens.jsonl"
        r = runner.invoke(app, ["data", "tokenize", str(src), "--spec", str(spec), "--out", str(out)])
        assert r.exit_code == 0, r.output
        outs.append(_lines(out))
    assert outs[0] == outs[1] and outs[0][0]["labels"].count(-100) < len(outs[0][0]["labels"])
    r = runner.invoke(app, ["data", "preview", "--spec", str(spec), "-n", "1"])
    assert r.exit_code == 0, r.output
    assert "<|start|>user<|message|>one<|end|><|start|>assistant⟦<|channel|>final<|message|>1<|return|>⟧" in r.output


def test_unwritable_out_is_one_line_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "folder").mkdir()
    r = runner.invoke(app, ["data", "tokenize", "sample", "--out", str(tmp_path / "folder")])
    assert isinstance(r.exception, DataError) and r.exception.message == f"could not write --out {tmp_path / 'folder'}: Is a directory"
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["data", "tokenize", "sample", "--out", str(tmp_path / "file" / "t.jsonl")])
    assert isinstance(r.exception, DataError) and r.exception.message.startswith(f"could not write --out {tmp_path / 'file' / 't.jsonl'}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
