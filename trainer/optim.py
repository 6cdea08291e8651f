"""The optimizer a spec names: torch's fused AdamW, or torchao's AdamW with low-bit moments.

``optim.name``: ``adamw`` (fp32 moments) or ``adamw_8bit`` (moments quantised to 8 bits in blocks of
256, dynamic-tree code book, one fp32 scale per block). ``optim.master_weights: bf16``
keeps the trainable weights in bf16 and rounds each update stochastically, so updates smaller than a
bf16 step still move the weights on average; the moments are computed in fp32 inside the step either way.

torchao's states are tensor subclasses (wrapped in DTensor for FSDP2's sharded parameters) that
torch.distributed.checkpoint saves and loads like plain tensors; docs/optimizers.md says what was
checked (bit-exact resume, 2 ranks -> 1) and why torchao rather than bitsandbytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from gptoss_cloud.contract.sections import OptimSection
from torch import nn

# spec name -> torchao.optim class
LOW_BIT = {"adamw_8bit": "AdamW8bit"}
MASTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def master_dtype(optim: OptimSection) -> torch.dtype:
    """The dtype trainable weights are kept (and updated) in."""
    return MASTER_DTYPES[optim.master_weights]


def make_optimizer(params: Sequence[nn.Parameter], optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    params = list(params)
    if optim.name == "adamw":
        # Fused: one kernel over all parameters instead of a loop per tensor (CUDA and, since torch 2.4, CPU).
        return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                 weight_decay=optim.weight_decay, fused=device.type in ("cuda", "cpu"))
    return _low_bit(params, optim, device)


def _low_bit(params: list[nn.Parameter], optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    try:
        import torchao.optim as ao
    except ImportError as e:
        raise RuntimeError(f"optim.name {optim.name} needs torchao: pip install 'gptoss-cloud[train]'") from e
    want = master_dtype(optim)
    wrong = sorted({str(p.dtype) for p in params if p.dtype != want})
    if wrong:
        # Stochastic rounding applies only to bf16 weights, and fp32 masters must not be bf16 already.
        raise ValueError(f"optim.master_weights is {optim.master_weights} but trainable weights are {', '.join(wrong)}")
    cls = _wrapped(getattr(ao, LOW_BIT[optim.name]), eager=device.type == "cpu")
    return cls(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
               bf16_stochastic_round=optim.master_weights == "bf16")


def _wrapped(cls: type, eager: bool) -> type:
    """``cls`` with a float learning rate between steps and, if ``eager``, its step run without torch.compile.

    torchao keeps the learning rate as a 0-d tensor (so that a changed rate does not recompile its step);
    the scheduler would then hold tensors too, and the checkpoint's scheduler state is JSON. Here the
    groups hold floats, as torch's AdamW's do, and the step sees them as tensors.

    Eager: torchao compiles its per-parameter step once per parameter shape. On a GPU that is a one-off
    cost paid back every step; on a CPU (tests, the local demo) Inductor's C++ build takes tens of seconds
    per shape on a few cores while the eager step of a small model takes milliseconds. The stance is
    scoped to this optimizer's step; nothing else stops compiling.
    """

    class Wrapped(cls):  # type: ignore[misc, valid-type]
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            for g in self.param_groups:
                g["lr"] = float(g["lr"])

        @torch.no_grad()
        def step(self, closure=None):
            rates = [g["lr"] for g in self.param_groups]
            for g in self.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]))
            try:
                with torch.compiler.set_stance("force_eager") if eager else nullcontext():
                    return super().step(closure)
            finally:
                for g, lr in zip(self.param_groups, rates):
                    g["lr"] = lr

        def _new_buffer(self, p, signed):
            if not eager or p.dtype == torch.float32:
                return super()._new_buffer(p, signed)
            # The moments of a bf16 weight appear as bf16 tensors; eager DTensor dispatch (torch 2.13) then
            # refuses the step's fp32 lerp on them, which only the compiled step gets past. Moments that
            # appear as fp32 hold the same 8-bit codes and scales.
            return super()._new_buffer(p.detach().float(), signed)

    Wrapped.__name__ = Wrapped.__qualname__ = cls.__name__
    return Wrapped
