"""Helpers the tests import by name (conftest modules are not importable unambiguously)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

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


def vllm_python() -> str:
    """The python of the vLLM CPU build's own virtualenv (GPTOSS_VLLM_PYTHON, built by scripts/vllm_env.sh).
    Missing, a developer's run skips the real-vLLM tests with the command that builds it; CI fails instead:
    .ci/run builds it before pytest, so a missing one there is a broken CI, never a skip."""
    import pytest

    py = os.environ.get("GPTOSS_VLLM_PYTHON")
    if py and Path(py).is_file():
        return py
    why = (f"GPTOSS_VLLM_PYTHON={py!r} is not a python" if py else "GPTOSS_VLLM_PYTHON is not set") + \
          ": build the vLLM environment with `export GPTOSS_VLLM_PYTHON=$(scripts/vllm_env.sh)`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(why + " (.ci/run does this before pytest)")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_ms(fn, steps: int = 10, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn`` on the current CUDA device, between CUDA events after warm-up calls."""
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps
