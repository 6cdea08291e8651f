"""Merge a published checkpoint into a servable Hugging Face folder, streaming tensor by tensor.

Full fine-tunes are consolidated from the DCP shards one tensor at a time. LoRA adapters are merged
into the base weights one decoder layer at a time, by peft itself (its merge handles the experts'
3-D ``target_parameters`` and the attention projections); the adapter is also written on its own.
Peak host memory is about one decoder layer (LoRA) or one tensor (full), never the whole model.

The output: ``model-0000i-of-0000n.safetensors`` (at most 5 GB each) with
``model.safetensors.index.json``, ``config.json`` (architectures exactly ``["GptOssForCausalLM"]``),
``generation_config.json`` and the tokenizer with its chat template (copied from the base, or generated
from the harmony vocabulary for random/tiny bases). It goes to a local folder or straight to S3 (one
shard is staged locally at a time). Two formats (``output.merge_format``, ``merge --format``): ``bf16``
(dense, no ``quantization_config``) and ``mxfp4`` (the experts packed as the published checkpoints
pack them: ``merge/mxfp4.py``); ``merge_run`` writes each resolved one from one read of the source.

Every merge is measured (``MergeResult``): ``wall_s``, ``bytes_written`` (every output file) and
``peak_rss_bytes``, the host memory high-water mark — of the merge itself where Linux lets the process
reset its mark (``peak_rss_scope == "section"``), else of the whole process (``"process"``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptoss_cloud.contract.merged import holds_mxfp4
from gptoss_cloud.contract.runs import MERGE_FORMATS, merge_formats
from gptoss_cloud.contract.shapes import EOS_TOKEN_IDS, HUB_IDS, PAD_TOKEN_ID
from gptoss_cloud.contract.store.objects import join

from gptoss_cloud.trainer.checkpoint import shards as st
from gptoss_cloud.trainer.checkpoint.stats import GiB, PeakRss
from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError
from gptoss_cloud.trainer.merge.base import BaseWeights, Source, base_config, resolve_base
from gptoss_cloud.trainer.merge.mxfp4 import Mxfp4Layout, quantization_config
from gptoss_cloud.trainer.merge.sink import Sink, write_adapter, write_model

log = logging.getLogger("gptoss_cloud.merge")
SHARD_BYTES = 5 * 10**9
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MergeResult:
    out: str
    step: int
    method: str
    tensors: int
    total_bytes: int
    shards: list[str]
    adapter_out: str | None = None
    max_abs_logit_diff: float | None = None
    files: list[str] = field(default_factory=list)
    wall_s: float | None = None
    bytes_written: int | None = None  # the merged folder's files (the adapter copy of a LoRA merge not included)
    peak_rss_bytes: int | None = None
    peak_rss_scope: str | None = None  # "section": this merge's own peak; "process": the process's lifetime peak
    rss_start_bytes: int | None = None  # resident set when the merge started
    format: str = "bf16"  # bf16 | mxfp4 (contract.runs.MERGE_FORMATS)

    def stats(self) -> dict:
        """The measurements, as recorded in metrics.jsonl and summary.json."""
        gib = lambda b: round(b / GiB, 3) if b is not None else None  # noqa: E731
        return {"wall_s": self.wall_s, "bytes_written": self.bytes_written, "peak_rss_gib": gib(self.peak_rss_bytes),
                "peak_rss_scope": self.peak_rss_scope, "rss_start_gib": gib(self.rss_start_bytes),
                "tensors": self.tensors, "model_bytes": self.total_bytes, "out": self.out, "step": self.step,
                "format": self.format}


# ------------------------------------------------------------------------------------------ helpers
def hf_name(peft_key: str) -> str:
    """A peft parameter name (or the loop's ``lm.``-prefixed one) -> the plain transformers name."""
    k = peft_key.removeprefix("lm.").removeprefix("base_model.model.")
    while ".base_layer" in k:
        k = k.replace(".base_layer", "")
    return k


def declared_dtype(cfg: dict) -> str | None:
    """The dtype the run computed in, as its config records it (None: unknown, keep the checkpoint's).
    A full fine-tune checkpoints fp32 master weights; serving them in fp32 would double the model."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return name if name in _DT else None


def servable_config(cfg: dict, dtype: torch.dtype) -> dict:
    cfg = dict(cfg)
    cfg["architectures"] = ["GptOssForCausalLM"]  # never an FSDP-prefixed class name
    cfg["model_type"] = "gpt_oss"
    cfg.pop("quantization_config", None)  # the weights are plain bf16/fp32 now
    name = str(dtype).removeprefix("torch.")
    cfg["torch_dtype"] = name
    cfg["dtype"] = name
    for k in ("_name_or_path", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    # Training turns the KV cache off (no generation there); a served model generates, and vLLM and
    # transformers read use_cache. transformers_version tells loaders which config conventions apply.
    cfg["use_cache"] = True
    if not cfg.get("transformers_version"):
        import transformers

        cfg["transformers_version"] = transformers.__version__
    return cfg


def generation_config(cfg: dict) -> dict:
    vocab = int(cfg.get("vocab_size", 0))
    eos = [t for t in EOS_TOKEN_IDS if t < vocab] or [cfg.get("eos_token_id")]
    pad = PAD_TOKEN_ID if PAD_TOKEN_ID < vocab else cfg.get("pad_token_id")
    return {"bos_token_id": 199998 if vocab > 199998 else None, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True}


# --------------------------------------------------------------------------------------------- merge
def merge(ref: str, out: str, *, fmt: str = "bf16", base: str | None = None, dtype: str | None = None,
          shard_bytes: int = SHARD_BYTES, adapter_out: str | None = None, verify: bool = False) -> MergeResult:
    """Merge the checkpoint ``ref`` (a run home or .../checkpoints/step-N) into a servable folder ``out``
    in one format (bf16 or mxfp4)."""
    if fmt not in MERGE_FORMATS:
        raise CheckpointError(f"merge format {fmt!r}: merge writes one of {', '.join(MERGE_FORMATS)} (merge_run writes several)")
    (res,) = merge_run(ref, lambda *_: out, merge_format=fmt, base=base, dtype=dtype, shard_bytes=shard_bytes,
                       adapter_out=adapter_out, verify=verify)
    return res


def merge_run(ref: str, out_for: Callable[[str, tuple[str, ...]], str], *, merge_format: str | None = None, base: str | None = None,
              dtype: str | None = None, shard_bytes: int = SHARD_BYTES, adapter_out: str | None = None,
              verify: bool = False) -> list[MergeResult]:
    """Merge ``ref`` once per format ``merge_format`` resolves to (None: the run's ``output.merge_format``),
    format ``f`` of ``formats`` into folder ``out_for(f, formats)``. The checkpoint and base are fetched once; each format is
    measured on its own (its wall time and its own peak host memory)."""
    if merge_format not in (None, "auto", "both", *MERGE_FORMATS):
        raise CheckpointError(f"merge format {merge_format!r}: use bf16, mxfp4, both or auto")
    t0, rss = time.perf_counter(), PeakRss().start()
    with tempfile.TemporaryDirectory(prefix="gptoss-merge-") as tmp:
        job = _Job(ref, base, dtype, Path(tmp))
        results, formats = [], job.formats(merge_format)
        for i, fmt in enumerate(formats):
            if i:
                t0, rss = time.perf_counter(), PeakRss().start()
            results.append(job.write(fmt, out_for(fmt, formats), t0, rss, shard_bytes, adapter=adapter_out if i == 0 else False,
                                     verify=verify))
        return results


def default_adapter_out(out: str) -> str:
    """Where a LoRA merge into ``out`` keeps the adapter: ``<home>/adapter`` beside ``merged[-mxfp4]``."""
    out = out.rstrip("/").removesuffix("-mxfp4")
    return join(out.rsplit("/", 1)[0], "adapter") if out.endswith("/merged") else out + "-adapter"


class _Job:
    """One checkpoint opened for merging: its spec, config, base weights; ``write`` makes one folder."""

    def __init__(self, ref: str, base: str | None, dtype: str | None, tmp: Path):
        from gptoss_cloud.contract.spec import spec_from_yaml_text

        self.tmp, self.user_dtype = tmp, dtype
        self.src = src = Source(ref, tmp / "ckpt")
        cfg_text = src.text("config.json")
        self.spec = spec_from_yaml_text(src.text("spec.yaml"), f"{src.where}/spec.yaml") if src.text("spec.yaml") else None
        self.adapter_cfg = src.text("adapter_config.json")
        self.method = "lora" if self.adapter_cfg else "full"
        self.base_dir = None
        if self.method == "lora" or cfg_text is None:
            self.base_dir = resolve_base(src.home, self.spec.model.name if self.spec else None, base, tmp, signed=src.signed)
        if cfg_text is None and self.base_dir is None:
            raise CheckpointError(f"{src.where}: no config.json in the checkpoint and no base model to take it from")
        if self.method == "lora" and self.base_dir is None:
            raise CheckpointError(f"{src.where}: a LoRA checkpoint needs its base weights",
                                  hint="pass --base FOLDER|s3://… (random-init runs keep theirs in <run>/base/)")
        self.cfg = json.loads(cfg_text) if cfg_text else json.loads((self.base_dir / "config.json").read_text())
        self.dtype = dtype or declared_dtype(self.cfg)
        self.base = BaseWeights(self.base_dir) if self.method == "lora" else None

    def formats(self, merge_format: str | None) -> tuple[str, ...]:
        """``output.merge_format`` (or the one asked for) resolved for this checkpoint (contract.runs.merge_formats)."""
        if merge_format is None:
            merge_format = self.spec.output.merge_format if self.spec else "auto"
        adapter = json.loads(self.adapter_cfg) if self.adapter_cfg else {}
        experts = self.method == "full" or any(".experts." in f".{t}" for t in adapter.get("target_parameters") or ())
        base_mxfp4 = self.base is not None and holds_mxfp4(base_config(self.base_dir), self.base.where)
        return merge_formats(merge_format, experts_trained=experts, base_mxfp4=base_mxfp4,
                             qat=self.spec.method.qat if self.spec else "none")

    def write(self, fmt: str, out: str, t0: float, rss: PeakRss, shard_bytes: int, adapter: str | None | bool,
              verify: bool) -> MergeResult:
        src = self.src
        sink = Sink(out, self.tmp / fmt)
        layout = Mxfp4Layout(_DT[self.user_dtype] if self.user_dtype else torch.bfloat16, self.base) if fmt == "mxfp4" else None
        if self.method == "full":
            res = _merge_full(src, sink, self.cfg, self.dtype, shard_bytes, layout)
        else:
            res = _merge_lora(src, sink, self.cfg, json.loads(self.adapter_cfg), self.base, self.dtype, shard_bytes, layout)
            if adapter is not False:  # once per run: the first format's merge writes it
                res.adapter_out = adapter or default_adapter_out(out)
                write_adapter(src, json.loads(self.adapter_cfg), res.adapter_out, self.tmp / f"{fmt}-adapter")
        final_cfg = servable_config(self.cfg, layout.dtype if layout else (_DT.get(self.dtype) if self.dtype else res.dtype))
        if layout:
            final_cfg["quantization_config"] = quantization_config()
        for name, body in (("config.json", final_cfg), ("generation_config.json", generation_config(final_cfg))):
            sink.path(name).write_text(json.dumps(body, indent=2))
            sink.done(name)
        _write_tokenizer(sink, self.base_dir or published_tokenizer_dir(self.spec), self.cfg)
        sink.publish()
        result = MergeResult(out=out, step=src.step, method=self.method, tensors=res.tensors, total_bytes=res.total,
                             shards=res.shards, adapter_out=res.adapter_out, files=list(sink.written),
                             bytes_written=sink.bytes, rss_start_bytes=rss.start_rss, format=fmt)
        # Measured before --verify, which loads the whole model on purpose.
        result.wall_s = round(time.perf_counter() - t0, 3)
        result.peak_rss_bytes, result.peak_rss_scope = rss.peak(), rss.scope
        log.info("merged step %d into %s (%s): %.2f GiB written in %.1fs, peak host memory %.2f GiB (%s)", src.step,
                 out, fmt, sink.bytes / GiB, result.wall_s, result.peak_rss_bytes / GiB, result.peak_rss_scope)
        if verify:
            from gptoss_cloud.trainer.merge.verify import verify_merged  # it reads this module's sink and adapter writer

            result.max_abs_logit_diff = verify_merged(out, src, self.base_dir, self.adapter_cfg, self.tmp)
        return result


@dataclass
class _Written:
    tensors: int
    total: int
    shards: list[str]
    dtype: torch.dtype
    adapter_out: str | None = None


def _merge_full(src: Source, sink: Sink, cfg: dict, dtype: str | None, shard_bytes: int,
                layout: Mxfp4Layout | None = None) -> _Written:
    ent = src.model_entries()
    want = _DT.get(dtype) if dtype else None
    entries = [(hf_name(k), shape, want or dt) for k, (shape, dt) in ent.items()]
    by_hf = {hf_name(k): k for k in ent}

    def get(name: str) -> torch.Tensor:
        t = src.load([by_hf[name]])[by_hf[name]]
        return t.to(want) if want else t

    if layout:  # every weight of a full fine-tune trained: the experts are quantised
        entries, get = layout.plan(entries, adapted=lambda _: True, where=lambda _: src.where), layout.getter(get)
    shards = write_model(sink, entries, get, shard_bytes)
    out_dtype = want or next(iter(ent.values()))[1]
    return _Written(len(entries), sum(st.nbytes(s, d) for _, s, d in entries), shards, out_dtype)


def _meta_peft_model(cfg: dict, adapter_cfg: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "quantization_config")})
    lcfg = LoraConfig(**{k: v for k, v in adapter_cfg.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"})
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
        model = get_peft_model(model, lcfg)
    return model


def _adapted(model) -> set[str]:
    """The base weights (transformers names) an adapter changes: its modules' weights and its target_parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = set()
    for n, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer) and mod.lora_A:
            out.add(f"{hf_name(n)}.{getattr(mod, 'parameter_name', None) or 'weight'}")
    return out


def _merge_lora(src: Source, sink: Sink, cfg: dict, adapter_cfg: dict, base: BaseWeights, dtype: str | None,
                shard_bytes: int, layout: Mxfp4Layout | None = None) -> _Written:
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _meta_peft_model(cfg, adapter_cfg)
    lora_keys = set(src.model_entries())
    work_dtype = base.dtype()
    out_dtype = _DT.get(dtype) if dtype else work_dtype
    inner = model.base_model.model  # GptOssForCausalLM, peft layers inside
    groups = [("model.embed_tokens", inner.model.embed_tokens)]
    groups += [(f"model.layers.{i}", layer) for i, layer in enumerate(inner.model.layers)]
    groups += [("model.norm", inner.model.norm), ("lm_head", inner.lm_head)]
    entries, owner = [], {}
    for prefix, mod in groups:
        for n, p in mod.named_parameters(prefix=prefix):
            if "lora_" in n:
                continue
            entries.append((hf_name(n), tuple(p.shape), out_dtype))
            owner[hf_name(n)] = prefix
    if layout:
        changed = _adapted(model)
        entries = layout.plan(entries, adapted=changed.__contains__, where=base.location)
    skip = layout.copied if layout else set()  # their bytes come straight from the base: never dequantised
    cache: dict[str, torch.Tensor] = {}
    current = [None]

    def materialise(prefix: str, mod: torch.nn.Module) -> None:
        mod.to_empty(device="cpu")
        lora = {}
        with torch.no_grad():
            for n, p in mod.named_parameters(prefix=prefix):
                full = "base_model.model." + n
                if "lora_" in n:
                    if full not in lora_keys:
                        raise CheckpointError(f"{src.where}: adapter weight {full} missing from the checkpoint")
                    lora[full] = p
                elif hf_name(n) not in skip:
                    p.copy_(base.get(hf_name(n), work_dtype))
            if lora:
                loaded = src.load(sorted(lora))
                for k, p in lora.items():
                    p.copy_(loaded[k].to(p.dtype))
            for sub in mod.modules():
                if isinstance(sub, BaseTunerLayer) and sub.lora_A:
                    sub.merge()
        cache.clear()
        for n, p in mod.named_parameters(prefix=prefix):
            if "lora_" not in n and hf_name(n) not in skip:
                cache[hf_name(n)] = p.detach().to(out_dtype)
        mod.to_empty(device="meta")  # free the layer
        current[0] = prefix

    mods = dict(groups)

    def get(name: str) -> torch.Tensor:
        if current[0] != owner[name]:
            materialise(owner[name], mods[owner[name]])
        return cache.pop(name)

    for prefix, mod in groups:  # every module starts on meta; parameters are typed for the merge
        mod.to(work_dtype)
    shards = write_model(sink, entries, layout.getter(get) if layout else get, shard_bytes)
    return _Written(len(entries), sum(st.nbytes(s, d) for _, s, d in entries), shards, out_dtype)


def published_tokenizer_dir(spec) -> Path | None:
    """The hub snapshot holding a published base's tokenizer (its chat template knows tools and
    channels), for full fine-tunes, whose merge reads no base weights. None for random-init bases and
    folders, and when the hub cannot answer (then the generated tokenizer is written)."""
    if spec is None or spec.model.init == "random":
        return None
    name = spec.model.name
    repo = HUB_IDS.get(name, name)
    if repo == name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=spec.model.revision, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as e:  # offline, gated, not installed: the generated tokenizer still serves
        log.warning("merge: no tokenizer from %s (%s); writing the generated one", repo, type(e).__name__)
        return None


def _write_tokenizer(sink: Sink, base_dir: Path | None, cfg: dict) -> None:
    copied = []
    if base_dir is not None:
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, sink.path(name))
                sink.done(name)
                copied.append(name)
    if "tokenizer.json" in copied:
        return
    from gptoss_cloud.trainer.hf_tokenizer import write_tokenizer

    stage = sink.dir / ".tok"
    for name in write_tokenizer(stage):
        shutil.move(str(stage / name), sink.path(name))
        sink.done(name)
    shutil.rmtree(stage, ignore_errors=True)


