"""Activation offloading: the tensors autograd saves outside the recomputed decoder layers live in host memory
between forward and backward (``parallelism.activation_offload``).

With recomputation on, what a step keeps on the GPU from forward to backward is mostly each decoder
layer's input (layers x tokens x hidden x 2 bytes: 138 KB per token for 20b) plus what the head saves
(the final norm's fp32 input, the loss's hidden-state gradient). Those are exactly the tensors saved
while no checkpoint's own hooks are active: torch's non-reentrant checkpoint saves a region's inputs
through ``_CheckpointFrame.save_inputs`` (``torch._C._autograd._make_saved_tensor``, a SavedVariable,
which applies the default saved-tensor hooks) *before* it pushes its ``_checkpoint_hook``
(torch/utils/checkpoint.py, ``_checkpoint_without_reentrant_generator``, torch 2.13; earlier versions
saved them through the autograd Function ``_NoopSaveInputs``, also outside those hooks); inside a region
the checkpoint's hooks are on top of the stack and win. So one ``saved_tensors_hooks`` context around
the whole forward catches the layer inputs and the head's tensors and nothing inside the layers, and
backward (outside the context) unpacks them one layer at a time, as the recomputation asks for them.

What is kept on the device: parameters and views of parameters (matmuls save their weights; copying
those would move the model), and tensors under ``MIN_OFFLOAD_BYTES`` (indices, scalars: a transfer
each would cost more than it saves). A tensor saved twice (the final RMSNorm saves its fp32 input for
two ops) is copied once. Copies go to pinned memory with ``non_blocking`` (asynchronous to the host,
ordered on the compute stream, so backward's copy back always sees finished data); torch's caching
host allocator keeps the pinned blocks for the next step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

MIN_OFFLOAD_BYTES = 1 << 20  # 1 MiB: smaller saved tensors stay where they are


@dataclass
class OffloadStats:
    """What one forward packed: tensors copied to the host, their bytes, tensors left on the device."""

    offloaded: int = 0
    offloaded_bytes: int = 0
    kept: int = 0
    kept_parameters: int = 0
    reused: int = 0  # saves of a tensor already copied
    offloaded_shapes: list = field(default_factory=list)  # (shape, dtype) of each copy, in packing order


def is_parameter_storage(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (``weight.t()`` saved by a matmul)."""
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


class offload_saved_tensors(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: tensors saved for backward inside it are copied to (pinned) host memory and copied
    back to their device when backward needs them. ``stats`` counts what was packed (tests, logs)."""

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.stats = stats = OffloadStats()
        # id and version of a tensor already copied -> (a weak reference to it, its packed copy); the
        # reference tells a live tensor from a new one that reuses a freed id.
        copied: dict[tuple[int, int], tuple[weakref.ref, tuple]] = {}

        def pack(t: torch.Tensor):
            if is_parameter_storage(t):
                stats.kept += 1
                stats.kept_parameters += 1
                return t
            nbytes = t.numel() * t.element_size()
            if nbytes < min_bytes or t.is_sparse:
                stats.kept += 1
                return t
            key = (id(t), t._version)
            hit = copied.get(key)
            if hit is not None and hit[0]() is t:
                stats.reused += 1
                return hit[1]
            pin = t.is_cuda
            host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            stats.offloaded += 1
            stats.offloaded_bytes += nbytes
            stats.offloaded_shapes.append((tuple(t.shape), t.dtype))
            packed = (t.device, host)
            copied[key] = (weakref.ref(t), packed)
            return packed

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)
        self._copied = copied

    def __exit__(self, *exc) -> None:
        self._copied.clear()  # the packed copies live on in autograd's saved variables, not here
        super().__exit__(*exc)
