"""Which merged-model folder of a run home is published, and which format serving uses.

A run home can hold ``merged/`` (bf16) and ``merged-mxfp4/`` (experts in the release's MXFP4 layout), and
``merged-step-N[-mxfp4]/`` for a merged checkpoint (names: ``runs.merged_key``). A folder is published when its
``model.safetensors.index.json`` exists: the merge writes it after every shard. Every reader (serve, promotion,
status, the serving pod's fetch, chat, push) asks here, so none assumes ``merged/``.

``serve.format: auto`` serves the MXFP4 folder when it is published (a quarter of the bytes: fewer GPUs, see
docs/serving-sizes.md), else the bf16 one. When neither is published, the merge serving renders writes the
format the run resolves to: ``output.merge_format`` through ``runs.merge_formats``, MXFP4 first.
"""

from __future__ import annotations

from gptoss_cloud.contract.runs import merge_formats, merged_key
from gptoss_cloud.contract.shapes import HUB_IDS

MERGED_MARKER = "model.safetensors.index.json"   # the merge writes the index after every shard
SERVE_PREFERENCE = ("mxfp4", "bf16")              # what serve.format: auto takes first


def formats_for(fmt: str) -> tuple[str, ...]:
    """The formats ``serve.format`` (auto | bf16 | mxfp4) accepts, in order of preference."""
    return SERVE_PREFERENCE if fmt == "auto" else (fmt,)


def published_format(store, step: int | None = None, fmt: str = "auto") -> str | None:
    """The format of the published merged folder (of checkpoint ``step``) that ``fmt`` accepts, or None.
    ``store`` is the run home's ``open_store``."""
    for f in formats_for(fmt):
        if store.exists(f"{merged_key(f, step)}/{MERGED_MARKER}"):
            return f
    return None


def published_key(store, step: int | None = None, fmt: str = "auto") -> str | None:
    """The folder name of ``published_format``'s folder (``merged``, ``merged-mxfp4``, …), or None."""
    f = published_format(store, step, fmt)
    return None if f is None else merged_key(f, step)


def is_mxfp4_config(config: dict) -> bool:
    """A Hugging Face config.json whose weights are MXFP4 (``quantization_config.quant_method: mxfp4``)."""
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def experts_trained(spec) -> bool:
    return spec.method.kind == "full" or spec.method.lora.experts


def holds_mxfp4(config: dict | None, tensor_names=()) -> bool:
    """Whether a checkpoint holds its experts in MXFP4: its config declares it (the published checkpoints), or
    its tensors are packed (``*_blocks``: a random-init base kept with ``model.base_format: mxfp4`` is written
    that way without declaring it). The merge and serving both decide with this."""
    return (config is not None and is_mxfp4_config(config)) or any(n.endswith("_blocks") for n in tensor_names)


def base_is_mxfp4(spec, base_config: dict | None = None, tensor_names=()) -> bool:
    """Whether the run's base holds its experts in MXFP4: ``holds_mxfp4`` of its config.json and tensor names when
    known (a run's ``base/``), else the published GPT-OSS checkpoints are and random-init bases are not."""
    if base_config is not None or tensor_names:
        return holds_mxfp4(base_config, tensor_names)
    return spec.model.init != "random" and spec.model.name in HUB_IDS


def merge_format_for(spec, base_config: dict | None = None, base_tensors=()) -> str:
    """The one format serving merges into when nothing is published: ``serve.format`` when it names one, else
    what ``output.merge_format`` resolves to for this run, MXFP4 first."""
    if spec.serve.format != "auto":
        return spec.serve.format
    written = merge_formats(spec.output.merge_format, experts_trained=experts_trained(spec), qat=spec.method.qat,
                            base_mxfp4=base_is_mxfp4(spec, base_config, base_tensors))
    return next(f for f in SERVE_PREFERENCE if f in written)

