"""The harmony vocabulary offline: a clear DataError naming TIKTOKEN_ENCODINGS_BASE when it is missing."""

from __future__ import annotations

import pytest

from gptoss_cloud.contract.errors import DataError
from gptoss_cloud.trainer.data import vocab


@pytest.fixture
def fresh(monkeypatch):
    vocab.load_encoding.cache_clear()
    yield monkeypatch
    vocab.load_encoding.cache_clear()  # later tests load the real vocabulary again


def test_missing_vocabulary_names_the_variable(fresh, tmp_path):
    fresh.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    with pytest.raises(DataError, match=f"TIKTOKEN_ENCODINGS_BASE={tmp_path} has no o200k_base.tiktoken") as e:
        vocab.load_encoding()
    assert "set TIKTOKEN_ENCODINGS_BASE to a folder holding o200k_base.tiktoken" in e.value.hint


def test_corrupt_vocabulary_is_a_data_error(fresh, tmp_path):
    (tmp_path / "o200k_base.tiktoken").write_text("not a vocabulary\n")
    fresh.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    with pytest.raises(DataError, match="could not load the harmony vocabulary") as e:
        vocab.load_encoding()
    assert "TIKTOKEN_ENCODINGS_BASE" in e.value.hint


def test_vocab_hash_is_stable_and_pad_is_not_rendered():
    assert vocab.vocab_hash() == vocab.vocab_hash() and len(vocab.vocab_hash()) == 16
    enc = vocab.load_encoding()
    assert enc.decode([vocab.PAD_ID]) == "<|endoftext|>"
