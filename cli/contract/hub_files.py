"""Which files of a published GPT-OSS repository are fetched: the HF-format shards, their index, the
configs and the tokenizer, and never ``original/`` or ``metal/`` (the same weights in other formats,
which would more than double a 120b download and overflow the node's cache volume).

One list for the training pods' init container (``hf download --include``), the trainer and the merge
(``snapshot_download(allow_patterns=...)``) and the S3 mirror copy. Patterns are fnmatch-style as the
hub client applies them to the repo-relative path, where ``*`` also matches ``/``: each pattern
therefore starts with a literal top-level name, so nothing below a folder can match.
"""

from __future__ import annotations

from fnmatch import fnmatch

WEIGHT_INCLUDE = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def wanted(path: str) -> bool:
    """Whether a repo-relative path is one of the files fetched."""
    return "/" not in path and any(fnmatch(path, p) for p in WEIGHT_INCLUDE)
