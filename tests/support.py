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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
