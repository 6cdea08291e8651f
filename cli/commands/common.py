"""Options shared by several commands, and the one way commands resolve a spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gptoss_cloud.contract.spec import RunSpec, load_spec

SpecArg = Annotated[Optional[Path], typer.Argument(help="run spec YAML (see `gptoss-cloud init`); omitted: defaults + user config", show_default=False)]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="run store (s3://bucket/prefix or folder); overrides the spec's output.store and GPTOSS_STORE")]


def resolve(spec: Path | None, **overrides: Any) -> RunSpec:
    """Resolve a spec with CLI flags given as dotted keys (None = not given)."""
    return load_spec(spec, overrides={k.replace("__", "."): v for k, v in overrides.items()})
