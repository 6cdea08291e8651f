"""Shared test setup: the offline harmony vocabulary and the ../shared reference files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPTOSS_SHARED_DIR", REPO.parent / "shared")).resolve()


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        raise RuntimeError(
            f"missing reference file {p}: the tests read ../shared beside the repository "
            "(or set GPTOSS_SHARED_DIR to a folder holding tokenizers/, k8s/, models/)"
        )
    return p


# openai-harmony downloads its vocabulary on first use unless this points at a folder with it.
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(shared_path("tokenizers")))
# Never let a test touch the developer's real user config.
os.environ["GPTOSS_CONFIG"] = str(REPO / "tests" / "no-user-config.yaml")


@pytest.fixture
def shared() -> Path:
    return SHARED


@pytest.fixture(autouse=True)
def _clean_gptoss_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("GPTOSS_") and k not in ("GPTOSS_CONFIG", "GPTOSS_SHARED_DIR"):
            monkeypatch.delenv(k, raising=False)
