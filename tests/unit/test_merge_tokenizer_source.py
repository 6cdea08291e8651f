"""Which tokenizer a merged folder gets: the published base's own (from the hub cache), or the
generated one only for random-init bases."""

from __future__ import annotations

import pytest

from gptoss_cloud.contract.spec import load_spec


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    repo = tmp_path / "hf" / "models--openai--gpt-oss-20b"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (snap / name).write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return snap


def test_published_base_gives_its_tokenizer(hub_cache):
    from gptoss_cloud.trainer.merge.export import published_tokenizer_dir

    spec = load_spec(overrides={"model.name": "20b", "model.init": "pretrained", "method.kind": "full"})
    assert published_tokenizer_dir(spec) == hub_cache


def test_random_init_and_unreachable_bases_get_the_generated_one(hub_cache):
    from gptoss_cloud.trainer.merge.export import published_tokenizer_dir

    assert published_tokenizer_dir(load_spec(overrides={"model.name": "tiny", "model.init": "random"})) is None
    assert published_tokenizer_dir(load_spec(overrides={"model.name": "20b", "model.init": "random"})) is None
    gone = load_spec(overrides={"model.name": "openai/gpt-oss-120b", "model.init": "pretrained"})
    assert published_tokenizer_dir(gone) is None   # not in the (offline) cache: generated instead
