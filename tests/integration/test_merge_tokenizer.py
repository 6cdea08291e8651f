"""The generated Hugging Face tokenizer encodes exactly like openai-harmony, chat template included."""

from __future__ import annotations

import openai_harmony as h
import pytest

pytest.importorskip("transformers")

SAMPLES = [
    "Hello world!",
    "I'm   fine\n\n  thanks — 12345 ünïcødé 日本語 🙂",
    "def f(x):\n\treturn x**2  # comment\r\n",
    "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>hey<|return|>",
]


def test_ids_and_chat_template_match_harmony(tmp_path):
    from transformers import AutoTokenizer

    from gptoss_cloud.trainer.hf_tokenizer import write_tokenizer

    write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    enc = h.load_harmony_encoding(h.HarmonyEncodingName.HARMONY_GPT_OSS)
    for text in SAMPLES:
        assert tok.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all"), text
    assert len(tok) == 199998 + len(enc.special_tokens_set)
    assert tok.eos_token == "<|return|>" and tok.pad_token_id == 199999

    conv = h.Conversation.from_messages([
        h.Message.from_role_and_content(h.Role.SYSTEM, h.SystemContent.new()),
        h.Message.from_role_and_content(h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions("Be brief.")),
        h.Message.from_role_and_content(h.Role.USER, "What is 2+2?"),
    ])
    want = enc.render_conversation_for_completion(conv, h.Role.ASSISTANT)
    got = tok.apply_chat_template([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
                                  add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if not isinstance(got, list) else got
    assert got == want
