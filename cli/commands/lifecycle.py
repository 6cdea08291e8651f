"""`delete RUN` (store contents and cluster objects) and `push RUN --to hf://ORG/NAME`."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import StoreOpt, resolve

_HF_REPO = re.compile(r"^hf://([A-Za-z0-9][\w.-]*)/([\w.-]+)$")


def register(app: typer.Typer) -> None:
    app.command("delete")(delete)
    app.command("push")(push)


def delete(
    run: Annotated[str, typer.Argument(help="run id or run home URI")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    keep_cluster: Annotated[bool, typer.Option("--keep-cluster", help="delete only the store contents")] = False,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help="overrides the run's spec")] = None,
    context: Annotated[Optional[str], typer.Option("--context", help="kubeconfig context; overrides the run's spec")] = None,
    store: StoreOpt = None,
) -> None:
    """Delete a run: its cluster objects (JobSet, merge Job, server) and everything under its store home.
    A running local run is stopped first."""
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.contract.runs import read_run_spec
    from gptoss_cloud.contract.runs import resolve_run
    from gptoss_cloud.backends.serving import run_spec_with_overrides
    from gptoss_cloud.contract.store.objects import open_store

    # strict: only a home named like a run id, so `delete ./` or `delete ../project` cannot empty a folder.
    run_id, home = resolve_run(run, resolve(None, output__store=store).output.store, strict=True)
    try:
        read_run_spec(home)  # bounded and decoded strictly: a hostile spec.yaml is one SpecError here
        spec = run_spec_with_overrides(home, {"cluster.namespace": namespace, "cluster.context": context})
    except GptossError as e:
        if not keep_cluster:  # without the spec we cannot know which cluster objects are the run's
            raise GptossError(f"cannot read the spec of run {run_id}: {e.message}",
                              hint="`--keep-cluster` deletes only its store home, which needs no spec") from e
        spec = None
    from gptoss_cloud.backends.base import get_backend

    st = open_store(home)
    n_files = len(st.list())
    backend = get_backend(spec.cluster.backend) if spec is not None and not keep_cluster else None
    what = f"{n_files} file(s) under {home}"
    outside = backend.describe_delete(run_id, spec) if backend is not None else None
    if outside:
        what += f" and {outside}"
    local = get_backend("local")
    running_here = local.is_running_here(run_id, home)
    if running_here:
        what = f"stop it (it is running on this machine), then {what}"
    if not yes and not typer.confirm(f"Delete run {run_id}: {what}?", default=False):
        raise typer.Exit(1)
    if running_here:
        # Before the files: a live trainer would keep writing checkpoints into the emptied home.
        local.cancel(run_id, home)
        typer.echo(f"stopped {run_id}", err=True)
    if backend is not None:
        # Cluster objects first: a running trainer or server would otherwise keep writing to the home.
        for line in backend.delete(run_id, home, spec):
            typer.echo(line, err=True)
    removed = st.delete("")
    typer.echo(f"deleted run {run_id}: {removed} file(s) from {home}")


def parse_hf_target(uri: str) -> str:
    from gptoss_cloud.contract.errors import GptossError

    m = _HF_REPO.match(uri)
    if not m:
        raise GptossError(f"--to must look like hf://ORG/NAME, not {uri!r}")
    return f"{m.group(1)}/{m.group(2)}"


def push(
    run: Annotated[str, typer.Argument(help="run id or run home URI")],
    to: Annotated[str, typer.Option("--to", help="hf://ORG/NAME on the Hugging Face Hub")],
    adapter: Annotated[bool, typer.Option("--adapter", help="push the LoRA adapter instead of the merged folder")] = False,
    fmt: Annotated[str, typer.Option("--format", help="which merged folder: auto (merged-mxfp4/ when published, else merged/) | bf16 | mxfp4")] = "auto",
    private: Annotated[bool, typer.Option("--private/--public", help="visibility if the repository is created")] = True,
    store: StoreOpt = None,
) -> None:
    """Upload a run's merged folder (or adapter) to the Hugging Face Hub; the token comes from HF_TOKEN."""
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.contract.outputs import MANIFEST, home_says_signed
    from gptoss_cloud.contract.merged import formats_for, published_key
    from gptoss_cloud.contract.runs import MERGE_FORMATS, merged_key, resolve_run
    from gptoss_cloud.trainer.programs.serve_fetch import fetch
    from gptoss_cloud.contract.store.objects import is_remote, join, open_store

    repo_id = parse_hf_target(to)
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise GptossError("HF_TOKEN is not set", hint="export HF_TOKEN=<a write token from huggingface.co/settings/tokens>")
    run_id, home = resolve_run(run, resolve(None, output__store=store).output.store)
    if fmt not in ("auto", *MERGE_FORMATS):
        raise GptossError(f"--format {fmt!r}: use auto, {' or '.join(MERGE_FORMATS)}")
    if adapter:
        key = "adapter"
        if not open_store(home).exists("adapter/adapter_config.json"):
            raise GptossError(f"nothing to push: {home}/adapter/adapter_config.json does not exist", hint="train a LoRA run")
    else:
        key = published_key(open_store(home), fmt=fmt)
        if key is None:
            wanted = " or ".join(f"{merged_key(f)}/" for f in formats_for(fmt))
            raise GptossError(f"nothing to push: no published {wanted} in {home}", hint=f"gptoss-cloud merge {run_id}")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as e:
        raise GptossError("huggingface_hub is not installed", hint="pip install 'gptoss-cloud[hub]'") from e
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        # A local home is verified in place; a remote one is fetched (contained, verified) first.
        folder = Path(tmp) / key if is_remote(home) else Path(home) / key
        fetch(join(home, key), folder, log=lambda m: None, signed=home_says_signed(home))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=[MANIFEST],
                                     commit_message=f"gptoss-cloud run {run_id} ({key})")
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            hint = {401: "HF_TOKEN is invalid or expired", 403: f"HF_TOKEN cannot write to {repo_id}",
                    404: f"organisation of {repo_id} not found"}.get(status)
            raise GptossError(f"pushing {key} of {run_id} to {repo_id} failed: HTTP {status}", hint=hint) from e
    typer.echo(f"pushed {home}/{key} to https://huggingface.co/{repo_id} ({getattr(info, 'oid', '') or 'done'})")
