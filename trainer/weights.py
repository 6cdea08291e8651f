"""Pretrained GPT-OSS weights: fetched once per node into a cache, read with MXFP4 experts dequantised.

A model name is a preset alias (``20b`` -> ``openai/gpt-oss-20b``), a local folder, a hub id or an
``s3://`` prefix. Local rank 0 of each node downloads into the cache while the node's other ranks wait
at a barrier, so a node fetches the weights once, never once per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.hub_files import WEIGHT_INCLUDE, wanted
from gptoss_cloud.contract.shapes import HUB_IDS

from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_expert_weight

COMPLETE_MARKER = ".gptoss-complete"


def default_cache_dir() -> Path:
    # Node layout, not a training setting: where this node's disk keeps downloads changes nothing about
    # what is trained (entries are keyed by source and revision, and verified), like HF_HUB_CACHE. So an
    # image or node may set GPTOSS_WEIGHTS_CACHE; model.cache_dir (or the trainer's --weights-cache) wins.
    return Path(os.environ.get("GPTOSS_WEIGHTS_CACHE", "~/.cache/gptoss-cloud/weights")).expanduser()


def resolve_source(name: str) -> str:
    """The place the weights of ``name`` come from: a folder, an s3:// prefix or a hub id."""
    return HUB_IDS.get(name, name)


def fetch_pretrained(
    name: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Make the weights of ``name`` available as a local folder on this node and return it."""
    source = resolve_source(name)
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    if not source.startswith("s3://"):
        # The hub's own cache (HF_HUB_CACHE), which the pod's init container has already filled with
        # the same files: a second download is then a no-op, and the other local ranks read it too.
        hub_cache = str(Path(cache_dir).expanduser() / "hub") if cache_dir else None   # None: HF_HUB_CACHE
        if local_rank == 0:
            _download_hub(source, revision, hub_cache)
        barrier()
        return _download_hub(source, revision, hub_cache, local_files_only=local_rank != 0)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = hashlib.sha256(f"{source}@{revision or ''}".encode()).hexdigest()[:16]
    dest = cache / f"{source.replace('://', '_').replace('/', '_')[-60:]}-{key}"
    if local_rank == 0 and not (dest / COMPLETE_MARKER).exists():
        _download_s3(source, dest)
        (dest / COMPLETE_MARKER).write_text(source)
    barrier()
    if not (dest / COMPLETE_MARKER).exists():
        raise GptossError(f"weights for {name!r} were not fetched into {dest}", hint="see local rank 0's log for the download error")
    return dest


def _download_s3(uri: str, dest: Path) -> None:
    from gptoss_cloud.contract.store.objects import open_store

    from gptoss_cloud.contract.store.fetch import download_prefix

    store = open_store(uri)
    if not any(k.endswith(".safetensors") for k in store.list("") if wanted(k)):
        raise GptossError(f"no .safetensors weights under {uri}", hint="point model.name at the folder holding config.json and *.safetensors")
    download_prefix(store, "", dest, where=uri.rstrip("/"), keep=wanted)


def _download_hub(repo_id: str, revision: str | None, cache_dir: str | None = None, *, local_files_only: bool = False) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise GptossError(
            f"model {repo_id!r} is a hub id but huggingface_hub is not installed",
            hint="pip install 'gptoss-cloud[hub]', or point model.name at a local folder or s3:// prefix",
        ) from e
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(WEIGHT_INCLUDE),
                                      cache_dir=cache_dir, local_files_only=local_files_only))
    except Exception as e:  # network, auth, missing repo: one line naming the model
        raise GptossError(f"cannot download {repo_id!r} from the Hugging Face hub: {type(e).__name__}: {e}",
                          hint="check the id, HF_TOKEN, and network access; or use a local folder / s3:// prefix") from e


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GptossError(f"no config.json in {folder}", hint="a model folder needs config.json and *.safetensors") from None


def iter_state_dict(folder: Path, dtype: torch.dtype, *, keep_mxfp4: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in transformers' parameter names; MXFP4 ``*_blocks``/``*_scales`` pairs come out as
    one dequantised bf16/fp32 tensor, already-dequantised checkpoints pass through. One tensor at a time.

    ``keep_mxfp4`` (the ``mxfp4`` base): the pairs pass through packed, as ``Mxfp4Experts`` holds them,
    so the host never holds the experts dequantised (120b: ~61 GiB read instead of ~218 GiB built)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GptossError(f"no *.safetensors in {folder}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    for k in sorted(where):
        if k.endswith("_scales"):
            if keep_mxfp4:
                yield k, where[k].get_tensor(k)
            continue
        if k.endswith("_blocks"):
            base = k[: -len("_blocks")]
            if base + "_scales" not in where:
                raise GptossError(f"{k} has no matching {base}_scales in {folder}")
            blocks = where[k].get_tensor(k)
            if keep_mxfp4:
                yield k, blocks
                continue
            scales = where[base + "_scales"].get_tensor(base + "_scales")
            yield base, dequantize_expert_weight(blocks, scales, dtype)
        else:
            yield k, where[k].get_tensor(k).to(dtype)


def load_state_dict(folder: Path, dtype: torch.dtype, *, keep_mxfp4: bool = False) -> dict[str, torch.Tensor]:
    return dict(iter_state_dict(folder, dtype, keep_mxfp4=keep_mxfp4))
