"""`report RUN`: a run's plots and tables in one self-contained HTML file (and the PNGs beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import StoreOpt, resolve


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    run: Annotated[str, typer.Argument(help="run id (looked up in the store) or the full URI/path of a run home", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="the HTML file to write (default: <run-id>.html here); the PNGs go beside it")] = None,
    store: StoreOpt = None,
) -> None:
    """Loss (train and eval), learning rate, throughput, GPU memory, checkpoints and evaluations of a run, as one HTML page."""
    from rich.console import Console

    from gptoss_cloud.report.html import write_report
    from gptoss_cloud.contract.runs import resolve_run

    run_id, home = resolve_run(run, resolve(None, output__store=store).output.store)
    page, pngs = write_report(run_id, home, out or Path(f"{run_id}.html"))
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"wrote {page}" + (f" and {len(pngs)} PNG(s) beside it" if pngs else ""))
