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
        "serve.checkpoint": checkpoint, "serve.tp": tp, "serve.replicas": replicas, "serve.adapter": adapter,
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
    which = target.spec.cluster.backend
    if which == "k8s":
        _k8s(serving, target, dry_run, output, out)
    elif which == "truss":
        _truss(serving, target, dry_run, out)
    else:
        _local(target, dry_run, vllm_python, api_key_env)


def _local(target, dry_run: bool, vllm_python: Optional[str], api_key_env: Optional[str]) -> None:
    import os
    import shlex
    import sys

    from gptoss_cloud.backends import local_serve as sl

    python = vllm_python or sys.executable
    if not dry_run:
        sl.check_python(python)
    folder = sl.model_folder(target, Path("~/.cache/gptoss-cloud/serve").expanduser(), fetch=(lambda *_: None) if dry_run else None)
    server = sl.plan(target, folder, python=python, key_env=api_key_env, environ=os.environ)
    typer.echo(shlex.join(server.argv))
    for line in sl.usage_lines(server, target.run_id):
        typer.echo(line)
    if dry_run:
        return
    sys.stdout.flush()   # the endpoint lines before vLLM's own log
    raise typer.Exit(sl.run(server))


def _k8s(serving, target, dry_run: bool, output: str, out: Optional[Path]) -> None:
    from gptoss_cloud.render.k8s.serve import endpoint

    from gptoss_cloud.contract.store.objects import is_remote

    objects = serving.render_k8s(target)
    if not is_remote(target.home):
        typer.echo(f"warning: {target.home} is a local folder; pods in a cluster can read only an s3:// store", err=True)
    if target.needs_merge:
        typer.echo(f"{target.home}/{target.merged_key}/ not published yet: the merge Job runs first; the server waits for it", err=True)
    if out is not None:
        for p in serving.write_objects(objects, out, output):
            typer.echo(f"wrote {p}", err=True)
    elif dry_run:
        typer.echo(serving.dump(objects, output), nl=False)
    if not dry_run and out is None:
        for line in serving.apply_k8s(target, objects):
            typer.echo(line, err=True)
    elif target.spec.serve.api_key and target.spec.serve.api_key_secret is None:
        from gptoss_cloud.render.k8s.serve import api_key_ref

        name, key = api_key_ref(target.spec, target.run_id)
        typer.echo(f"note: the Deployment reads its API key from Secret {name} (key {key}); `serve` without --dry-run creates it, "
                   f"or: kubectl -n {target.namespace} create secret generic {name} --from-literal={key}=$(openssl rand -hex 32)", err=True)
    for line in serving.usage_lines(target, endpoint(target)):
        typer.echo(line, err=True)


def _truss(serving, target, dry_run: bool, out: Optional[Path]) -> None:
    import yaml

    from gptoss_cloud.contract.errors import GptossError

    cfg = serving.render_truss(target)
    text = yaml.safe_dump(cfg, sort_keys=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(text)
        typer.echo(f"wrote {out / 'config.yaml'}", err=True)
    if dry_run or out is not None:
        if out is None:
            typer.echo(text, nl=False)
        typer.echo(f"deploy with: truss push {out or '<folder with this config.yaml>'} --publish", err=True)
        return
    import tempfile

    try:
        from truss import api as truss_api  # optional: pip install 'gptoss-cloud[truss]'
    except ImportError as e:
        raise GptossError("the truss library is not installed", hint="pip install 'gptoss-cloud[truss]'") from e
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.yaml").write_text(text)
        try:
            deployment = truss_api.push(d, model_name=target.run_id, publish=True)
        except Exception as e:  # the truss library raises its own errors for auth and validation
            raise GptossError(f"truss push of {target.run_id} failed: {e}", hint="check `truss login` and the Baseten secrets named in the config") from e
    typer.echo(f"pushed {target.run_id} to Baseten: {getattr(deployment, 'model_id', '')} {getattr(deployment, 'model_deployment_id', '')}".rstrip(), err=True)
