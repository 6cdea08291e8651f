"""The harmony vocabulary (o200k_harmony), loaded once per process through openai-harmony."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from gptoss_cloud.contract.errors import DataError

VOCAB_FILE = "o200k_base.tiktoken"
PAD_ID = 199999  # <|endoftext|>: never produced by the harmony renderer, so safe as padding


@functools.lru_cache(maxsize=1)
def load_encoding():
    """The HARMONY_GPT_OSS encoding. Offline machines need TIKTOKEN_ENCODINGS_BASE (see DataError's hint)."""
    from openai_harmony import HarmonyEncodingName, HarmonyError, load_harmony_encoding

    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    hint = (
        f"set TIKTOKEN_ENCODINGS_BASE to a folder holding {VOCAB_FILE} "
        "(https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken)"
    )
    if base and not (Path(base).expanduser() / VOCAB_FILE).is_file():
        raise DataError(f"TIKTOKEN_ENCODINGS_BASE={base} has no {VOCAB_FILE}", hint=hint)
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as e:
        raise DataError(f"could not load the harmony vocabulary ({e})", hint=hint) from e


@functools.lru_cache(maxsize=1)
def vocab_hash() -> str:
    """Identifies vocabulary + renderer: part of the tokenized-data cache key.

    Hashing a rendered probe (not just the file) also catches a renderer change in another
    openai-harmony release that would alter token ids for the same conversation.
    """
    from importlib.metadata import version

    from openai_harmony import Conversation, Message, Role, SystemContent

    enc = load_encoding()
    probe = Conversation.from_messages(
        [
            Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
            Message.from_role_and_content(Role.USER, "héllo wörld 123 <tag> 🙂"),
            Message.from_role_and_content(Role.ASSISTANT, "ok").with_channel("final"),
        ]
    )
    h = hashlib.sha256()
    h.update(f"openai-harmony=={version('openai-harmony')}|{enc.name}|".encode())
    h.update(",".join(map(str, enc.render_conversation_for_training(probe))).encode())
    return h.hexdigest()[:16]
