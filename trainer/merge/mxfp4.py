"""The MXFP4 layout of a merged folder (``merged-mxfp4/``): the experts as the published GPT-OSS
checkpoints store them, everything else as the bf16 merge writes it.

Each expert matrix ``model.layers.N.mlp.experts.{gate_up_proj,down_proj}`` (transformers' dense
``(experts, in, out)``) becomes ``<name>_blocks`` uint8 ``(experts, out, in/32, 16)`` and ``<name>_scales``
uint8 e8m0 ``(experts, out, in/32)``; the expert biases stay ``<name>_bias`` and every other tensor
(attention, router, sinks, norms, embeddings, head) stays dense, in bf16 unless ``--dtype`` says
float32. ``config.json`` declares the published ``quantization_config`` block, so transformers
(``quantizers/quantizer_mxfp4.py``) and vLLM (``GptOssMxfp4Config`` in
``model_executor/layers/quantization/mxfp4.py``) load the experts as MXFP4 and everything else as is.

An expert weight that no adapter touched, over a base that holds it in MXFP4, is copied byte for byte
(its blocks and scales are the base's); every other expert weight is quantised with
``kernels.mxfp4.quantize_mxfp4`` (as ``quantize_expert_weight`` does, in slices) from the merged weight
in the dtype the run computed in.
Streaming: one expert tensor is quantised at a time, and its scales wait only until the writer asks
for them (they follow their blocks in the plan).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.trainer.kernels.mxfp4 import GROUP, quantize_mxfp4
from gptoss_cloud.trainer.merge.base import BaseWeights

# The block openai/gpt-oss-20b and -120b declare in config.json (their published config; the copy in
# ../shared/models/gpt-oss-20b/config.json leaves quantization_config out): the experts are MXFP4,
# these modules are not converted.
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}
PACKED = ("_blocks", "_scales")
_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)")

Entry = tuple[str, tuple, torch.dtype]


def is_expert_weight(name: str) -> bool:
    """An expert matrix the MXFP4 layout packs (not its bias)."""
    return _EXPERT.fullmatch(name) is not None


def quantization_config() -> dict:
    return {k: list(v) if isinstance(v, list) else v for k, v in QUANTIZATION_CONFIG.items()}


def packed_entries(name: str, shape: tuple, where: str) -> list[Entry]:
    """The blocks and scales that replace the dense expert weight ``name`` of ``shape`` (experts, in, out)."""
    if len(shape) != 3:
        raise GptossError(f"{where}: expert weight {name} has shape {tuple(shape)}, not (experts, in, out)")
    e, cin, cout = (int(d) for d in shape)
    if cin % GROUP:
        raise GptossError(f"{where}: {name} {tuple(shape)} has {cin} input features, not a multiple of {GROUP}: "
                          f"MXFP4 shares one scale among {GROUP} of them", hint="merge with --format bf16")
    return [(name + "_blocks", (e, cout, cin // GROUP, GROUP // 2), torch.uint8),
            (name + "_scales", (e, cout, cin // GROUP), torch.uint8)]


def quantize_in_chunks(w: torch.Tensor, max_elems: int = 1 << 22, device: torch.device | str | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_expert_weight``, a slice of one expert's output features at a time, into preallocated
    outputs: the quantiser's temporaries (float copies, int64 codes: ~30 bytes a weight) then exist for
    ~4 M weights, never for a whole expert tensor (120b: 2.1 G weights per layer and projection).

    ``device`` is where the slices are quantised (default: a CUDA GPU when there is one, else ``w``'s device);
    the codes land on ``w``'s device. Every operation of the quantiser is exact (power-of-two scaling,
    comparisons, bit operations), so the bytes are the same on every device (tests/gpu/test_mxfp4_export_gpu.py);
    a merge on a training node with a GPU quantises there instead of on the host's cores."""
    e, cin, cout = w.shape
    dev = torch.device(device) if device is not None else (torch.device("cuda") if torch.cuda.is_available() else w.device)
    blocks = torch.empty(e, cout, cin // GROUP, GROUP // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(e, cout, cin // GROUP, dtype=torch.uint8, device=w.device)
    rows = max(1, max_elems // cin)
    for i in range(e):
        for r0 in range(0, cout, rows):
            b, s = quantize_mxfp4(w[i, :, r0:r0 + rows].to(dev, non_blocking=False).transpose(0, 1))
            blocks[i, r0:r0 + rows], scales[i, r0:r0 + rows] = b.to(w.device), s.to(w.device)
    return blocks, scales


class Mxfp4Layout:
    """Turns the bf16 merge's plan (name, shape, dtype) and tensor getter into the MXFP4 folder's."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, base: BaseWeights | None = None):
        self.dtype = dtype  # every tensor but the packed experts
        self.base = base
        self.copied: set[str] = set()  # expert weights whose bytes come from the base
        self._pending: dict[str, torch.Tensor] = {}

    def plan(self, entries: list[Entry], adapted: Callable[[str], bool], where: Callable[[str], str]) -> list[Entry]:
        """The MXFP4 folder's tensors. ``adapted(name)``: whether the merge changed that weight (then it is
        quantised); ``where(name)``: the file a tensor comes from, for errors. Everything is checked here,
        before the first byte is written."""
        out: list[Entry] = []
        for name, shape, dtype in entries:
            if not is_expert_weight(name):
                out.append((name, shape, self.dtype if dtype.is_floating_point else dtype))
                continue
            packed = packed_entries(name, shape, where(name))
            if not adapted(name) and self.base is not None and self.base.is_packed(name):
                stored = self.base.packed_shapes(name)
                if stored != (packed[0][1], packed[1][1]):
                    raise GptossError(f"{where(name)}: the base stores {name} as blocks {stored[0]} and scales "
                                      f"{stored[1]}, but its config makes it {tuple(shape)} (blocks {packed[0][1]})")
                self.copied.add(name)
            out += packed
        return out

    def getter(self, get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
        """``get`` (dense tensors by transformers name) -> the tensors ``plan`` named."""

        def packed_or_dense(name: str) -> torch.Tensor:
            if name in self._pending:
                return self._pending.pop(name)
            dense, suffix = name[:-len("_blocks")], name[-len("_blocks"):]
            if suffix not in PACKED or not is_expert_weight(dense):
                t = get(name)
                return t.to(self.dtype) if t.is_floating_point() else t
            blocks, scales = self.base.packed(dense) if dense in self.copied else quantize_in_chunks(get(dense))
            mine, other = (blocks, scales) if suffix == "_blocks" else (scales, blocks)
            self._pending[dense + PACKED[suffix == "_blocks"]] = other.contiguous()
            return mine.contiguous()

        return packed_or_dense
