"""`serve RUN`: vLLM on Kubernetes (merge Job + Deployment + Service + NetworkPolicy), Truss, or locally."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import StoreOpt, resolve

OVERRIDES = "overrides the run's spec"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    run: Annotated[Optional[str], typer.Argument(help="run id (looked up in the store) or a run home URI", show_default=False)] = None,
    promoted: Annotated[Optional[str], typer.Option("--promoted", help="instead of RUN: serve whichever run is promoted as NAME (read when the pod starts)")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help=f"latest, or a step number to merge and serve; {OVERRIDES}")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help=f"auto | bf16 | mxfp4: which merged folder (auto: merged-mxfp4/ when published, else merged/); {OVERRIDES}")] = None,
    tp: Annotated[Optional[int], typer.Option("--tp", min=1, help=f"tensor parallel size (default: sized from model and GPU memory); {OVERRIDES}")] = None,
    replicas: Annotated[Optional[int], typer.Option("--replicas", min=1, help=OVERRIDES)] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help=f"k8s | truss | local; {OVERRIDES}")] = None,
    adapter: Annotated[Optional[bool], typer.Option("--adapter/--merged", help=f"serve base + LoRA adapter instead of merged weights; {OVERRIDES}")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help=OVERRIDES)] = None,
    context: Annotated[Optional[str], typer.Option("--context", help="kubeconfig context; " + OVERRIDES)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print (or write to --out) what would be applied; talk to no server")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="yaml | json (with --dry-run)")] = "yaml",
    out: Annotated[Optional[Path], typer.Option("--out", help="write the rendered objects / Truss config into this folder")] = None,
    vllm_python: Annotated[Optional[str], typer.Option("--vllm-python", envvar="GPTOSS_VLLM_PYTHON",
                                                       help="local: the python whose environment has vLLM (default: this one)")] = None,
    port: Annotated[Optional[int], typer.Option("--port", min=1024, max=65535, help=f"server port; {OVERRIDES}")] = None,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="local: require the API key held in this environment variable on every route but /health and /metrics")] = None,
    store: StoreOpt = None,
) -> None:
    """Serve a trained run with vLLM and print its endpoint and a ready-to-paste curl."""
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.backends import serving

    if output not in ("yaml", "json"):
        raise GptossError(f"--output must be yaml or json, not {output!r}")
    store_uri = resolve(None, output__store=store).output.store
    overrides = {
        "serve.checkpoint": checkpoint, "serve.format": fmt, "serve.tp": tp, "serve.replicas": replicas, "serve.adapter": adapter,
        "serve.port": port, "cluster.backend": backend, "cluster.namespace": namespace, "cluster.context": context,
    }
    if (run is None) == (promoted is None):
        raise GptossError("give a RUN or --promoted NAME (one of them)")
    if promoted is not None:
        target, notes = serving.resolve_promoted(promoted, store_uri, overrides)
    else:
        target, notes = serving.resolve_target(run, store_uri, overrides)
    for n in notes:
        typer.echo(n, err=True)
    from gptoss_cloud.backends.base import ServeOptions, get_backend

    opts = ServeOptions(dry_run=dry_run, out=out, output_format=output, vllm_python=vllm_python, api_key_env=api_key_env)
    code = get_backend(target.spec.cluster.backend).serve(target, opts, typer.echo)
    if code:
        raise typer.Exit(code)
