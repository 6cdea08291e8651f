"""`render [SPEC] --out DIR [--schedule CRON]`: deterministic manifests for Argo CD / Flux.

`render --cluster --out k8s/`: the once-per-cluster kustomize tree (namespace, RBAC, Kueue queues,
NetworkPolicies; cli/render/k8s/cluster.py), base and overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import SpecArg, StoreOpt, resolve


def register(app: typer.Typer) -> None:
    app.command("render")(render)


def render(
    spec: SpecArg = None,
    out: Annotated[Path, typer.Option("--out", help="folder to write (kustomization.yaml + one file per object)")] = ...,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help='cron (5 fields, UTC), e.g. "0 3 * * 1": a CronJob submits a fresh run each tick')] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help="overrides the spec")] = None,
    store: StoreOpt = None,
    cluster: Annotated[bool, typer.Option("--cluster", help="write what a cluster admin applies once (namespace, RBAC, Kueue queues, NetworkPolicies) as a kustomize base + overlays, instead of a run")] = False,
) -> None:
    """Write deterministic Kubernetes manifests (same spec -> byte-identical files) with a kustomization.
    `render --cluster --out k8s/` writes what a cluster admin applies once instead."""
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.render.k8s import gitops
    from gptoss_cloud.contract.store.objects import is_remote

    if cluster:
        if spec is not None or schedule is not None or namespace is not None or store is not None:
            raise GptossError("`render --cluster` takes only --out", hint="the namespaces are the overlays' (k8s/overlays/)")
        _render_cluster(out, GptossError)
        return
    s = resolve(spec, output__store=store, cluster__namespace=namespace)
    if schedule is not None:
        objects = gitops.schedule_objects(s, schedule)
    else:
        objects = gitops.single_run_objects(s)   # the training JobSet + its spec ConfigMap
    files = gitops.tree(objects)
    _write_tree(out, files, GptossError)
    if not is_remote(s.output.store):
        typer.echo(f"warning: output.store {s.output.store!r} is a local folder; pods in a cluster need an s3:// store", err=True)
    for name in files:
        typer.echo(f"wrote {out / name}", err=True)
    what = f"a CronJob that submits a new run on {schedule!r} (UTC)" if schedule else f"run {gitops.run_name(s)}"
    typer.echo(f"{out}: {what}; check with `kubectl kustomize {out}`, then commit it for Argo CD or Flux")


def _render_cluster(out: Path, error) -> None:
    from gptoss_cloud.render.k8s import cluster

    files = cluster.tree()
    _write_nested(out, files, (cluster.HEADER, cluster.MD_HEADER), error)
    typer.echo(f"{out}: base/ and overlays/{{{','.join(sorted(cluster.OVERLAYS))}}}; see {out / 'README.md'} for what to apply")


def _write_nested(out: Path, files: dict[str, str], headers: tuple[str, ...], error) -> None:
    """Write every file; remove files we generated before that are no longer produced; never touch
    or overwrite a file we did not write (an admin's own overlay beside ours stays)."""
    def ours(p: Path) -> bool:
        return p.is_file() and p.read_text(errors="replace").startswith(headers)

    if out.exists() and not out.is_dir():
        raise error(f"--out {out} exists and is not a folder")
    for rel in files:
        p = out / rel
        if p.exists() and not ours(p):
            raise error(f"{p} exists and was not written by `gptoss-cloud render --cluster`",
                        hint="move it away, or choose another --out")
    if out.is_dir():
        for p in sorted(out.rglob("*")):
            if p.suffix in (".yaml", ".md") and p.relative_to(out).as_posix() not in files and ours(p):
                p.unlink()
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)


def _write_tree(out: Path, files: dict[str, str], error) -> None:
    """Replace a folder we rendered before (stale objects removed); refuse to mix into someone else's."""
    from gptoss_cloud.render.k8s.gitops import HEADER

    if out.exists():
        if not out.is_dir():
            raise error(f"--out {out} exists and is not a folder")
        existing = sorted(p for p in out.iterdir())
        ours = out / "kustomization.yaml"
        if existing and not (ours.is_file() and ours.read_text().startswith(HEADER)):
            raise error(f"--out {out} is not empty and was not written by `gptoss-cloud render`",
                        hint="choose an empty or new folder")
        for p in existing:
            if p.is_file() and p.suffix == ".yaml" and p.read_text().startswith(HEADER) and p.name not in files:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
