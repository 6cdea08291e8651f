"""`merge`: turn a run's newest published checkpoint (or a given one) into servable Hugging Face folders."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gptoss_cloud.commands.common import StoreOpt, resolve


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_cmd)


def merge_cmd(
    ref: Annotated[str, typer.Argument(help="run id, run home URI, or a checkpoint URI ending in /checkpoints/step-N")],
    out: Annotated[Optional[str], typer.Option("--out", help="output folder or s3:// prefix (default: <run>/merged, "
                                               "<run>/merged-mxfp4; when both are written, the MXFP4 one goes to <out>-mxfp4)")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="bf16 | mxfp4 | both | auto; overrides the spec's "
                                               "output.merge_format (auto: mxfp4 when nothing learned is lost to it)")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="load the result with transformers and compare logits with the training-time model")] = False,
    base: Annotated[Optional[str], typer.Option("--base", help="base weights for a LoRA merge (default: <run>/base, else the spec's model.name)")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bfloat16 | float32 (default: the dtype the run computed in, from the checkpoint's config.json; else the checkpoint's; MXFP4 folders: bfloat16)")] = None,
    store: StoreOpt = None,
) -> None:
    """Merge a checkpoint into safetensors shards + config + tokenizer that vLLM and transformers load as is."""
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.contract.runs import merged_key, resolve_run
    from gptoss_cloud.contract.store.objects import join

    if dtype not in (None, "bfloat16", "float32"):
        raise GptossError(f"--dtype {dtype!r}: use bfloat16 or float32")
    if fmt not in (None, "bf16", "mxfp4", "both", "auto"):
        raise GptossError(f"--format {fmt!r}: use bf16, mxfp4, both or auto")
    if "/checkpoints/step-" in ref:
        source, home = ref, ref.rstrip("/").rsplit("/checkpoints/", 1)[0]
    else:
        _, home = resolve_run(ref, resolve(None, output__store=store).output.store)
        source = home

    def out_for(f: str, formats: tuple[str, ...]) -> str:
        if out is None:
            return join(home, merged_key(f))
        return out if len(formats) == 1 or f == "bf16" else out.rstrip("/") + "-mxfp4"

    from gptoss_cloud.trainer.merge.export import merge_run  # heavy (torch, transformers): only when the command runs

    for res in merge_run(source, out_for, merge_format=fmt, base=base, dtype=dtype, verify=verify):
        typer.echo(f"merged step {res.step} ({res.method}) as {res.format}: {res.tensors} tensors, "
                   f"{res.total_bytes / 2**30:.2f} GiB in {len(res.shards)} shard(s) -> {res.out}")
        typer.echo(f"merge took {res.wall_s:.1f}s, wrote {res.bytes_written / 2**30:.2f} GiB; peak host memory "
                   f"{res.peak_rss_bytes / 2**30:.2f} GiB ({'this merge' if res.peak_rss_scope == 'section' else 'whole process'})")
        if res.adapter_out:
            typer.echo(f"adapter kept at {res.adapter_out}")
        if res.max_abs_logit_diff is not None:
            typer.echo(f"verified: transformers loads it; max |logit diff| vs the training-time model {res.max_abs_logit_diff:.2e}")
