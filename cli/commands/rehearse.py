"""`rehearse`: a multi-node run's pods as local node groups on this host; kill one, resume, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import resolve

OVERRIDES = "overrides the spec"


def register(app: typer.Typer) -> None:
    app.command("rehearse")(rehearse)


def rehearse(
    spec: Annotated[Path, typer.Argument(help="run spec YAML", show_default=False)],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help=f"node groups (pods) to start on this host; {OVERRIDES}")] = 2,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", min=1, help=f"processes (GPUs) per group; {OVERRIDES}")] = 1,
    kill_node: Annotated[Optional[int], typer.Option("--kill-node", help="SIGKILL this node group once --kill-at-step's checkpoint is published, then restart all groups")] = None,
    kill_at_step: Annotated[Optional[int], typer.Option("--kill-at-step", help="the checkpoint step to wait for before the kill")] = None,
    reference: Annotated[bool, typer.Option("--reference", help="first run the spec uninterrupted under another run id and compare the losses after the resume")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="report JSON (default: <out-dir>/report.json)")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="node-<i>.log files (default: ./rehearse-<run-id>)")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="run id of the rehearsed run (default: a new one)")] = None,
    store: Annotated[Optional[str], typer.Option("--store", help=f"run store (s3://bucket/prefix or folder); {OVERRIDES}")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="seconds for the whole rehearsal")] = 1800.0,
    grace: Annotated[float, typer.Option("--grace", min=0, help="seconds between SIGTERM and SIGKILL when groups are torn down")] = 10.0,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0, help="largest relative per-step loss difference from the reference")] = 1e-4,
    keep_reference: Annotated[bool, typer.Option("--keep-reference", help="keep the reference run's checkpoints (default: removed once it ends; only its metrics are compared)")] = False,
    reference_store: Annotated[Optional[str], typer.Option("--reference-store", help="store (folder or s3://) for the reference run's home (default: the run's store); only its metrics are read, so a local folder keeps its checkpoints off a slow S3 server")] = None,
) -> None:
    """Rehearse a multi-node run on this host with exactly the environment the rendered JobSet gives its pods."""
    from rich.console import Console

    from gptoss_cloud.rehearse.run import RehearseOptions, rehearse as run_rehearsal, write_report
    from gptoss_cloud.contract.runs import check_run_id, new_run_id

    s = resolve(spec, output__store=store)
    rid = check_run_id(run_id) if run_id else new_run_id(s.name)
    out_dir = out_dir or Path(f"rehearse-{rid}")
    opts = RehearseOptions(nodes=nodes, gpus_per_node=gpus_per_node, kill_node=kill_node, kill_at_step=kill_at_step,
                           reference=reference, run_id=rid, out_dir=out_dir, timeout_s=timeout, grace_s=grace,
                           tolerance=tolerance, keep_reference=keep_reference, reference_store=reference_store)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    report = run_rehearsal(s, opts, echo=lambda line: err.print(f"[dim]rehearse:[/] {line}"))
    report["spec"] = str(spec)
    path = out or out_dir / "report.json"
    write_report(report, path)
    _summary(Console(highlight=False, soft_wrap=True), report, path)
    if not report["pass"]:
        raise typer.Exit(1)


def _summary(con, report: dict, path: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"rehearsal {report['run_id']}: {report['nodes']} node groups x {report['gpus_per_node']} "
                    f"({report['device']})", title_justify="left")
    for col in ("run", "attempt", "state", "seconds", "kill", "exit codes"):
        t.add_column(col, no_wrap=True)
    attempts = ([("reference", report["reference"]["attempt"])] if report.get("reference") else [])
    attempts += [("rehearsed", a) for a in report["attempts"]]
    for label, a in attempts:
        kill = f"node {a['killed_node']} at {a['kill_after_s']}s" if "killed_node" in a else ""
        t.add_row(label, str(a["number"]), a["state"], str(a.get("seconds", "")), kill,
                  " ".join(str(c) for c in a.get("returncodes", [])))
    con.print(t)
    if "resumed_from" in report:
        con.print(f"resumed from step {report['resumed_from']} (last published: {report.get('expected_resume')})")
    cmp = report.get("loss_comparison")
    if cmp and cmp["steps"]:
        lt = Table(title="loss after the resume", title_justify="left")
        for col in ("step", "uninterrupted", "resumed", "abs diff"):
            lt.add_column(col, justify="right")
        for r in cmp["steps"]:
            lt.add_row(str(r["step"]), f"{r['reference']:.6f}", f"{r['resumed']:.6f}", f"{r['abs_diff']:.2e}")
        con.print(lt)
        con.print(f"max abs diff {cmp['max_abs_diff']:.3g}, max rel diff {cmp['max_rel_diff']:.3g} "
                  f"(tolerance {cmp['tolerance_rel']:g} relative)")
    if report.get("substitutions"):
        con.print("substituted for one host: " + ", ".join(s["what"] for s in report["substitutions"]))
    verdict = "[bold green]PASS[/]" if report["pass"] else f"[bold red]FAIL[/]: {escape(report.get('problem', ''))}"
    con.print(f"{verdict}\nreport: {path}")
