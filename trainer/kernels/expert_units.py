"""A layer's experts as several FSDP2 units (``parallelism.expert_units``).

FSDP2 gathers, and after backward reduce-scatters, one unit at a time, and a unit is a module with the
parameters it owns. transformers keeps all of a layer's experts in one module (``GptOssExperts``: two
(E, in, out) matrices and their biases), so the layer is the unit and its buffers are a layer's size: for
120b 3.2 B parameters, ~6 GiB gathered in bf16, twice in flight (current + prefetch), plus the layer's
unsharded gradient in bf16 and its fp32 copy for the reduce-scatter (~18 GiB). ``SplitExperts`` holds
experts ``[first, first + n)`` in each ``ExpertUnit`` child instead, so every buffer is one unit's, a
``1 / expert_units`` share of the experts (cli/contract/plan/memory.py counts it the same way).

The math is ``experts.experts_forward``'s: one routing over all experts (sorted by expert id), then each
unit runs its contiguous run of sorted rows through its two grouped GEMMs and the clamped SwiGLU. Each
unit is *called* (its ``forward`` takes the rows and returns their outputs), which is what FSDP2 hooks:
its pre-forward all-gathers the unit, its post-forward reshards it, and the rows' autograd edge runs
its post-backward reduce-scatter as soon as the unit's gradients are complete. Slicing the rows needs
the per-unit row counts on the host: one device-to-host read of ``expert_units`` numbers per layer call
(the MXFP4 experts' chunked path reads the offsets the same way).

Checkpoints hold the units' tensors under their own names (``...experts.units.U.gate_up_proj``, rows
``[first, first + n)`` of the transformers tensor); :func:`join_unit_entries` maps them back for the
merge, so exports and every reader outside the trainer see transformers' names and shapes.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from gptoss_cloud.trainer.kernels.experts import (
    COMPILE_ATTR, clamped_swiglu, compute_dtype, grouped_mm, route, routed_bias, unpermute_sum,
)

UNIT_CLASS = "ExpertUnit"  # the class name FSDP2 wraps (trainer/parallel.py)
PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
_UNIT_KEY = re.compile(r"^(?P<head>.*\.experts)\.units\.(?P<unit>\d+)\.(?P<name>" + "|".join(PARAMS) + r")$")


class ExpertUnit(nn.Module):
    """Experts ``[first, first + n)`` of one layer, with their own parameters: one FSDP2 unit."""

    def __init__(self, gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor, down_proj: torch.Tensor,
                 down_proj_bias: torch.Tensor, first: int, requires_grad: bool = True):
        super().__init__()
        self.first = first
        for name, t in zip(PARAMS, (gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias)):
            setattr(self, name, nn.Parameter(t, requires_grad=requires_grad))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor, alpha: float, limit: float,
                compile_activation: bool) -> torch.Tensor:
        """Rows sorted by expert (this unit's run of them; ``offsets`` local cumulative counts,
        ``expert_ids`` local ids) -> their expert outputs in the compute dtype, before the routing weights.
        The compute dtype is read here, where FSDP2 has gathered the unit in its ``param_dtype``."""
        dtype = compute_dtype(x, self.gate_up_proj.dtype)
        x = x.to(dtype)
        if x.shape[0] == 0:
            # No rows on this rank: the parameters still get (zero) gradients, so that every rank
            # reduce-scatters the same tensors.
            touch = sum(getattr(self, p).sum() for p in PARAMS).to(dtype)
            return x.new_zeros(0, self.down_proj.shape[-1]) + 0 * touch
        h = grouped_mm(x, self.gate_up_proj.to(dtype), offsets) + routed_bias(self.gate_up_proj_bias, expert_ids, dtype)
        a = clamped_swiglu(h, alpha, limit, compile_activation)
        return grouped_mm(a, self.down_proj.to(dtype), offsets) + routed_bias(self.down_proj_bias, expert_ids, dtype)


class SplitExperts(nn.Module):
    """Drop-in for ``GptOssExperts`` (same call, same math) whose experts live in ``units``."""

    def __init__(self, experts: nn.Module, units: int):
        super().__init__()
        e = experts.num_experts
        if units < 1 or e % units:
            raise ValueError(f"parallelism.expert_units: {units} must divide the layer's {e} experts evenly")
        self.num_experts, self.hidden_size, self.intermediate_size = e, experts.hidden_size, experts.intermediate_size
        self.alpha, self.limit = experts.alpha, experts.limit
        setattr(self, COMPILE_ATTR, getattr(experts, COMPILE_ATTR, True))
        n = e // units
        trainable = experts.gate_up_proj.requires_grad
        self.units = nn.ModuleList()
        for u in range(units):
            # clone: the unit owns its rows, and the layer-sized tensor is freed once every unit is built.
            parts = [getattr(experts, p).detach()[u * n:(u + 1) * n] for p in PARAMS]
            parts = [t if t.device.type == "meta" else t.clone() for t in parts]
            self.units.append(ExpertUnit(*parts, first=u * n, requires_grad=trainable))

    # Eager under compiled decoder layers: the row counts are a host read, and the units' FSDP2 hooks run
    # around calls that dynamo would otherwise have to split the graph at anyway.
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor):
        num_tokens, k = router_indices.shape
        r = route(router_indices, self.num_experts)
        x = hidden_states[r.token_idx]
        n = self.num_experts // len(self.units)
        ends = [0] + r.offsets[n - 1::n].tolist()  # rows per unit: the one host read
        compiled = getattr(self, COMPILE_ATTR, True)
        outs = []
        for u, unit in enumerate(self.units):
            start, end = ends[u], ends[u + 1]
            # Every unit is called, even with no rows: FSDP2 then gathers, reshards and reduces each unit
            # once per step on every rank, as its collectives require.
            outs.append(unit(x[start:end], r.offsets[u * n:(u + 1) * n] - start, r.expert_ids[start:end] - u * n,
                             self.alpha, self.limit, compiled))
        y = torch.cat(outs) if len(outs) > 1 else outs[0]
        y = y * routing_weights.reshape(-1)[r.perm].to(y.dtype).unsqueeze(-1)
        return unpermute_sum(y, r, num_tokens, k).to(hidden_states.dtype)


def split_experts_(model: nn.Module, units: int) -> int:
    """Replace every dense ``GptOssExperts`` of ``model`` by a ``SplitExperts`` of ``units`` units (in place,
    on any device, meta included). Returns how many layers were split; ``units == 1`` changes nothing."""
    if units == 1:
        return 0
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssMLP

    count = 0
    for mod in list(model.modules()):
        if isinstance(mod, GptOssMLP) and isinstance(mod.experts, GptOssExperts):
            mod.experts = SplitExperts(mod.experts, units)
            count += 1
    return count


def unit_key(name: str) -> tuple[str, int, str] | None:
    """``...experts.units.U.gate_up_proj`` -> (``...experts.gate_up_proj``, U, ``gate_up_proj``); else None."""
    m = _UNIT_KEY.match(name)
    return (f"{m['head']}.{m['name']}", int(m["unit"]), m["name"]) if m else None


def join_unit_entries(entries: dict[str, tuple[tuple, torch.dtype]]) -> tuple[dict, dict[str, list[str]]]:
    """Checkpoint entries (name -> (shape, dtype)) with each layer's unit tensors joined under the
    transformers name (shape: the units' rows stacked), and for each joined name its parts in row order.
    A checkpoint whose units are incomplete or disagree in shape is refused by name."""
    out: dict[str, tuple[tuple, torch.dtype]] = {}
    parts: dict[str, dict[int, str]] = {}
    for name, (shape, dtype) in entries.items():
        key = unit_key(name)
        if key is None:
            out[name] = (shape, dtype)
            continue
        joined, unit, _ = key
        parts.setdefault(joined, {})[unit] = name
    ordered: dict[str, list[str]] = {}
    for joined, by_unit in parts.items():
        if joined in out or sorted(by_unit) != list(range(len(by_unit))):
            raise ValueError(f"checkpoint tensors for {joined}: units {sorted(by_unit)} are not 0..{len(by_unit) - 1}"
                             + (" and the joined name is present too" if joined in out else ""))
        names = [by_unit[u] for u in range(len(by_unit))]
        shapes = [entries[n][0] for n in names]
        dtypes = {entries[n][1] for n in names}
        if len({s[1:] for s in shapes}) != 1 or len(dtypes) != 1:
            raise ValueError(f"checkpoint tensors for {joined}: the units disagree in shape or dtype ({shapes}, {dtypes})")
        out[joined] = ((sum(s[0] for s in shapes), *shapes[0][1:]), dtypes.pop())
        ordered[joined] = names
    return out, ordered


def prefetch_units_(model: nn.Module) -> int:
    """After ``fully_shard``: each split layer gathers its first unit in its own pre-forward and each unit
    the next one in its pre-forward. Without this the first unit's all-gather would start only after the
    host read of the row counts (the queue is drained then), with nothing left to hide it behind.
    Returns how many layers were set up."""
    from torch.distributed.fsdp import FSDPModule

    count = 0
    for layer in model.modules():
        if not isinstance(layer, FSDPModule) or isinstance(layer, ExpertUnit):
            continue
        split = [m for m in layer.modules() if isinstance(m, SplitExperts)]
        if len(split) != 1 or not all(isinstance(u, FSDPModule) for u in split[0].units):
            continue
        units = list(split[0].units)
        layer.set_modules_to_forward_prefetch([units[0]])
        for a, b in zip(units, units[1:]):
            a.set_modules_to_forward_prefetch([b])
        count += 1
    return count


def join_unit_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole (gathered) state dict with each layer's unit tensors joined under the transformers name."""
    joined, parts = join_unit_entries({k: (tuple(v.shape), v.dtype) for k, v in sd.items()})
    return {k: torch.cat([sd[p] for p in parts[k]]) if k in parts else sd[k] for k in joined}
