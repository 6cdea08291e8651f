"""The gptoss-cloud command line: thin commands (parse, call, print). Logic lives in the modules."""

from __future__ import annotations

import sys

import typer

from .commands import register_all
from .errors import GptossError

app = typer.Typer(
    name="gptoss-cloud",
    help="Fine-tune GPT-OSS 20b/120b on cloud GPUs: Kubernetes (JobSet), Baseten Truss, or locally.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold secrets
    add_completion=False,
)
register_all(app)


def main() -> None:
    try:
        app()
    except GptossError as e:
        from rich.console import Console

        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"[bold red]error:[/] {e.message}", markup=True)
        if e.hint:
            err.print(f"  [dim]hint:[/] {e.hint}", markup=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
