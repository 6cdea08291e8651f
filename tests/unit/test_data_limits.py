"""Dataset bytes are untrusted: deep nesting, bad encodings and huge lines are row errors, never tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptoss_cloud.contract.errors import DataError
from gptoss_cloud.contract.sections import DataSection, DatasetSource
from gptoss_cloud.trainer.data import limits
from gptoss_cloud.trainer.data.pipeline import build_datasets
from gptoss_cloud.trainer.data.rows import RowError
from gptoss_cloud.trainer.data.sources import parse_bytes

GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode()
DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past Python's recursion limit
MEDIUM = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "x": ' \
    + b"[" * 200 + b"]" * 200 + b"}]}"  # decodes, but deeper than any real row
NOT_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "a"}]}'


def _data(path, **kw) -> DataSection:
    return DataSection(datasets=[DatasetSource(path=str(path))], max_seq_len=256, **kw)


@pytest.mark.parametrize("bad,problem", [
    (DEEP, "line 2 is nested deeper than 64 levels"),
    (MEDIUM, "line 2 is nested deeper than 64 levels"),
    (NOT_UTF8, "line 2 is not UTF-8 (byte 47 of the line: b'\\xe9')"),
], ids=["deep", "medium", "not-utf8"])
def test_bad_line_fails_naming_file_and_line(tmp_path, bad, problem):
    p = tmp_path / "d.jsonl"
    p.write_bytes(GOOD + b"\n" + bad + b"\n" + GOOD + b"\n")
    with pytest.raises(RowError) as e:
        build_datasets(_data(p), use_cache=False)
    assert e.value.message == f"{p} row 1: {problem}"


@pytest.mark.parametrize("bad", [DEEP, MEDIUM, NOT_UTF8], ids=["deep", "medium", "not-utf8"])
def test_bad_line_is_skipped(tmp_path, bad):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join([GOOD] * 9 + [bad]) + b"\n")
    ds = build_datasets(_data(p, on_error="skip", max_skip_fraction=0.2), use_cache=False)
    assert ds.stats.skipped_rows == 1 and ds.stats.rows == 9


def test_overlong_line_is_a_row_error(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_ROW_BYTES", 100)
    rows = parse_bytes(GOOD + b"\n" + b'{"x": "' + b"a" * 200 + b'"}\n', "jsonl", "d.jsonl")
    assert rows[0] == json.loads(GOOD)
    assert isinstance(rows[1], RowError) and rows[1].message == "d.jsonl row 1: line 2 is 209 bytes, over the row limit of 100"


def test_line_separators_inside_strings_do_not_split_rows():
    # JSON allows U+2028, U+2029 and U+0085 raw inside strings; only "\n" ends a JSONL line.
    row = {"messages": [{"role": "user", "content": "a\u2028b\u2029c\x85d\x1ce"}, {"role": "assistant", "content": "ok"}]}
    data = json.dumps(row, ensure_ascii=False).encode() + b"\r\n" + GOOD
    assert parse_bytes(data, "jsonl", "d.jsonl") == [row, json.loads(GOOD)]


def test_bom_is_dropped():
    assert parse_bytes(b"\xef\xbb\xbf" + GOOD, "jsonl", "d.jsonl") == [json.loads(GOOD)]


def test_json_file_rows_are_checked_and_whole_file_errors_name_the_line(tmp_path):
    rows = parse_bytes(b"[" + GOOD + b", " + MEDIUM + b"]", "json", "d.json")
    assert rows[0] == json.loads(GOOD)
    assert rows[1].message == "d.json row 1: row is nested deeper than 64 levels"
    with pytest.raises(DataError, match=r"d.json is not UTF-8 text \(line 3, byte \d+\)"):
        parse_bytes(b"[\n" + GOOD + b",\n" + NOT_UTF8 + b"]", "json", "d.json")
    with pytest.raises(DataError, match="d.json is nested deeper than the JSON decoder allows"):
        parse_bytes(b"[" + DEEP + b"]", "json", "d.json")


def test_parquet_rows_are_checked(monkeypatch):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    deep: object = "x"
    for _ in range(8):  # pyarrow itself refuses schemas past ~30 list levels: a lower limit shows the check
        deep = [deep]
    monkeypatch.setattr(limits, "MAX_DEPTH", 6)
    buf = io.BytesIO()
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"}]], "extra": [deep]}), buf)
    rows = parse_bytes(buf.getvalue(), "parquet", "d.parquet")
    assert rows[0].message == "d.parquet row 0: row is nested deeper than 6 levels"


def test_depth_limit_counts_levels_exactly():
    v: object = 1
    for _ in range(limits.MAX_DEPTH):
        v = [v]
    assert limits.depth_problem(v) is None
    assert limits.depth_problem([v]) == f"nested deeper than {limits.MAX_DEPTH} levels"


def test_cli_skip_reports_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join([GOOD] * 9 + [DEEP]) + b"\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("data:\n  on_error: skip\n  max_skip_fraction: 0.2\n")
    r = subprocess.run([sys.executable, "-m", "gptoss_cloud", "data", "tokenize", str(p), "--spec", str(spec),
                        "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert f"skipped: {p} row 9: line 10 is nested deeper than 64 levels" in r.stderr


DEEP_TEXT = "[" * 100_000 + "]" * 100_000
Q = {"role": "user", "content": "q"}


@pytest.mark.parametrize("row,problem", [
    ({"messages": [Q, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": DEEP_TEXT}}]}]},
     "message 1 (assistant) tool call 0 (f): arguments are nested deeper than 64 levels"),
    ({"tools": DEEP_TEXT, "messages": [Q, {"role": "assistant", "content": "a"}]},
     "'tools' is a string but nested deeper than 64 levels"),
    ({"tools": [{"name": "f", "parameters": DEEP_TEXT}], "messages": [Q, {"role": "assistant", "content": "a"}]},
     "tool 0 (f): parameters are nested deeper than 64 levels"),
], ids=["arguments", "tools", "parameters"])
def test_json_text_inside_a_row_is_decoded_under_the_same_limit(row, problem):
    from gptoss_cloud.trainer.data.harmony import tokenize_row

    with pytest.raises(RowError) as e:
        tokenize_row(row, DataSection(), index=4, source=DatasetSource(path="d.jsonl"))
    assert e.value.message.startswith(f"d.jsonl row 4: {problem}")


@pytest.mark.parametrize("field", ["content", "reasoning"])
def test_unpaired_surrogate_escapes_are_row_errors(tmp_path, field):
    # valid JSON, valid UTF-8 bytes, but "\ud800" decodes to text that no renderer can encode
    line = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "%s": "x\\ud800y"}]}' % field
    p = tmp_path / "d.jsonl"
    p.write_text(GOOD.decode() + "\n" + line + "\n")
    with pytest.raises(RowError) as e:
        build_datasets(_data(p), use_cache=False)
    where = "content" if field == "content" else "thinking"
    assert e.value.message == f"{p} row 1: message 1 (assistant) {where}: holds an unpaired surrogate '\\ud800' at " \
                              "character 1, which is not Unicode text"


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    p = tmp_path / "d.jsonl"
    p.write_bytes(GOOD + b"\n")

    def eio(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", eio)  # a disk error: root can read any file, so permissions cannot show it
    with pytest.raises(DataError, match=rf"^cannot read dataset {p}: Input/output error$"):
        build_datasets(_data(p), use_cache=False)
