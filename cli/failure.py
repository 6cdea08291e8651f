"""How the command line reports a failure: one line (plus a hint), or the chained traceback on request.

A GptossError is a failure we anticipated and worded. Anything else is one we did not: it still gets
one line naming its type and the first line of its message (cut short: messages of library errors can
echo whole inputs), and ``--debug`` or ``GPTOSS_DEBUG=1`` prints the traceback with its causes. Locals
are never printed: they can hold credentials.
"""

from __future__ import annotations

import os
import sys
import traceback

from gptoss_cloud.contract.errors import GptossError

DEBUG_ENV = "GPTOSS_DEBUG"
MESSAGE_CHARS = 300
_debug = False


def set_debug(on: bool) -> None:
    global _debug
    _debug = on


def debug_on() -> bool:
    return _debug or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, at most MESSAGE_CHARS characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "...(cut)"


def report(e: BaseException) -> int:
    """Print ``e`` to stderr as the CLI promises; return the exit code."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if debug_on():
        # The chain first: the cause of a translated error is usually what a bug report needs.
        sys.stderr.write("".join(traceback.format_exception(e)))
        sys.stderr.flush()
    if isinstance(e, GptossError):
        err.print(f"[bold red]error:[/] {escape(e.message)}", markup=True)
        if e.hint:
            err.print(f"  [dim]hint:[/] {escape(e.hint)}", markup=True)
        return 1
    what = type(e).__name__
    line = one_line(e)
    err.print(f"[bold red]error:[/] unexpected {escape(what)}" + (f": {escape(line)}" if line else ""), markup=True)
    if not debug_on():
        err.print(f"  [dim]hint:[/] run with --debug (or {DEBUG_ENV}=1) for the traceback", markup=True)
    return 1
