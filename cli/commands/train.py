"""`train` (what every pod runs under torchrun) and `chat` (ask a trained run one question)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.commands.common import StoreOpt, resolve


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("chat")(chat)


def train(
    spec: Annotated[Path, typer.Argument(help="the resolved run spec (what `submit` wrote to <home>/spec.yaml)", show_default=False)],
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="run id (required under torchrun with several processes, so every rank writes the same home)")] = None,
) -> None:
    """Train on this node (run it under torchrun; `submit` does that for you)."""
    from gptoss_cloud.contract.runs import check_run_id, new_run_id, run_home
    from gptoss_cloud.contract.spec import check_pod_environ, read_resolved_spec

    check_pod_environ(os.environ)  # before anything else: the spec is trained as written
    s = read_resolved_spec(spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if run_id is None:
        if world > 1:
            raise SpecError(f"--run-id is required when WORLD_SIZE={world}: every rank must write the same run home")
        run_id = new_run_id(s.name)
    check_run_id(run_id)
    run_home(s.output.store, run_id)  # a store URI that cannot hold runs fails here, before torch loads

    # Exactly what `python -m gptoss_cloud.trainer` does (records spec.yaml, trains via run_training,
    # tears the process group down, reports errors as one line), so both entry points behave the same.
    from gptoss_cloud.trainer.__main__ import main as trainer_main  # lazy: torch

    raise typer.Exit(trainer_main([str(spec), "--run-id", run_id]))


def chat(
    run: Annotated[str, typer.Argument(help="run id (looked up in the store) or the full URI/path of a run home", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="the user message")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="stop after this many tokens")] = 256,
    reasoning_effort: Annotated[Optional[str], typer.Option("--reasoning-effort", help="low | medium | high (default: the spec's data.reasoning_effort)")] = None,
    show_thinking: Annotated[bool, typer.Option("--show-thinking", help="also print the analysis channel (dimmed)")] = False,
    store: StoreOpt = None,
) -> None:
    """Answer one user message with a trained run's model (greedy decoding through harmony)."""
    from rich.console import Console

    from gptoss_cloud.contract.runs import read_run_spec
    from gptoss_cloud.contract.runs import resolve_run

    if reasoning_effort is not None and reasoning_effort not in ("low", "medium", "high"):
        raise SpecError(f"--reasoning-effort must be low, medium or high, not {reasoning_effort!r}")
    run_id, home = resolve_run(run, resolve(None, output__store=store).output.store)
    spec = read_run_spec(home)

    from gptoss_cloud.trainer.chat import chat_once  # lazy: torch, transformers

    reply = chat_once(home, spec, prompt, max_new_tokens=max_new_tokens, reasoning_effort=reasoning_effort)
    con = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[dim]{run_id}: {reply.source}[/]")
    if show_thinking and reply.analysis:
        con.print(reply.analysis, style="dim", markup=False)
    if reply.final is not None:
        con.print(reply.final, markup=False)
    else:
        err.print(f"[yellow]warning:[/] the model's output is not a complete harmony message ({reply.problem}); raw text follows")
        con.print(reply.raw_text, markup=False)
