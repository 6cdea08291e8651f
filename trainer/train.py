"""``run_training(spec, run_id, home)``: what every rank runs under torchrun.

Parse nothing here: the spec is already resolved. Join the process group, build the data (rank 0
first, then the others from its cache), build the model, shard it, train, save the adapter (or the
fully fine-tuned model) and write ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import is_remote, join, open_store

from gptoss_cloud.trainer import causal_lm as LM
from gptoss_cloud.trainer import model as M
from gptoss_cloud.trainer.kernels.expert_units import join_unit_tensors, split_experts_
from gptoss_cloud.trainer.loop import CheckpointHooks, Loop, NoCheckpoints, make_optimizer
from gptoss_cloud.trainer.metrics import Metrics
from gptoss_cloud.trainer.optim import master_dtype
from gptoss_cloud.trainer.parallel import DistInfo, barrier, init_distributed, make_accelerator, offload_host_threads, shard_model

log = logging.getLogger("gptoss_cloud.trainer")


# ---------------------------------------------------------------------------------------------- data
def build_data(spec: RunSpec, info: DistInfo):
    """Rank 0 tokenizes and packs first (filling the pipeline's cache); the others then read the cache."""
    try:
        from gptoss_cloud.trainer.data import build_datasets  # the harmony pipeline
    except ImportError as e:
        raise GptossError("the data pipeline (gptoss_cloud.trainer.data) is not installed in this build") from e
    if info.is_main:
        ds = build_datasets(spec.data)
    barrier(info)
    if not info.is_main:
        ds = build_datasets(spec.data, log_notes=False)  # rank 0 has logged what the data needed converted
    return ds


# --------------------------------------------------------------------------------------------- model
def _put_folder(local: Path, home: str, key: str) -> str:
    """``local`` as ``<home>/<key>/`` (uploaded unless it is already there), its manifest written last."""
    from gptoss_cloud.contract.integrity import signing_key
    from gptoss_cloud.contract.outputs import publish_local_folder

    if is_remote(home):
        store = open_store(home)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            store.upload_file(f, f"{key}/{f.relative_to(local)}")
    publish_local_folder(open_store(join(home, key)), local, signing_key())
    return join(home, key)


def save_base(hf_model, home: str) -> str:
    """The random base weights as a Hugging Face folder at ``<home>/base/`` (adapters are merged onto it)."""
    if not is_remote(home):
        hf_model.save_pretrained(str(Path(home) / "base"))
        return _put_folder(Path(home) / "base", home, "base")
    with tempfile.TemporaryDirectory(prefix="gptoss-base-") as tmp:
        hf_model.save_pretrained(tmp)
        return _put_folder(Path(tmp), home, "base")


def recompute_policy(spec: RunSpec, info: DistInfo, shape=None) -> bool:
    """``parallelism.activation_checkpointing`` resolved for this GPU (``model.resolve_recompute``), logged."""
    on = M.resolve_recompute(spec, info.device, shape)
    if info.is_main and spec.parallelism.activation_checkpointing == "auto":
        log.info("activation checkpointing: auto -> %s for this device", "on" if on else "off")
    return on


def step_flops(spec: RunSpec, shape, recompute: bool):
    """StepStats -> the FLOPs that step executed on every rank (the formula in ``gptoss_cloud.contract.plan.flops``)."""
    from gptoss_cloud.contract.plan.flops import flops_from_pairs

    def count(stats) -> float:
        f = flops_from_pairs(shape, spec.method.kind, recompute, stats.processed_tokens, stats.attended_full,
                             stats.attended_sliding)
        return f.per_token * stats.processed_tokens

    return count


def build_module(spec: RunSpec, info: DistInfo, home: str):
    """The (possibly sharded) CausalLMWithChunkedLoss, its GptOssConfig and the compute dtype."""
    on_gpu = info.device.type == "cuda"
    # CPU runs (tests, the local demo) compute in fp32; GPUs keep the spec's dtype (bf16 by default).
    dtype = M.DTYPES[spec.model.dtype] if on_gpu else torch.float32
    attn, experts = M.resolve_implementations(spec.kernels, info.device.type)
    coef = spec.optim.router_aux_loss_coef
    if M.is_random(spec.model):
        shape = M.model_shape(spec.model)
        config = M.build_config(shape, attn, experts, coef)
        small = M.bf16_bytes(shape) < M.SMALL_BASE_BYTES
        if small:
            # Every rank builds the same seeded weights; FSDP keeps each rank's shard. A LoRA run keeps
            # its random base in the run home: merge and chat need it.
            hf = M.create_model(config, dtype, "cpu", seed=spec.optim.seed, base_format=spec.model.base_format)
            if info.is_main and spec.method.kind == "lora":
                save_base(hf, home)
        else:
            hf = M.create_model(config, dtype, "meta", base_format=spec.model.base_format)
    else:
        from gptoss_cloud.trainer.weights import fetch_pretrained, load_state_dict, read_config

        folder = fetch_pretrained(spec.model.name, revision=spec.model.revision, cache_dir=spec.model.cache_dir,
                                  local_rank=info.local_rank, barrier=lambda: barrier(info))
        shape = M.model_shape(spec.model, read_config(folder))
        config = M.build_config(shape, attn, experts, coef)
        hf = M.create_model(config, dtype, "meta", base_format=spec.model.base_format)
        # One full copy per job (rank 0's host), broadcast shard by shard by accelerate when sharded.
        if info.is_main or not info.distributed:
            weights = load_state_dict(folder, dtype, keep_mxfp4=spec.model.base_format == "mxfp4")
            missing, unexpected = hf.load_state_dict(weights, strict=False, assign=True)
            missing = [k for k in missing if k != "lm_head.weight" or not shape.tie_word_embeddings]
            if missing or unexpected:
                raise GptossError(f"weights in {folder} do not match GPT-OSS {shape.name}: "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        M.reset_rotary_buffers_(hf)
    M.configure_experts_(hf, spec.kernels)
    split_experts_(hf, spec.parallelism.expert_units)
    M.enable_recompute(hf, recompute_policy(spec, info, shape))
    if spec.parallelism.cpu_offload:
        offload_host_threads(info, spec.parallelism.cpu_threads)
    lm = M.apply_method(hf, spec.method)
    if M.compile_enabled(spec.kernels, info.device.type):
        M.compile_layers(lm)
    module = LM.CausalLMWithChunkedLoss(lm, spec.kernels.loss_chunk_tokens, router_aux=coef is not None,
                                        activation_offload=spec.parallelism.activation_offload)
    on_meta = any(p.device.type == "meta" for p in module.parameters())
    pretrained_meta = on_meta and not M.is_random(spec.model)

    masters = master_dtype(spec.optim)
    if info.distributed:
        if masters != torch.float32:
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.to(masters)
        acc = make_accelerator(spec.parallelism, info, bf16=on_gpu and dtype == torch.bfloat16,
                               ram_efficient_loading=pretrained_meta or (not M.is_random(spec.model)),
                               bf16_masters=masters == torch.bfloat16)
        offload = spec.parallelism.cpu_offload
        if offload and on_meta and M.is_random(spec.model):
            # FSDP2's CPU offload takes parameters that already live on the host.
            module.to_empty(device="cpu")
        module = shard_model(module, acc)
        if on_meta and M.is_random(spec.model):
            if not offload:
                module.to_empty(device=info.device)
            M.init_sharded_weights_(module, config.initializer_range, spec.optim.seed + info.rank)
    else:
        if on_meta and M.is_random(spec.model):
            module.to_empty(device=info.device)
            M.init_sharded_weights_(module, config.initializer_range, spec.optim.seed)
        module.to(info.device)
        # Trainable weights in the master dtype (bf16 autocast computes); frozen ones stay in the base dtype.
        for p in module.parameters():
            if p.requires_grad and p.dtype != masters:
                p.data = p.data.to(masters)
    M.reset_rotary_buffers_(module, info.device)
    return module, config, dtype, shape


# ---------------------------------------------------------------------------------------------- save
def save_result(module, spec: RunSpec, info: DistInfo, home: str, *, checkpointed: bool) -> str | None:
    """The LoRA adapter to ``<home>/adapter/`` (peft format; only the trainable weights are gathered).

    A full fine-tune's weights are the final checkpoint, which the merge streams into ``<home>/merged/``;
    without checkpoints (benchmarks, tests) rank 0 gathers the whole model there instead.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    lora = spec.method.kind == "lora"
    if not lora and checkpointed:
        return None
    if info.distributed:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
        full = get_model_state_dict(module, options=opts)
    else:
        full = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    if not info.is_main:
        return None
    sd = join_unit_tensors({k[len("lm."):]: v for k, v in full.items() if k.startswith("lm.")})
    lm = module.lm
    key = "adapter" if spec.method.kind == "lora" else "merged"
    with tempfile.TemporaryDirectory(prefix=f"gptoss-{key}-") as tmp:
        target = Path(home) / key if not is_remote(home) else Path(tmp)
        if spec.method.kind == "lora":
            lm.save_pretrained(str(target), state_dict=sd)
        else:
            M.hf_model(lm).save_pretrained(str(target), state_dict=sd)
        return _put_folder(target, home, key)


# -------------------------------------------------------------------------------------------- entry
def _oom_report(spec: RunSpec, shape, info: DistInfo) -> str:
    lines = [f"CUDA out of memory on rank {info.rank} ({torch.cuda.get_device_name(info.device)})"]
    try:
        from gptoss_cloud.contract.plan.memory import memory_plan

        lines.append("memory plan attempted: " + memory_plan(spec).summary())
    except Exception:  # a custom model whose shape the planner cannot read: report what we know
        lines.append(
            f"model {shape.name}: {shape.total_params / 1e9:.2f} B params ({M.bf16_bytes(shape) / 2**30:.1f} GiB bf16), "
            f"method {spec.method.kind}, {info.world_size} GPUs, max_seq_len {spec.data.max_seq_len}, "
            f"micro_batch {spec.optim.micro_batch_size}, activation_checkpointing {spec.parallelism.activation_checkpointing}, "
            f"cpu_offload {spec.parallelism.cpu_offload}"
        )
    lines.append(f"peak reserved {torch.cuda.max_memory_reserved(info.device) / 2**30:.1f} GiB")
    return "\n".join(lines)


def run_training(spec: RunSpec, run_id: str, home: str, *, datasets: Any = None,
                 checkpointer: CheckpointHooks | None = None, interactive: bool | None = None) -> dict:
    """Train ``spec`` as run ``run_id`` with its outputs under ``home``; returns the summary (all ranks).

    ``datasets`` (an object with ``train``/``validation`` lists of PackedSample) skips the data
    pipeline (benchmarks, tests); ``checkpointer`` is called by the loop (default: none). Rank 0 also
    reports to the trackers of ``output.report_to``, started before anything loads.
    """
    import os

    kw = dict(datasets=datasets, checkpointer=checkpointer, interactive=interactive)
    if not spec.output.report_to or os.environ.get("RANK", "0") != "0":
        return _train(spec, run_id, home, **kw)
    from gptoss_cloud.trainer.metrics import writer_for
    from gptoss_cloud.trainer.tracking import open_trackers

    trackers = open_trackers(spec, run_id, home)
    writer = writer_for(home)
    writer.listeners.append(trackers.on_record)
    ok = False
    try:
        summary = _train(spec, run_id, home, **kw)
        trackers.finish(summary)
        ok = True
        return summary
    finally:
        writer.listeners.remove(trackers.on_record)
        trackers.close(ok)


def _train(spec: RunSpec, run_id: str, home: str, *, datasets: Any, checkpointer: CheckpointHooks | None,
           interactive: bool | None) -> dict:
    t_start = time.perf_counter()
    info = init_distributed(spec.parallelism.collective_timeout_s)
    random.seed(spec.optim.seed)
    torch.manual_seed(spec.optim.seed)
    if info.device.type == "cuda":
        from gptoss_cloud.contract.plan.memory import check_fit

        check_fit(spec)  # refuse before any model loads
    if checkpointer is None:
        from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
        from gptoss_cloud.trainer.checkpoint.room import preflight

        if info.local_rank == 0:  # the store is reachable (and writable), and this node has room for two checkpoints
            preflight(spec, home, write=info.is_main)
        # The loop calls before_update() before each optimizer step, so async saves may stage in the background.
        checkpointer = Checkpointer(spec.checkpoint, home, spec=spec, overlap_staging=True)
    ds = datasets if datasets is not None else build_data(spec, info)
    train, val = list(ds.train), list(getattr(ds, "validation", None) or [])
    shape = M.model_shape(spec.model) if M.is_random(spec.model) else None
    try:
        module, config, dtype, shape = build_module(spec, info, home)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, spec.optim, info.device)
        loop = Loop(module=module, config=config, optimizer=optimizer, optim=spec.optim, info=info, samples=train,
                    val_samples=val, compute_dtype=dtype if info.device.type == "cuda" else torch.float32,
                    shuffle=spec.data.shuffle, checkpointer=checkpointer, step_split=spec.optim.step_split,
                    autocast=(info.device.type == "cuda" and not info.distributed and dtype == torch.bfloat16))
        metrics = None
        if info.is_main:
            metrics = Metrics(home, total_steps=loop.steps, log_every=spec.optim.log_every,
                              step_flops=step_flops(spec, shape, M.resolve_recompute(spec, info.device, shape)),
                              num_gpus=info.world_size if info.device.type == "cuda" else 0, device=info.device,
                              interactive=interactive)
            loop.on_step = metrics.on_step
            loop.on_eval = metrics.on_final_eval
        try:
            result = loop.run()
        finally:
            if metrics:
                metrics.close()
            checkpointer.close()  # an async save still in flight is published before we go on
        saved = save_result(module, spec, info, home, checkpointed=not isinstance(checkpointer, NoCheckpoints))
    except torch.OutOfMemoryError as e:
        raise GptossError(_oom_report(spec, shape, info),
                          hint="lower data.max_seq_len or optim.micro_batch_size, or turn on parallelism.activation_checkpointing / cpu_offload") from e
    trainable, total = LM.trainable_parameter_count(module)
    summary = {
        "run_id": run_id, "model": spec.model.name, "shape": shape.name, "method": spec.method.kind,
        "steps": result.steps, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
        "first_loss": result.history[0].loss if result.history else None,
        "trained_tokens": result.tokens, "train_seconds": round(result.seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "tokens_per_s": (sum(s.processed_tokens for s in result.history) / result.seconds) if result.seconds else None,
        "world_size": info.world_size, "device": str(info.device.type), "trainable_params": trainable,
        "output": saved, "base": join(home, "base") if M.is_random(spec.model) and M.bf16_bytes(shape) < M.SMALL_BASE_BYTES else None,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft")},
    }
    if info.is_main and spec.output.merge and not isinstance(checkpointer, NoCheckpoints):
        # Streams the final published checkpoint tensor by tensor into <home>/merged and/or merged-mxfp4, as
        # output.merge_format resolves (host memory bounded by a few tensors, never the model), so 120b
        # merges where it trained.
        from gptoss_cloud.contract.runs import merged_key
        from gptoss_cloud.trainer.merge.export import merge_run

        done = merge_run(home, lambda fmt, _: join(home, merged_key(fmt)), merge_format=spec.output.merge_format)
        summary["merged"], summary["merge"] = done[0].out, done[0].stats()  # wall time, bytes written, peak host memory
        summary["merged_formats"] = {res.format: res.out for res in done}
        for res in done:
            if metrics:
                metrics.on_merge(res.stats())
    if info.is_main and checkpointer.events:
        summary["checkpoints"] = checkpointer.events  # each save's timings and bytes (also in metrics.jsonl)
    if info.is_main:
        open_store(home).write_bytes("summary.json", json.dumps(summary, indent=2).encode())
    barrier(info)
    return summary


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
