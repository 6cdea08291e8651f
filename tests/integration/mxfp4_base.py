"""A tiny GPT-OSS published the way openai/gpt-oss-20b is: experts as ``*_blocks``/``*_scales`` MXFP4,
everything else bf16, two safetensors shards with ``model.safetensors.index.json``, and a config.json
declaring ``quantization_config`` (quant_method mxfp4). Plus runs trained over it, checkpointed by the
real Checkpointer, for the MXFP4 export tests."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from gptoss_cloud.contract.shapes import TINY
from gptoss_cloud.trainer.kernels.mxfp4 import quantize_expert_weight
from gptoss_cloud.trainer.merge.mxfp4 import QUANTIZATION_CONFIG, is_expert_weight

VOCAB = 1024
# The preset's widths (64: multiples of 32, as MXFP4 needs), a small vocabulary to keep logits cheap.
SHAPE = replace(TINY, vocab_size=VOCAB, max_position_embeddings=4096)


def tiny_config(**over):
    from transformers import GptOssConfig

    kw = SHAPE.hf_config_dict()
    kw.update(pad_token_id=VOCAB - 1, eos_token_id=VOCAB - 2, **over)
    return GptOssConfig(**kw)


def write_published_base(folder: Path, seed: int = 0, config=None) -> dict[str, torch.Tensor]:
    """The base on disk; returns its tensors as stored (names -> bf16 or uint8 tensors)."""
    from safetensors.torch import save_file
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    config = config or tiny_config()
    model = GptOssForCausalLM(config).float()
    with torch.no_grad():  # transformers zeroes the biases; give every tensor something to carry
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
            elif n.endswith("router.weight"):
                # Clear routing margins, as trained routers have: bf16 rounding of a merged weight then
                # never flips an expert choice (a near-tie would turn rounding into a different expert).
                p.normal_(0, 0.5)
    stored: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if is_expert_weight(name):
            stored[name + "_blocks"], stored[name + "_scales"] = quantize_expert_weight(t)
        else:
            stored[name] = t.to(torch.bfloat16).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(stored)
    halves = {"model-00000-of-00002.safetensors": [n for n in names if ".layers.0." in n],
              "model-00001-of-00002.safetensors": [n for n in names if ".layers.0." not in n]}
    for fname, keys in halves.items():
        save_file({k: stored[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in stored.values())},
             "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = config.to_dict()
    cfg.update(architectures=["GptOssForCausalLM"], torch_dtype="bfloat16", dtype="bfloat16",
               quantization_config=dict(QUANTIZATION_CONFIG))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return stored


def load_base(folder: Path):
    """The base as training sees it: transformers dequantises its experts (fp32 on the CPU)."""
    from gptoss_cloud.trainer.merge.verify import load_merged

    return load_merged(folder)


def lora_run(home: Path, base: Path, *, expert_layers: list[int] | None = None, merge_format: str = "auto", seed: int = 1,
             spec: dict | None = None):
    """A LoRA checkpoint over ``base`` (attention and router; the experts of ``expert_layers`` too), its
    adapter nudged away from zero so the merge changes what it targets. Returns the trained model."""
    from peft import LoraConfig, get_peft_model

    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer

    params = ["mlp.router.weight"] + [f"layers.{i}.mlp.experts.{w}" for i in expert_layers or () for w in ("gate_up_proj", "down_proj")]
    model = get_peft_model(load_base(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        target_parameters=params))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    lora = {"experts": bool(expert_layers), "expert_layers": expert_layers, "router": True}
    spec = RunSpec.model_validate({"method": {"kind": "lora", "lora": lora}, "output": {"merge_format": merge_format},
                                   **(spec or {})})
    ck = Checkpointer(spec.checkpoint, str(home), spec=spec, record_metrics=False)
    ck.save(1, {"model": model})
    ck.close()
    return model.eval()


def full_run(home: Path, base: Path, *, merge_format: str = "auto", seed: int = 2):
    """A full fine-tune checkpoint (fp32 masters) started from ``base``, every weight moved a little."""
    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer

    model = load_base(base)
    model.config.dtype = torch.float32
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    spec = RunSpec.model_validate({"method": {"kind": "full"}, "output": {"merge_format": merge_format}})
    ck = Checkpointer(spec.checkpoint, str(home), spec=spec, record_metrics=False)
    ck.save(1, {"model": model})
    ck.close()
    return model.eval()


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder, through its index, as stored."""
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(index.values())):
        with safe_open(str(folder / f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    assert set(out) == set(index), "the index names exactly the stored tensors"
    return out
