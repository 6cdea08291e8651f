"""Shared test setup: the offline harmony vocabulary and the ../shared reference files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import REPO, SHARED, shared_path

# openai-harmony downloads its vocabulary on first use unless this points at a folder with it.
if not os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(shared_path("tokenizers"))
# Never let a test touch the developer's real user config.
os.environ["GPTOSS_CONFIG"] = str(REPO / "tests" / "no-user-config.yaml")


@pytest.fixture
def shared() -> Path:
    return SHARED


@pytest.fixture(autouse=True)
def _clean_gptoss_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("GPTOSS_") and k not in ("GPTOSS_CONFIG", "GPTOSS_SHARED_DIR", "GPTOSS_VLLM_PYTHON"):
            monkeypatch.delenv(k, raising=False)
