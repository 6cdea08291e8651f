"""A Hugging Face tokenizer equivalent to GPT-OSS's harmony encoding, built offline.

For random or tiny bases there are no tokenizer files to copy, so we build them: the o200k_base BPE
vocabulary (the file openai-harmony itself reads from TIKTOKEN_ENCODINGS_BASE) converted by
transformers' TikTokenConverter, plus the harmony special tokens exactly as openai-harmony numbers
them. ``tests`` check the ids against openai-harmony on sample text. The chat template renders
system / developer / user / assistant (final and analysis channels) messages in harmony format.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
from pathlib import Path

# o200k_base's pre-tokenizer pattern (the one tiktoken publishes for this encoding).
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
VOCAB_FILE = "o200k_base.tiktoken"

# Harmony chat template: a system message (identity, cutoff, reasoning effort, channels), developer
# instructions, then the turns; an assistant's "thinking" goes to the analysis channel.
CHAT_TEMPLATE = (
    "{%- set effort = reasoning_effort | default('medium') -%}"
    "<|start|>system<|message|>{{ model_identity | default('You are ChatGPT, a large language model trained by OpenAI.') }}\n"
    "Knowledge cutoff: {{ knowledge_cutoff | default('2024-06') }}\n\n"
    "Reasoning: {{ effort }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' or m.role == 'developer' -%}"
    "<|start|>developer<|message|># Instructions\n\n{{ m.content }}<|end|>"
    "{%- elif m.role == 'user' -%}"
    "<|start|>user<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if m.thinking and loop.last -%}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{%- endif -%}"
    "<|start|>assistant<|channel|>final<|message|>{{ m.content }}{{ '<|return|>' if loop.last and not add_generation_prompt else '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def vocab_path() -> Path:
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if not base or not (Path(base) / VOCAB_FILE).is_file():
        from gptoss_cloud.contract.errors import GptossError

        raise GptossError(f"no {VOCAB_FILE} under TIKTOKEN_ENCODINGS_BASE={base!r}",
                          hint="point TIKTOKEN_ENCODINGS_BASE at a folder holding the o200k_base vocabulary")
    return Path(base) / VOCAB_FILE


def _load_bpe(path: str | Path) -> dict[bytes, int]:
    # The tiktoken format: one "base64(token) rank" per line (no need for the tiktoken package).
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def harmony_specials() -> list[tuple[int, str]]:
    import openai_harmony as h

    enc = h.load_harmony_encoding(h.HarmonyEncodingName.HARMONY_GPT_OSS)
    return sorted((enc.encode(t, allowed_special="all")[0], t) for t in enc.special_tokens_set)


@functools.lru_cache(maxsize=1)  # converting 200k BPE ranks takes seconds: once per process
def build_tokenizer():
    """A PreTrainedTokenizerFast with the harmony vocabulary and special tokens."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(_load_bpe)

    specials = harmony_specials()
    path = vocab_path()
    n_vocab = len(_load_bpe(path))
    ids = [i for i, _ in specials]
    if ids != list(range(n_vocab, n_vocab + len(ids))):  # the vocabulary file is input: an error, not an assert
        from gptoss_cloud.contract.errors import GptossError

        raise GptossError(f"{path}: {n_vocab} BPE ranks, but harmony's special tokens start at {ids[0] if ids else None}; "
                          "they must follow the ranks directly (is this the o200k_base vocabulary?)",
                          hint="point TIKTOKEN_ENCODINGS_BASE at a folder holding the o200k_base.tiktoken GPT-OSS uses")
    tok = _Converter(vocab_file=str(path), pattern=O200K_PATTERN, extra_special_tokens=[t for _, t in specials]).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>",
        model_max_length=131072, chat_template=CHAT_TEMPLATE,
    )


def _cache_dir() -> Path:
    import hashlib

    h = hashlib.sha256(vocab_path().read_bytes()).hexdigest()[:12]
    # Node layout, not a training setting (the entry is keyed by the vocabulary's hash): GPTOSS_CACHE_DIR
    # may move it, as XDG_CACHE_HOME would, without changing any tokenizer written from it.
    root = Path(os.environ.get("GPTOSS_CACHE_DIR", Path.home() / ".cache" / "gptoss-cloud"))
    return root / f"harmony-tokenizer-{h}-v1"


def write_tokenizer(out_dir: str | Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (built once, then cached on disk)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = _cache_dir()
    if not (cache / "tokenizer.json").is_file():
        stage = cache.with_name(cache.name + f".tmp{os.getpid()}")
        stage.mkdir(parents=True, exist_ok=True)
        build_tokenizer().save_pretrained(str(stage))
        if not (stage / "chat_template.jinja").exists():
            (stage / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        cfg_path = stage / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        try:
            os.replace(stage, cache)  # atomic: concurrent builders never see half a folder
        except OSError:  # another process won the race
            shutil.rmtree(stage, ignore_errors=True)
    names = sorted(p.name for p in cache.iterdir())
    for name in names:
        shutil.copyfile(cache / name, out / name)
    return names
