"""`data tokenize` and `data preview`: run the harmony data pipeline on this machine (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import resolve

app = typer.Typer(help="Tokenize and inspect datasets (harmony format, label masks, packing).", no_args_is_help=True)

SpecOpt = Annotated[Optional[Path], typer.Option("--spec", help="run spec YAML whose data section applies (default: defaults + user config)", show_default=False)]
TrainOnOpt = Annotated[Optional[str], typer.Option("--train-on", help="all | last: which responses are trained; overrides the spec's data.train_on", show_default=False)]
EffortOpt = Annotated[Optional[str], typer.Option("--reasoning-effort", help="low | medium | high (rows may override); overrides the spec's data.reasoning_effort", show_default=False)]
ThinkingOpt = Annotated[Optional[str], typer.Option("--thinking-turns", help="expand | last | drop: analysis in earlier turns; overrides the spec's data.thinking_turns", show_default=False)]
InputArg = Annotated[str, typer.Argument(help="a .jsonl/.json/.parquet file, s3://bucket/key, a hub id, or 'sample'")]


def register(root: typer.Typer) -> None:
    app.command("tokenize")(tokenize)
    app.command("preview")(preview)
    root.add_typer(app, name="data")


def _source_for(data, path: str):
    """The spec's entry for this path (its field names and format), else a plain source."""
    from gptoss_cloud.contract.sections import DatasetSource

    for s in data.datasets:
        if s.path == path:
            return s
    return DatasetSource(path=path)


def tokenize(
    input: InputArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="output JSONL: one {row, input_ids, labels} per sequence")],
    spec: SpecOpt = None,
    train_on: TrainOnOpt = None,
    reasoning_effort: EffortOpt = None,
    thinking_turns: ThinkingOpt = None,
) -> None:
    """Render INPUT with harmony and write every sequence (before packing) with its labels, in input order."""
    from gptoss_cloud.trainer.data.notes import Notes
    from gptoss_cloud.trainer.data.pipeline import check_skipped, tokenize_rows
    from gptoss_cloud.trainer.data.sources import load_source

    data = resolve(spec, data__train_on=train_on, data__reasoning_effort=reasoning_effort,
                   data__thinking_turns=thinking_turns).data
    src = _source_for(data, input)
    tmp = out.with_name(out.name + ".tmp")
    _refuse_overwrite(input, out, tmp)
    loaded = load_source(src)
    errors: list = []
    notes = Notes()
    seqs = tokenize_rows(enumerate(loaded.rows), src, loaded.name, data, errors, notes)
    check_skipped(errors, len(loaded.rows), data)
    _write_tokens(seqs, out, tmp)
    trained = sum(s.trained for s in seqs)
    tokens = sum(len(s.input_ids) for s in seqs)
    typer.echo(f"wrote {len(seqs)} sequences from {len(loaded.rows) - len(errors)} rows to {out} "
               f"({tokens} tokens, {trained} trained, {len(errors)} rows skipped)")
    for e in errors[:5]:
        typer.echo(f"skipped: {e.message}", err=True)
    for line in notes.lines():
        typer.echo(line, err=True)


def _write_tokens(seqs, out: Path, tmp: Path) -> None:
    """Write beside ``out`` and rename, so a failed write never leaves half a file under its name."""
    from gptoss_cloud.contract.errors import DataError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w") as f:
            for s in seqs:
                f.write(json.dumps({"row": s.row, "input_ids": s.input_ids, "labels": s.labels}, separators=(",", ":")) + "\n")
        tmp.replace(out)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        raise DataError(f"could not write --out {out}: {e.strerror or e}") from e


def _refuse_overwrite(input: str, *outs: Path) -> None:
    """The output must never replace the dataset it is made from (by name, symlink or hard link)."""
    import os

    from gptoss_cloud.contract.errors import DataError

    src = Path(input).expanduser()
    if not src.is_file():  # 'sample', s3:// and hub inputs are not local files
        return
    for o in outs:
        same = o.exists() and os.path.samefile(src, o)
        if same or o.resolve() == src.resolve():
            raise DataError(f"--out {outs[0]} would overwrite the input {input}" + ("" if o == outs[0] else f" (through {o})"),
                            hint="write the tokens to another file")


def preview(
    input: Annotated[Optional[str], typer.Argument(help="a .jsonl/.json/.parquet file, s3://bucket/key, a hub id, or 'sample'; default: the spec's datasets", show_default=False)] = None,
    spec: SpecOpt = None,
    n: Annotated[int, typer.Option("-n", "--num", help="how many sequences to show", min=0)] = 3,
    train_on: TrainOnOpt = None,
    reasoning_effort: EffortOpt = None,
    thinking_turns: ThinkingOpt = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", help="packing budget for the statistics; overrides the spec's data.max_seq_len", show_default=False)] = None,
) -> None:
    """Show rendered sequences with trained tokens highlighted, then dataset statistics."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from gptoss_cloud.trainer.data.pipeline import build_datasets, check_skipped, tokenize_rows
    from gptoss_cloud.trainer.data.sources import load_source
    from gptoss_cloud.trainer.data.vocab import load_encoding

    s = resolve(spec, data__train_on=train_on, data__reasoning_effort=reasoning_effort,
                data__thinking_turns=thinking_turns, data__max_seq_len=max_seq_len)
    data = s.data
    if input is not None:
        data = data.model_copy(update={"datasets": [_source_for(data, input)], "validation": None})
    console = Console(highlight=False, soft_wrap=True)
    enc = load_encoding()

    shown = 0
    for src in data.datasets:
        if shown >= n:
            break
        loaded = load_source(src)
        errors: list = []
        for index, raw in enumerate(loaded.rows):
            if shown >= n:
                break
            for seq in tokenize_rows([(index, raw)], src, loaded.name, data, errors):
                if shown >= n:
                    break
                console.rule(f"{loaded.name} row {seq.row} · {len(seq.input_ids)} tokens · {seq.trained} trained")
                console.print(_highlight(enc, seq, Text, marks=not console.is_terminal))
                shown += 1
        check_skipped(errors, len(loaded.rows), data)

    ds = build_datasets(data, use_cache=False, log_notes=False)  # shown in a table below instead
    table = Table(title="dataset statistics", show_header=True)
    table.add_column("")
    table.add_column("train", justify="right")
    if data.validation is not None:
        table.add_column("validation", justify="right")
    stats = [ds.stats] + ([ds.validation_stats] if data.validation is not None else [])
    for label, get in [
        ("rows", lambda x: x.rows), ("skipped rows", lambda x: x.skipped_rows), ("sequences", lambda x: x.sequences),
        ("packed samples", lambda x: f"{x.samples} × {data.max_seq_len}"), ("tokens", lambda x: x.tokens),
        ("trained tokens", lambda x: f"{x.trained_tokens} ({x.trained_fraction:.1%})"),
        ("dropped (overlong)", lambda x: x.dropped), ("truncated", lambda x: x.truncated),
        ("without trained tokens", lambda x: x.untrained),
    ]:
        table.add_row(label, *[str(get(x)) for x in stats])
    console.print(table)
    _print_notes(console, Table, stats)
    if console.is_terminal:
        console.print("[dim]trained tokens in[/] [bold green]green[/][dim]; prompt tokens dimmed[/]")
    else:
        console.print("trained tokens between ⟦ and ⟧")


def _print_notes(console, Table, stats) -> None:
    """What the rows had converted, dropped or defaulted, per kind, with the first row of each."""
    from gptoss_cloud.trainer.data.notes import KINDS

    kinds = [k for k in KINDS if any(k in x.notes for x in stats)]
    if not kinds:
        return
    table = Table(title="converted, dropped or defaulted", show_header=True)
    table.add_column("")
    table.add_column("what")
    for label in ["train", "validation"][: len(stats)]:
        table.add_column(label, justify="right")
    table.add_column("first")
    for k in kinds:
        first = next(x.notes[k][1] for x in stats if k in x.notes)
        table.add_row(*KINDS[k], *[str(x.notes.get(k, [0])[0]) for x in stats], first)
    console.print(table)


def _highlight(enc, seq, Text, marks: bool):
    """Trained spans in green; without a terminal (logs, pipes) colour is lost, so bracket them."""
    text = Text()
    start = 0
    ids, labels = seq.input_ids, seq.labels
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            trained = labels[start] != -100
            piece = enc.decode(ids[start:i])
            if trained and marks:
                piece = f"⟦{piece}⟧"
            text.append(piece, style="bold green" if trained else "dim")
            start = i
    return text
