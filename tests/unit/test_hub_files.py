"""What is fetched of a published GPT-OSS layout: the HF-format files only, never original/ or metal/."""

from __future__ import annotations

from pathlib import Path

from gptoss_cloud.contract.hub_files import WEIGHT_INCLUDE, wanted

# openai/gpt-oss-120b as published: HF shards at the top, the same weights again under original/ and metal/.
PUBLISHED = [
    ".gitattributes", "LICENSE", "README.md", "USAGE_POLICY",
    "config.json", "generation_config.json", "chat_template.jinja",
    "model-00000-of-00014.safetensors", "model-00013-of-00014.safetensors", "model.safetensors.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    "original/config.json", "original/dtypes.json", "original/model--00001-of-00007.safetensors",
    "original/model.safetensors.index.json", "metal/model.bin",
]
FETCHED = {
    "config.json", "generation_config.json", "chat_template.jinja",
    "model-00000-of-00014.safetensors", "model-00013-of-00014.safetensors", "model.safetensors.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
}


def test_the_hub_client_filter_takes_only_the_hf_format_files():
    from huggingface_hub.utils import filter_repo_objects   # what snapshot_download and `hf download --include` apply

    assert set(filter_repo_objects(PUBLISHED, allow_patterns=list(WEIGHT_INCLUDE))) == FETCHED


def test_wanted_is_the_same_rule():
    assert {p for p in PUBLISHED if wanted(p)} == FETCHED


def test_s3_mirror_copy_fetches_the_same_files(tmp_path):
    """The trainer's s3:// (here: a local store folder) copy of a mirrored repo skips original/ and metal/."""
    src = tmp_path / "mirror"
    for p in PUBLISHED:
        (src / p).parent.mkdir(parents=True, exist_ok=True)
        (src / p).write_text("{}" if p.endswith(".json") else "x")
    import gptoss_cloud.trainer.weights as w

    dest = tmp_path / "cache"
    w._download_s3(str(src), dest)
    got = {str(p.relative_to(dest)) for p in Path(dest).rglob("*") if p.is_file()}
    assert got == FETCHED


def test_trainer_reads_the_cache_the_init_container_filled(tmp_path, monkeypatch):
    """`hf download --cache-dir C` writes the hub cache layout; the trainer finds it there (offline)."""
    from gptoss_cloud.trainer.weights import fetch_pretrained

    repo = tmp_path / "hf" / "models--openai--gpt-oss-120b"
    snap = repo / "snapshots" / ("a" * 40)
    for p in FETCHED:
        (snap / p).parent.mkdir(parents=True, exist_ok=True)
        (snap / p).write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # a second download would fail: only the cache can answer
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for rank in (0, 1):
        assert fetch_pretrained("120b", local_rank=rank) == snap


def test_init_container_downloads_with_the_same_patterns():
    from gptoss_cloud.render.k8s.jobset import weights_init_container
    from gptoss_cloud.contract.spec import load_spec

    spec = load_spec(overrides={"model.name": "120b", "model.init": "pretrained", "method.kind": "lora"})
    c = weights_init_container(spec, "img", [], [])
    cmd = c["command"]
    assert cmd[:3] == ["hf", "download", "openai/gpt-oss-120b"]
    assert cmd[cmd.index("--include") + 1:] == list(WEIGHT_INCLUDE)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HF_HUB_CACHE"] == cmd[cmd.index("--cache-dir") + 1]   # the trainer reads this same cache
