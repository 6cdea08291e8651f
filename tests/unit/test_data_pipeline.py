"""build_datasets: mixing, validation split, statistics, the tokenized-data cache, no torch."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import pytest

from gptoss_cloud.contract.errors import DataError
from gptoss_cloud.contract.sections import DataSection, DatasetSource
from gptoss_cloud.trainer.data.pipeline import build_datasets, cache_path


def _rows(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}"}]} for i in range(n)]


@pytest.fixture
def two(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in _rows("alpha", 20)))
    b.write_text("".join(json.dumps(r) + "\n" for r in _rows("beta", 10)))
    return a, b


def _segments(samples):
    return sorted(r for p in samples for r in p.rows)


def test_weights_mix_deterministically(two):
    a, b = two
    data = DataSection(datasets=[DatasetSource(path=str(a), weight=2), DatasetSource(path=str(b), weight=0.5)],
                       max_seq_len=256)
    ds = build_datasets(data, use_cache=False)
    assert ds.stats.rows == 2 * 20 + 5 and ds.stats.sequences == 45 and ds.stats.packed == 45
    again = build_datasets(data, use_cache=False)
    assert [p.input_ids for p in ds.train] == [p.input_ids for p in again.train]
    other = build_datasets(data.model_copy(update={"seed": 1}), use_cache=False)
    assert [p.input_ids for p in other.train] != [p.input_ids for p in ds.train]


def test_validation_fraction_is_disjoint_and_seeded(two):
    a, _ = two
    data = DataSection(datasets=[DatasetSource(path=str(a))], validation=0.25, max_seq_len=128)
    ds = build_datasets(data, use_cache=False)
    train_rows, val_rows = set(_segments(ds.train)), set(_segments(ds.validation))
    assert len(val_rows) == 5 and len(train_rows) == 15 and not train_rows & val_rows
    assert ds.validation_stats.rows == 5
    assert set(_segments(build_datasets(data, use_cache=False).validation)) == val_rows


def test_validation_from_its_own_source(two):
    a, b = two
    data = DataSection(datasets=[DatasetSource(path=str(a))], validation=DatasetSource(path=str(b)), max_seq_len=128)
    ds = build_datasets(data, use_cache=False)
    assert ds.stats.rows == 20 and ds.validation_stats.rows == 10


def test_stats_match_the_samples():
    data = DataSection(max_seq_len=512)
    ds = build_datasets(data, use_cache=False)
    st = ds.stats
    real = sum(sum(p.seq_lens[: len(p.rows)]) for p in ds.train)
    trained = sum(1 for p in ds.train for x in p.labels if x != -100)
    assert st.tokens == real and st.trained_tokens == trained and 0.1 < st.trained_fraction < 0.5
    assert st.samples == len(ds.train) and st.packed == sum(len(p.rows) for p in ds.train)
    assert st.rows == 41 and st.sequences >= st.rows  # expand adds a sequence per earlier thinking response


def test_overlong_drop_and_empty_result(two):
    a, _ = two
    data = DataSection(datasets=[DatasetSource(path=str(a))], max_seq_len=16)
    with pytest.raises(DataError, match=r"no training samples: .*20 over max_seq_len 16"):
        build_datasets(data, use_cache=False)
    ds = build_datasets(data.model_copy(update={"overlong": "truncate", "max_seq_len": 64}), use_cache=False)
    assert ds.stats.truncated == 20 and ds.stats.dropped == 0 and ds.stats.untrained == 0
    assert all(len(p.input_ids) == 64 for p in ds.train)


def test_cache_is_written_once_and_keyed_on_content(two, tmp_path):
    a, _ = two
    data = DataSection(datasets=[DatasetSource(path=str(a))], max_seq_len=128, cache_dir=str(tmp_path / "cache"))
    path = cache_path(data)
    assert not path.exists()
    first = build_datasets(data)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    second = build_datasets(data)
    assert path.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert [(p.input_ids, p.labels, p.position_ids, p.seq_lens) for p in second.train] == \
           [(p.input_ids, p.labels, p.position_ids, p.seq_lens) for p in first.train]
    assert second.stats == first.stats
    # Any change to the rows or to the data section is a new key.
    assert cache_path(data.model_copy(update={"train_on": "last"})) != path
    a.write_text(a.read_text().replace("answer 3", "answer three"))
    assert cache_path(data) != path
    assert cache_path(data, cache_dir=tmp_path / "elsewhere").parent == tmp_path / "elsewhere"


def _build_in_child(spec_json: str, q) -> None:
    ds = build_datasets(DataSection.model_validate_json(spec_json))
    q.put([p.input_ids for p in ds.train])


def test_concurrent_builds_agree(two, tmp_path):
    a, _ = two
    data = DataSection(datasets=[DatasetSource(path=str(a))], max_seq_len=128, cache_dir=str(tmp_path / "c"))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(data.model_dump_json(), q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert [f.name for f in (tmp_path / "c").iterdir()] == [cache_path(data).name]  # no temporary files left


def test_the_data_pipeline_never_imports_torch():
    code = ("import sys; from gptoss_cloud.trainer.data.pipeline import build_datasets;"
            "from gptoss_cloud.contract.spec import DataSection; build_datasets(DataSection(max_seq_len=512), use_cache=False);"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_parallel_tokenization_matches_serial(tmp_path, monkeypatch):
    from gptoss_cloud.trainer.data import pipeline

    p = tmp_path / "many.jsonl"
    rows = _rows("gamma", 60) + ["{broken"]
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    data = DataSection(datasets=[DatasetSource(path=str(p))], max_seq_len=256, on_error="skip", max_skip_fraction=0.05)
    serial = build_datasets(data, use_cache=False)
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 20)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    parallel = build_datasets(data, use_cache=False)
    assert [p.input_ids for p in parallel.train] == [p.input_ids for p in serial.train]
    assert parallel.stats == serial.stats and serial.stats.skipped_rows == 1
    with pytest.raises(DataError, match=r"many.jsonl row 60: line 61 is not valid JSON"):
        build_datasets(data.model_copy(update={"on_error": "fail"}), use_cache=False)
