"""Ask a trained run one question: load its model, render the prompt with harmony, decode greedily.

Which weights: the run's merged folder when it wrote one (``merged/`` in bf16 first, as trained; else
``merged-mxfp4/``, which transformers dequantises to bf16 on load); else the base (``base/`` in the run home, or the
spec's model) with ``adapter/`` on top. The prompt is rendered the way the data pipeline renders
training conversations (same system message fields from ``spec.data``), so a trained answer comes back
for a trained question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.sections import DataSection
from gptoss_cloud.contract.store.objects import join


@dataclass
class Reply:
    final: str | None                 # the final channel; None when the output did not parse
    analysis: str = ""                # the analysis channel (thinking)
    raw_text: str = ""                # the decoded completion, special tokens included
    tokens: list[int] = field(default_factory=list)
    source: str = ""                  # which weights answered
    problem: str | None = None        # why parsing failed


def encoding():
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def system_content(data: DataSection, reasoning_effort: str | None = None):
    """The system message fields training used (spec.data), optionally with another reasoning effort."""
    from openai_harmony import ReasoningEffort, SystemContent

    sc = SystemContent.new().with_reasoning_effort(ReasoningEffort((reasoning_effort or data.reasoning_effort).capitalize()))
    # Exactly the fields training rendered: a null cutoff or date is left out, never defaulted.
    sc.knowledge_cutoff = data.knowledge_cutoff
    sc.conversation_start_date = data.conversation_date
    if data.model_identity:
        sc.model_identity = data.model_identity
    return sc


def prompt_tokens(enc, data: DataSection, prompt: str, reasoning_effort: str | None = None) -> list[int]:
    from openai_harmony import Conversation, Message, Role

    conv = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, system_content(data, reasoning_effort)),
        Message.from_role_and_content(Role.USER, prompt),
    ])
    return list(enc.render_conversation_for_completion(conv, Role.ASSISTANT))


def parse_reply(enc, tokens: list[int]) -> Reply:
    """Split a completion into its analysis and final channels (harmony's own parser)."""
    from openai_harmony import HarmonyError, Role

    raw = enc.decode(tokens)
    try:
        messages = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    except HarmonyError as e:
        return Reply(final=None, raw_text=raw, tokens=tokens, problem=str(e))
    analysis, final = [], []
    for m in messages:
        text = "".join(getattr(c, "text", "") for c in m.content)
        (final if m.channel == "final" else analysis if m.channel == "analysis" else []).append(text)
    if not final:
        return Reply(final=None, analysis="\n".join(analysis), raw_text=raw, tokens=tokens, problem="no final-channel message")
    return Reply(final="\n".join(final), analysis="\n".join(analysis), raw_text=raw, tokens=tokens)


# ---------------------------------------------------------------------------------------- weights
def _local_dir(home: str, sub: str, run_id: str, signed: bool) -> Path | None:
    """A run-home folder on local disk, verified against its manifest: a local home in place, an S3
    one downloaded once into the cache."""
    import os

    from gptoss_cloud.contract.store.fetch import local_output

    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "gptoss-cloud" / "runs" / run_id / sub
    return local_output(join(home, sub), cache, signed=signed)


def load_run_model(home: str, spec: RunSpec, *, device: str | None = None):
    """(model, source) for a run: merged/, else base (base/ or the spec's model) + adapter/."""
    import torch
    from transformers import AutoModelForCausalLM

    run_id = home.rstrip("/").rsplit("/", 1)[-1]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on GPUs; fp32 on CPU, where bf16 matmuls are slow and greedy argmax ties are likelier.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    from gptoss_cloud.contract.outputs import spec_says_signed

    from gptoss_cloud.contract.runs import merged_key

    signed = spec_says_signed(spec)
    for fmt in ("bf16", "mxfp4"):   # bf16 first: the trained weights exactly
        merged = _local_dir(home, merged_key(fmt), run_id, signed)
        if merged is not None:
            return _load_merged(merged, dtype, mxfp4=fmt == "mxfp4").to(device).eval(), join(home, merged_key(fmt))
    adapter = _local_dir(home, "adapter", run_id, signed)
    base_dir = _local_dir(home, "base", run_id, signed)
    if base_dir is not None:
        base, base_src = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), join(home, "base")
    elif adapter is not None:
        base, base_src = _load_base_from_spec(spec, dtype), f"model {spec.model.name}"
    else:
        raise GptossError(
            f"run {home} has no merged/, merged-mxfp4/ or adapter/ yet",
            hint="wait for the run to finish (status shows it), or merge a checkpoint: gptoss-cloud merge RUN",
        )
    if adapter is None:
        return base.to(device).eval(), base_src
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter))
    return model.to(device).eval(), f"{base_src} + {join(home, 'adapter')}"


def _load_merged(folder: Path, dtype, *, mxfp4: bool):
    """A merged folder; MXFP4 experts dequantised by transformers' own Mxfp4 integration (its ``dequantize``)."""
    from transformers import AutoModelForCausalLM

    if not mxfp4:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    from transformers import Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True))


def _load_base_from_spec(spec: RunSpec, dtype):
    """The published (or given) base weights the adapter was trained on, loaded the way the trainer
    loads them: fetched once into the cache, MXFP4 experts dequantized."""
    from gptoss_cloud.trainer import model as M
    from gptoss_cloud.trainer.weights import fetch_pretrained, load_state_dict, read_config

    if M.is_random(spec.model):
        raise GptossError(f"run has an adapter on a random {spec.model.name!r} base but no base/ folder to rebuild it from")
    folder = fetch_pretrained(spec.model.name, revision=spec.model.revision, cache_dir=spec.model.cache_dir)
    shape = M.model_shape(spec.model, read_config(folder))
    hf = M.create_model(M.build_config(shape, "eager", "eager"), dtype, "meta")
    missing, unexpected = hf.load_state_dict(load_state_dict(folder, dtype), strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" or not shape.tie_word_embeddings]
    if missing or unexpected:
        raise GptossError(f"weights in {folder} do not match GPT-OSS {shape.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    M.reset_rotary_buffers_(hf)
    return hf


# ---------------------------------------------------------------------------------------- decoding
def greedy(model, tokens: list[int], stop: list[int], max_new_tokens: int) -> list[int]:
    import torch

    dev = next(model.parameters()).device
    ids = torch.tensor([tokens], device=dev)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=stop, pad_token_id=stop[0],
        )
    return out[0, len(tokens):].tolist()


def chat_once(home: str, spec: RunSpec, prompt: str, *, max_new_tokens: int = 256,
              reasoning_effort: str | None = None, model: Any = None) -> Reply:
    enc = encoding()
    source = "given model"
    if model is None:
        model, source = load_run_model(home, spec)
    toks = prompt_tokens(enc, spec.data, prompt, reasoning_effort)
    completion = greedy(model, toks, enc.stop_tokens_for_assistant_actions(), max_new_tokens)
    reply = parse_reply(enc, completion)
    reply.source = source
    return reply
