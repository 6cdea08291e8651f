"""The gptoss-cloud command line: thin commands (parse, call, print). Logic lives in the modules."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gptoss_cloud.commands import (
    bench, data, eval as eval_cmd, lifecycle, merge, plan, promote, rehearse, render, report as report_cmd, run, serve, spec_cmds,
    train,
)
from gptoss_cloud.failure import DEBUG_ENV, report, set_debug

app = typer.Typer(
    name="gptoss-cloud",
    help="Fine-tune GPT-OSS 20b/120b on cloud GPUs: Kubernetes (JobSet), Baseten Truss, or locally.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold secrets
    add_completion=False,
)


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help=f"on failure, print the traceback with its causes (also {DEBUG_ENV}=1)")] = False,
) -> None:
    set_debug(debug)


# The order here is the order of `--help`.
for group in (spec_cmds, run, data, plan, train, serve, report_cmd, eval_cmd, promote, render, lifecycle, merge, bench, rehearse):
    group.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # every failure is one line; --debug adds the traceback
        sys.exit(report(e))


if __name__ == "__main__":
    main()
