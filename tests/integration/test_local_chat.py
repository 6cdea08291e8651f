"""`chat`: which weights a run answers with, the harmony prompt, greedy decoding and parsing."""

from __future__ import annotations

import pytest
import torch
import transformers
from typer.testing import CliRunner

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.main import app
from gptoss_cloud.contract.spec import load_spec


def tiny_model(seed: int = 0):
    """A small random GPT-OSS with the real 201,088-token vocabulary (harmony's special tokens)."""
    cfg = transformers.GptOssConfig(
        vocab_size=201088, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(seed)
    return transformers.GptOssForCausalLM(cfg).eval()


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "store" / "chat-20250101-000000-abcd"
    h.mkdir(parents=True)
    spec = load_spec(overrides={"output.store": str(tmp_path / "store"), "data.reasoning_effort": "low"})
    (h / "spec.yaml").write_text(spec.to_yaml())
    return h


def test_prompt_is_the_training_system_message_then_the_user_turn(home):
    from gptoss_cloud.trainer.chat import encoding, prompt_tokens

    enc = encoding()
    spec = load_spec(overrides={"data.reasoning_effort": "low", "data.conversation_date": "2025-06-28"})
    text = enc.decode(prompt_tokens(enc, spec.data, "What is 2+2?"))
    assert text.startswith("<|start|>system<|message|>")
    assert "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: low" in text
    assert text.endswith("<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant")
    assert "Reasoning: high" in enc.decode(prompt_tokens(enc, spec.data, "x", reasoning_effort="high"))
    bare = load_spec(overrides={"data.knowledge_cutoff": None})
    bare.data.knowledge_cutoff = None
    assert "Knowledge cutoff" not in enc.decode(prompt_tokens(enc, bare.data, "x"))


@pytest.mark.parametrize("overrides", [
    {},
    {"data.reasoning_effort": "high", "data.conversation_date": "2025-06-28", "data.model_identity": "You are Oona."},
    {"data.knowledge_cutoff": None},
])
def test_prompt_is_exactly_what_training_saw_before_the_answer(overrides):
    """The trained tokens of a conversation start with chat's prompt, then the answer follows."""
    from gptoss_cloud.trainer.chat import encoding, prompt_tokens
    from gptoss_cloud.trainer.data import IGNORE, tokenize_row

    data = load_spec(overrides=overrides).data
    (seq,) = tokenize_row({"messages": [{"role": "user", "content": "What is 2+2?"},
                                        {"role": "assistant", "content": "4"}]}, data)
    enc = encoding()
    prompt = prompt_tokens(enc, data, "What is 2+2?")
    assert seq.input_ids[: len(prompt)] == prompt
    assert all(x == IGNORE for x in seq.labels[: len(prompt)])   # the prompt itself is never trained
    assert enc.decode(seq.input_ids[len(prompt):]).startswith("<|channel|>final<|message|>4")


def test_parse_splits_analysis_and_final():
    from gptoss_cloud.trainer.chat import encoding, parse_reply

    enc = encoding()
    done = enc.encode("<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
                      allowed_special="all")
    r = parse_reply(enc, done)
    assert (r.final, r.analysis, r.problem) == ("4", "Add them.", None)
    r = parse_reply(enc, enc.encode("4 <|return|>", allowed_special="all"))
    assert r.final is None and r.problem and r.raw_text == "4 <|return|>"


def test_chat_answers_from_merged_and_warns_on_unparsable_output(home):
    tiny_model().save_pretrained(home / "merged")
    r = CliRunner().invoke(app, ["chat", str(home), "--prompt", "Hello", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "merged" in r.stderr
    # a random model does not speak harmony: the raw completion is shown with a warning
    assert "not a complete harmony message" in r.stderr
    assert r.stdout.strip()


def test_base_plus_adapter_decodes_like_the_model_that_was_trained(home):
    from peft import LoraConfig, get_peft_model

    from gptoss_cloud.contract.runs import read_run_spec
    from gptoss_cloud.trainer.chat import chat_once

    base = tiny_model(seed=1)
    base.save_pretrained(home / "base")
    # init_lora_weights=False: B is random, so the adapter really changes the outputs
    trained = get_peft_model(tiny_model(seed=1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trained.save_pretrained(home / "adapter")
    spec = read_run_spec(str(home))
    expected = chat_once(str(home), spec, "Hi", max_new_tokens=6, model=trained.eval())
    plain = chat_once(str(home), spec, "Hi", max_new_tokens=6, model=base)
    got = chat_once(str(home), spec, "Hi", max_new_tokens=6)
    assert got.tokens == expected.tokens and got.tokens != plain.tokens
    assert got.source.endswith("/base + " + str(home / "adapter"))


def test_adapter_on_a_pretrained_base_loads_the_base_from_the_spec(home, tmp_path):
    """No base/ in the home: the spec's model (here a local folder) is loaded as the trainer loads it."""
    from peft import LoraConfig, get_peft_model

    from gptoss_cloud.trainer.chat import chat_once

    tiny_model(seed=2).save_pretrained(tmp_path / "pretrained")
    trained = get_peft_model(tiny_model(seed=2), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    trained.save_pretrained(home / "adapter")
    spec = load_spec(overrides={"model.name": str(tmp_path / "pretrained"), "model.init": "pretrained",
                                "output.store": str(home.parent)})
    expected = chat_once(str(home), spec, "Hi", max_new_tokens=5, model=trained.eval())
    got = chat_once(str(home), spec, "Hi", max_new_tokens=5)
    assert got.tokens == expected.tokens
    assert got.source == f"model {tmp_path / 'pretrained'} + {home / 'adapter'}"


def test_chat_before_any_weights_exist_is_a_clear_error(home):
    r = CliRunner().invoke(app, ["chat", str(home), "--prompt", "Hello"])
    assert isinstance(r.exception, GptossError) and "has no merged/, merged-mxfp4/ or adapter/ yet" in str(r.exception)
    r = CliRunner().invoke(app, ["chat", str(home), "--prompt", "Hello", "--reasoning-effort", "max"])
    assert isinstance(r.exception, GptossError) and "--reasoning-effort must be low, medium or high" in str(r.exception)


def save_mxfp4(model, folder) -> dict:
    """``model`` in the release's MXFP4 layout (experts as *_blocks / *_scales, config with its quantization_config)."""
    import json

    from safetensors.torch import save_file

    from gptoss_cloud.trainer.kernels.mxfp4 import quantize_expert_weight

    model.save_pretrained(folder)
    tensors = {}
    for k, v in model.state_dict().items():
        if ".experts." in k and k.endswith(("gate_up_proj", "down_proj")):
            tensors[k + "_blocks"], tensors[k + "_scales"] = quantize_expert_weight(v.float())
        else:
            tensors[k] = v.contiguous()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return tensors


def test_chat_answers_from_merged_mxfp4_dequantised_by_transformers(home):
    from gptoss_cloud.trainer.chat import load_run_model
    from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_expert_weight

    (home / "merged-mxfp4").mkdir()
    tensors = save_mxfp4(tiny_model(), home / "merged-mxfp4")
    r = CliRunner().invoke(app, ["chat", str(home), "--prompt", "Hello", "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output
    assert "merged-mxfp4" in r.stderr
    model, source = load_run_model(str(home), load_spec(), device="cpu")
    assert source.endswith("merged-mxfp4")
    k = "model.layers.1.mlp.experts.down_proj"
    # e2m1 codes times powers of two are exact in bf16 and fp32: transformers' dequantisation must equal ours exactly.
    want = dequantize_expert_weight(tensors[k + "_blocks"], tensors[k + "_scales"], dtype=torch.float32)
    torch.testing.assert_close(model.state_dict()[k], want, rtol=0, atol=0)
    tiny_model(seed=1).save_pretrained(home / "merged")   # a bf16 merge too: chat takes the trained weights as they are
    assert load_run_model(str(home), load_spec(), device="cpu")[1].endswith("/merged")
