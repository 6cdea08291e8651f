"""The MXFP4 export against vLLM's own gpt-oss MXFP4 loader, imported from the real vLLM CPU build.

vLLM 0.32's CPU build cannot run an MXFP4 gpt-oss on this machine: on CPU the only MXFP4 MoE backend is
``Mxfp4MoeBackend.CPU`` (``_get_priority_backends_for_gpt_oss`` / ``backend_to_kernel_cls`` in
``vllm/model_executor/layers/fused_moe/oracle/mxfp4.py``), whose ``CPUExpertsMxfp4._supports_current_device``
(``fused_moe/experts/cpu_moe.py``) needs x86 with AMX tiles, and the emulation backend is Triton on
CUDA/XPU only (``TritonExperts._supports_current_device``, ``fused_moe/experts/triton_moe.py``). So this
checks what can be checked without running it, with vLLM's code rather than a copy of it:

- ``GptOssMxfp4Config.override_quantization_method`` (``layers/quantization/mxfp4.py``) claims the
  folder's config as ``gpt_oss_mxfp4``, so ``GptOssModel.load_weights`` takes ``_load_weights_mxfp4``;
- every tensor name, mapped by ``GptOssForCausalLM.hf_to_vllm_mapper`` (``models/gpt_oss.py``), lands on
  a parameter of vLLM's model: expert tensors on the ``w13_*``/``w2_*`` parameters that
  ``GptOssMxfp4MoEMethod.create_weights`` makes (uint8 weights and scales, bf16 biases), in the shapes
  ``_load_weights_mxfp4`` views them in (``w13_weight``: ``view(E, 2 * I, -1)``, ``w2_weight``:
  ``view(E, -1, I // 2)``, scales and biases as stored), and every other tensor exactly as in the bf16
  merge, which the real-vLLM serving test serves.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from mxfp4_base import SHAPE, lora_run, write_published_base  # noqa: E402
from support import vllm_python  # noqa: E402

from gptoss_cloud.trainer.merge.export import merge  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

PROBE = r"""
import json, sys, types
import torch
from safetensors import safe_open
from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4Config, GptOssMxfp4MoEMethod
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

folder, E, H, I = sys.argv[1], *map(int, sys.argv[2:5])
cfg = json.load(open(folder + "/config.json"))
method = GptOssMxfp4Config.override_quantization_method(cfg.get("quantization_config"), None,
                                                        hf_config=types.SimpleNamespace(model_type=cfg["model_type"]))
index = json.load(open(folder + "/model.safetensors.index.json"))["weight_map"]
stored = {}
for f in sorted(set(index.values())):
    with safe_open(folder + "/" + f, "pt") as h:
        for k in h.keys():
            s = h.get_slice(k)
            stored[k] = [list(s.get_shape()), s.get_dtype()]
mapped = {k: GptOssForCausalLM.hf_to_vllm_mapper.map_name(k) for k in stored}
# The expert parameters vLLM makes for this shape: its own create_weights on a bare module (the method's
# constructor picks a kernel backend, which this CPU lacks; create_weights reads only these two facts).
moe = GptOssMxfp4MoEMethod.__new__(GptOssMxfp4MoEMethod)
moe.moe = types.SimpleNamespace(w13_num_shards=2, has_bias=True)
layer = torch.nn.Module()
moe.create_weights(layer, num_experts=E, hidden_size=H, intermediate_size_per_partition=I, params_dtype=torch.bfloat16)
params = {n: [list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in layer.named_parameters()}
print(json.dumps({"method": method, "stored": stored, "mapped": mapped, "params": params}))
"""


def _probe(folder: pathlib.Path) -> dict:
    e, h, i = SHAPE.num_local_experts, SHAPE.hidden_size, SHAPE.intermediate_size
    r = subprocess.run([vllm_python(), "-c", PROBE, str(folder), str(e), str(h), str(i)], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, VLLM_LOGGING_LEVEL="ERROR"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_vllm_gpt_oss_mxfp4_loader_takes_every_tensor_of_the_export(tmp_path):
    base = tmp_path / "base"
    write_published_base(base)
    home = tmp_path / "run"
    lora_run(home, base)
    merge(str(home), str(home / "merged-mxfp4"), fmt="mxfp4", base=str(base))
    merge(str(home), str(home / "merged"), fmt="bf16", base=str(base), dtype="bfloat16")
    mx, dense = _probe(home / "merged-mxfp4"), _probe(home / "merged")
    assert mx["method"] == "gpt_oss_mxfp4"
    assert dense["method"] is None  # a bf16 folder is not claimed (no quantization_config)
    e, h, i = SHAPE.num_local_experts, SHAPE.hidden_size, SHAPE.intermediate_size
    # _load_weights_mxfp4: how each expert tensor is viewed before it is copied into its parameter.
    views = {"w13_weight": lambda s: [s[0], 2 * i, s[1] * s[2] * s[3] // (2 * i)],
             "w2_weight": lambda s: [s[0], s[1] * s[2] * s[3] * 2 // i, i // 2]}
    vllm_dtype = {"U8": "uint8", "BF16": "bfloat16"}
    expert_params = set()
    for name, (shape, dtype) in mx["stored"].items():
        target = mx["mapped"][name]
        assert target is not None, f"vLLM drops {name}"
        if ".mlp.experts." not in name:
            assert dense["stored"][name] == [shape, dtype] and dense["mapped"][name] == target, name
            continue
        param = target.rsplit(".", 1)[-1]
        assert target == f"{name.rsplit('.experts.', 1)[0]}.experts.{param}", (name, target)
        want_shape, want_dtype = mx["params"][param]
        assert views.get(param, lambda s: s)(shape) == want_shape, (name, shape, want_shape)
        assert vllm_dtype[dtype] == want_dtype, (name, dtype, want_dtype)
        expert_params.add(param)
    assert expert_params == set(mx["params"]) == {"w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale",
                                                   "w13_bias", "w2_bias"}
    assert set(mx["stored"]) - {k for k in mx["stored"] if ".mlp.experts." in k} == \
        set(dense["stored"]) - {k for k in dense["stored"] if ".mlp.experts." in k}
