"""Sources: the same rows from JSONL, JSON, Parquet and a real S3-compatible server give the same tokens."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from gptoss_cloud.contract.errors import DataError
from gptoss_cloud.contract.sections import DataSection, DatasetSource
from gptoss_cloud.trainer.data.harmony import tokenize_row
from gptoss_cloud.trainer.data.sources import is_hub_id, load_source, sample_path
from gptoss_cloud.trainer.data.vocab import load_encoding

ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "thinking": "greet"}],
     "reasoning_effort": "low"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time?"},
                  {"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
                                                        "function": {"name": "get_time", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "t", "content": "noon"},
                  {"role": "assistant", "content": "Noon."}],
     "tools": [{"type": "function", "function": {"name": "get_time", "description": "now", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
               {"type": "function", "function": {"name": "get_date", "description": "today", "parameters": {
                   "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]},
]


def _tokens(src: DatasetSource):
    s = load_source(src)
    return [seq.input_ids for i, r in enumerate(s.rows) for seq in tokenize_row(r, DataSection(), index=i, source=src)]


@pytest.fixture
def files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    # Parquet unifies the structs: fields a row lacks come back as None, which must read as absent.
    pq.write_table(pa.Table.from_struct_array(pa.array(ROWS)), tmp_path / "d.parquet")
    return tmp_path


def test_jsonl_json_parquet_agree(files):
    want = _tokens(DatasetSource(path=str(files / "d.jsonl")))
    assert len(want) == 2
    assert _tokens(DatasetSource(path=str(files / "d.json"))) == want
    assert _tokens(DatasetSource(path=str(files / "d.parquet"))) == want
    (files / "plain").write_bytes((files / "d.jsonl").read_bytes())
    assert _tokens(DatasetSource(path=str(files / "plain"), format="jsonl")) == want


def test_content_hash_follows_content(files):
    a = load_source(DatasetSource(path=str(files / "d.jsonl"))).content_hash
    (files / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    assert load_source(DatasetSource(path=str(files / "d.jsonl"))).content_hash != a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    client.create_bucket(Bucket="data")
    yield client
    server.stop()


def test_s3_source(files, s3):
    s3.put_object(Bucket="data", Key="chats/d.jsonl", Body=(files / "d.jsonl").read_bytes())
    s3.put_object(Bucket="data", Key="chats/d.parquet", Body=(files / "d.parquet").read_bytes())
    want = _tokens(DatasetSource(path=str(files / "d.jsonl")))
    assert _tokens(DatasetSource(path="s3://data/chats/d.jsonl")) == want
    assert _tokens(DatasetSource(path="s3://data/chats/d.parquet")) == want
    from gptoss_cloud.contract.errors import StoreError

    with pytest.raises(StoreError, match="s3://data/chats/missing.jsonl"):
        load_source(DatasetSource(path="s3://data/chats/missing.jsonl"))


def test_hub_ids_and_missing_library(monkeypatch):
    assert is_hub_id("HuggingFaceH4/ultrachat_200k") and is_hub_id("hf://org/name")
    assert not is_hub_id("data/chats.jsonl") and not is_hub_id("sample")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on an install without the [hub] extra
    with pytest.raises(DataError, match="needs the `datasets` library") as e:
        load_source(DatasetSource(path="org/name"))
    assert "gptoss-cloud[hub]" in e.value.hint


def test_sample_dataset_is_small_valid_and_covers_every_feature():
    s = load_source(DatasetSource(path="sample"))
    rows = s.rows
    assert 30 <= len(rows) <= 60
    enc = load_encoding()
    for i, r in enumerate(rows):
        for seq in tokenize_row(r, DataSection(), index=i, source=DatasetSource(path="sample")):
            assert len(seq.input_ids) < 400, f"sample row {i} is too long for a tiny model to memorise quickly"
    msgs = [m for r in rows for m in r["messages"]]
    assert any("thinking" in m for m in msgs)
    assert any(len(m.get("tool_calls", [])) >= 2 for m in msgs)
    assert any(m["role"] == "tool" for m in msgs)
    assert any(m["role"] == "developer" for m in msgs) and any(m["role"] == "system" for m in msgs)
    assert {r.get("reasoning_effort") for r in rows} >= {"low", "medium", "high"}
    assert any(sum(m["role"] == "user" for m in r["messages"]) >= 3 for r in rows)
    # The row `gptoss-cloud chat` uses to show the tiny model learned something: one short, unique answer.
    [secret] = [r for r in rows if r["messages"][0]["content"] == "What is the secret word of gptoss-cloud?"]
    assert secret["messages"][1]["content"] == "The secret word is marmalade-42."
    assert sample_path().name == "sample.jsonl" and enc is not None


def test_hub_loader_on_a_local_dataset_folder(files, tmp_path, monkeypatch):
    # The `datasets` code path for hub ids, pointed at a local folder (no network in tests).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "hubset"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes((files / "d.jsonl").read_bytes())
    src = DatasetSource(path=str(folder), format="hub", split="train")
    loaded = load_source(src)
    assert loaded.name == f"hf://{folder}[train]" and len(loaded.rows) == 2
    assert _tokens(src) == _tokens(DatasetSource(path=str(files / "d.jsonl")))
    with pytest.raises(DataError, match=r"could not load hub dataset .* split 'validation'"):
        load_source(DatasetSource(path=str(folder), format="hub", split="validation"))
