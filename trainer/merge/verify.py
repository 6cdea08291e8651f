"""Check a merged folder against the training model: the same logits on harmony prompts, within a stated tolerance.

An MXFP4 folder is compared with the training-time model whose expert weights are ``dequant(quant(w))``:
what the export writes, whether it quantised them or copied the base's bytes (a copied tensor is
``dequant(b)`` and requantising it gives ``b`` back, ``kernels.mxfp4``), so only the bf16 rounding of the
other tensors remains, as for a bf16 merge."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
import torch
from gptoss_cloud.contract.store.fetch import download_prefix
from gptoss_cloud.contract.outputs import open_output
from gptoss_cloud.contract.store.objects import is_remote, open_store
from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError
from gptoss_cloud.trainer.merge.base import Source
from gptoss_cloud.trainer.merge.export import hf_name, log
from gptoss_cloud.trainer.merge.sink import write_adapter


def harmony_prompts(vocab: int) -> list[list[int]]:
    import openai_harmony as h

    enc = h.load_harmony_encoding(h.HarmonyEncodingName.HARMONY_GPT_OSS)
    out = []
    for text in ("What is the capital of France?", "Write a haiku about checkpoints.", "Call the weather tool for Paris."):
        conv = h.Conversation.from_messages([h.Message.from_role_and_content(h.Role.USER, text)])
        ids = enc.render_conversation_for_completion(conv, h.Role.ASSISTANT)
        out.append([i % vocab for i in ids])  # small test vocabularies: keep ids in range
    return out


def verify_merged(out: str, src: Source, base_dir: Path | None, adapter_cfg: str | None, tmp: Path) -> float:
    """Load the merged folder with transformers and compare logits with the training-time model."""
    from transformers import GptOssForCausalLM

    local = Path(out)
    if is_remote(out):
        local = tmp / "verify"
        s = open_store(out)
        download_prefix(s, "", local, where=out, manifest=open_output(s, signed_spec=src.signed))
    merged = load_merged(local)
    ref = _training_model(src, base_dir, adapter_cfg, merged.config)
    if json.loads((local / "config.json").read_text()).get("quantization_config"):  # dequantised: the model's config no longer says
        ref = as_exported_mxfp4(ref.merge_and_unload() if adapter_cfg else ref)
    ref = ref.eval()
    worst = 0.0
    with torch.no_grad():
        for ids in harmony_prompts(merged.config.vocab_size):
            x = torch.tensor([ids])
            a, b = merged(input_ids=x).logits, ref(input_ids=x).logits
            worst = max(worst, (a - b).abs().max().item())
    saved = json.loads((local / "config.json").read_text()).get("dtype")
    tol = 1e-4 if saved == "float32" else 5e-2  # fp32 merges match to rounding; bf16 to bf16 precision
    if worst > tol:
        raise CheckpointError(f"merged model {out} differs from the training-time model: max |logit diff| {worst:.3g} > {tol}")
    log.info("verified %s: max |logit diff| %.3g on %d harmony prompts", out, worst, 3)
    return worst


def load_merged(folder: Path):
    """A merged folder in transformers, fp32 on the CPU. An MXFP4 folder's experts are dequantised by
    transformers' own Mxfp4 integration (``Mxfp4Config(dequantize=True)``: no hub kernels)."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    cfg = json.loads((folder / "config.json").read_text())
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if cfg.get("quantization_config") else {}
    return GptOssForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager", **kw).eval()


def as_exported_mxfp4(model):
    """``model`` with every expert weight replaced by dequant(quant(w)), in place: the MXFP4 export's experts."""
    from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_expert_weight, quantize_expert_weight

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                p.copy_(dequantize_expert_weight(*quantize_expert_weight(p), dtype=p.dtype))
    return model


def _training_model(src: Source, base_dir: Path | None, adapter_cfg: str | None, config):
    """The model as training saw it, built independently of the merge path (for --verify)."""
    from transformers import GptOssForCausalLM

    if adapter_cfg is None:
        model = GptOssForCausalLM(config).float()
        ent = src.model_entries()
        loaded = src.load(list(ent))
        model.load_state_dict({hf_name(k): v.float() for k, v in loaded.items()}, strict=True)
        return model
    from peft import PeftModel

    base = load_merged(base_dir)  # a published base's MXFP4 experts dequantised
    ad = Path(tempfile.mkdtemp(prefix="gptoss-verify-adapter-"))
    write_adapter(src, json.loads(adapter_cfg), str(ad), ad)
    return PeftModel.from_pretrained(base, str(ad))
