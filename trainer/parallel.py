"""Process group and FSDP2 sharding through accelerate.

Only topology and rendezvous come from the environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); every other setting is in the spec. GPUs use NCCL, CPUs gloo (how CI
runs the 2-process tests). Each GptOssDecoderLayer is its own FSDP unit; accelerate also carves the
embedding and the output head (final norm + lm_head) into their own units.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from gptoss_cloud.contract.sections import ParallelismSection
from gptoss_cloud.trainer.kernels.expert_units import UNIT_CLASS, prefetch_units_

DECODER_LAYER = "GptOssDecoderLayer"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun described (a no-op for a single process)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # On GPUs, gloo beside NCCL for collectives over host tensors: with CPU offload the gradients
        # live on the host, and clipping all-reduces their norm there.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, local_world, device)


def offload_host_threads(info: DistInfo, setting: int | str = "auto") -> int:
    """With CPU offload the optimizer step runs on the host: give each rank its share of the cores.
    torchrun sets OMP_NUM_THREADS=1 per worker, which left the offloaded Adam step single-threaded
    (3.4 s of a 6.3 s step for the 20b shape at 6 layers on two H100s). The cores are those the process
    may use within its container's CPU limit. ``setting`` is ``parallelism.cpu_threads`` (a number overrides)."""
    from gptoss_cloud.contract.hostinfo import usable_cpus

    n = int(setting) if setting != "auto" else max(1, usable_cpus() // max(1, info.local_world_size))
    torch.set_num_threads(n)
    return n


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def make_accelerator(par: ParallelismSection, info: DistInfo, bf16: bool, ram_efficient_loading: bool = False,
                     bf16_masters: bool = False):
    """An accelerate Accelerator holding the FSDP2 plugin built from ``parallelism``.

    bf16 compute with fp32 gradient reduction when ``bf16``; plain fp32 otherwise (CPU tests).
    ``bf16_masters`` (optim.master_weights: bf16): the trainable weights stay bf16 shards, which
    accelerate would otherwise upcast to fp32 whenever its mixed precision is on; on CPU they are
    gathered in fp32, so CPU runs still compute in fp32.
    Activation checkpointing is applied by the model (transformers' non-reentrant checkpointing per
    decoder layer), not here, so the single-process path uses the same recomputation.
    """
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif bf16_masters:
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        # parallelism.expert_units > 1: each layer's experts are further units (trainer/kernels/expert_units.py).
        transformer_cls_names_to_wrap=[DECODER_LAYER] + ([UNIT_CLASS] if par.expert_units > 1 else []),
        reshard_after_forward=par.reshard_after_forward,
        cpu_offload=CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if par.cpu_offload else False,
        mixed_precision_policy=mp,
        activation_checkpointing=False,
        cpu_ram_efficient_loading=ram_efficient_loading,
        state_dict_type="SHARDED_STATE_DICT",
    )
    # mixed_precision "no" with bf16 masters: the plugin's policy above still casts for compute.
    acc = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16" if bf16 and not bf16_masters else "no",
                      cpu=info.device.type == "cpu")
    if getattr(acc.state, "fsdp_plugin", None) is None:
        # accelerate switches to its FSDP mode only for accelerator devices; the FSDP2 wrapping itself
        # is device-agnostic and is what the 2-process gloo tests exercise on CPU.
        acc.state.fsdp_plugin = plugin
    return acc


def shard_model(model: nn.Module, accelerator) -> nn.Module:
    """fully_shard each decoder layer, the embedding, the output head and the root (accelerate's FSDP2 path)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    model = fsdp2_prepare_model(accelerator, model)
    prefetch_units_(model)
    return model
