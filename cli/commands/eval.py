"""`eval RUN --data HELD_OUT`: held-out loss with its breakdowns, and harmony checks on generated replies,
from the model loaded here or (`--endpoint URL`) through the vLLM server serving it."""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.commands.common import StoreOpt, resolve

# The variable `serve` tells you to export (Kubernetes: from its Secret) and vLLM itself reads.
DEFAULT_KEY_ENV = "VLLM_API_KEY"


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_run)


def eval_run(
    run: Annotated[str, typer.Argument(help="run id (looked up in the store) or the full URI/path of a run home", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="held-out rows (.jsonl/.json/.parquet file or s3:// URI), in the training row format")],
    checkpoint: Annotated[Optional[int], typer.Option("--checkpoint", min=1, help="evaluate this checkpoint step (merged for the occasion) instead of the run's model")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="rows whose last prompt is answered and checked")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="token limit of each generated reply")] = 256,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="evaluate through this vLLM OpenAI server (the URL `serve` prints) instead of loading the model here")] = None,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help=f"with --endpoint: the environment variable holding its API key (default: {DEFAULT_KEY_ENV} when set)")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", min=1, help="with --endpoint: seconds to wait for each answer (default 300)")] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", min=1, max=64, help="with --endpoint: requests in flight at once, batched by vLLM (default 8); the numbers do not depend on it")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="table | json")] = "table",
    store: StoreOpt = None,
) -> None:
    """Evaluate a trained run on held-out rows: loss by reasoning effort and span kind, and generation checks
    (final ends with <|return|>, tool-call arguments match their schema, no control-token leaks, analysis present)."""
    from gptoss_cloud.contract.runs import read_run_spec
    from gptoss_cloud.contract.runs import resolve_run

    if output not in ("table", "json"):
        raise SpecError(f"-o/--output must be table or json, not {output!r}")
    if endpoint is None and (api_key_env is not None or timeout is not None or concurrency is not None):
        raise SpecError("--api-key-env, --timeout and --concurrency apply to an --endpoint: give the endpoint too")
    if endpoint is not None and checkpoint is not None:
        raise SpecError("--checkpoint and --endpoint: a checkpoint is merged and evaluated here, an endpoint evaluates "
                        "the model its server was started with; give one of them")
    run_id, home = resolve_run(run, resolve(None, output__store=store).output.store)
    spec = read_run_spec(home)

    from gptoss_cloud.trainer.evaluation.run_home import run_eval  # lazy: torch, transformers

    client = None
    if endpoint is not None:
        from gptoss_cloud.trainer.evaluation.endpoint import Endpoint, base_url

        client = Endpoint(base_url(endpoint), api_key=_api_key(api_key_env))
        if timeout is not None:
            client.timeout_s = timeout
        if concurrency is not None:
            client.concurrency = concurrency
    res = run_eval(run_id, home, spec, data, checkpoint=checkpoint, samples=samples, max_new_tokens=max_new_tokens,
                   endpoint=client)
    if output == "json":
        typer.echo(json.dumps(res, indent=1))
        return
    _print_table(res)


def _api_key(env: str | None) -> str | None:
    """The key from the named variable (which must be set), else from $VLLM_API_KEY if set, else none."""
    if env is None:
        return os.environ.get(DEFAULT_KEY_ENV) or None
    key = os.environ.get(env, "")
    if not key:
        raise SpecError(f"--api-key-env {env}: the variable is not set or empty")
    return key


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False, soft_wrap=True)
    con.print(f"[bold]{res['run_id']}[/] step {res['step']}: {res['model']}\n  data: {res['data']} "
              f"({res['rows']} rows, {res['sequences']} sequences)")
    t = Table(title="held-out loss", title_justify="left", box=None, pad_edge=False)
    for col in ("SLICE", "LOSS", "TOKENS"):
        t.add_column(col, justify="left" if col == "SLICE" else "right")
    t.add_row("all", f"{res['loss']:.4f}", f"{res['tokens']:,}")
    for group, title in (("by_effort", "effort"), ("by_kind", "kind")):
        for k, v in res[group].items():
            t.add_row(f"{title} {k}", f"{v['loss']:.4f}", f"{v['tokens']:,}")
    con.print(t)
    gen = res["generation"]
    g = Table(title=f"generation checks ({gen['samples']} replies)", title_justify="left", box=None, pad_edge=False)
    g.add_column("CHECK")
    g.add_column("PASSED", justify="right")
    for k in ("format_valid_rate", "ends_with_return_rate", "tool_args_valid_rate", "no_leak_rate", "analysis_present_rate"):
        v = gen.get(k)
        g.add_row(k.removesuffix("_rate"), "n/a" if v is None else f"{v:.0%}")
    con.print(g)
    for r in gen["replies"]:
        if r["problems"]:
            con.print(f"  row {r['row']}: {'; '.join(r['problems'])}", markup=False)
    con.print(f"saved {res['saved']}")
