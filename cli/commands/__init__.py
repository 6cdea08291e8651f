"""Command groups. Each module exposes ``register(app)``; heavy imports stay inside the commands."""

from __future__ import annotations

import importlib

import typer

# Order here is the order in `--help`.
MODULES = [
    "spec_cmds",
    "run",
    "data",
    "plan",
    "train",
    "serve",
    "report",
    "eval",
    "render",
    "lifecycle",
    "merge",
    "bench",
    "rehearse",
]


def register_all(app: typer.Typer) -> None:
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)
