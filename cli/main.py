"""The gptoss-cloud command line: thin commands (parse, call, print). Logic lives in the modules.

Each command group is a module of ``commands/`` imported below. The house, and where its rules live
(tests/unit/test_house.py keeps this table true):

    contract/        what both planes share: spec.py, shapes.py, errors.py, runs.py, store/, plan/
    commands/        one module per command group (this file registers them)
    backends/        Backend (base.py): submit, status, logs, cancel, serve, delete; local, k8s, truss
    kube/            the one Kubernetes client (client.py) and every call it makes (objects.py)
    render/          pure builders: k8s/ (JobSet, serving, GitOps, cluster), truss/, vllm.py
    rehearse/ report/ suites/   multi-node rehearsal, the run report, benchmark suites
    ../trainer/      the data plane: data/, kernels/, checkpoint/, merge/, evaluation/, bench/, programs/

    the JobSet failure policy          render/k8s/pod.py: jobset_failure_policy, pod_failure_policy
    the tool-call label mask           ../trainer/data/harmony.py: render_with_kinds
    the manifest check on resume       ../trainer/checkpoint/manifest.py: read_manifest, Manifest.check_file
    the vLLM server arguments          render/vllm.py: server_args
    the memory formula                 contract/plan/memory.py: memory_plan
    the checkpoint size                contract/plan/disk.py: checkpoint_bytes
    the fit check of a submit          backends/base.py: plan_note
    the GPUs vLLM needs to serve       contract/plan/serving.py: size_tp
    what vLLM allocates per GPU        contract/plan/vllm_memory.py: weight_bytes_per_gpu, kv_bytes_per_sequence
    which merged folder is served      contract/merged.py: published_format, merge_format_for, holds_mxfp4
    the MXFP4 export layout            ../trainer/merge/mxfp4.py: Mxfp4Layout, quantize_in_chunks
    quantisation-aware training        ../trainer/kernels/qat.py: fake_quantize_mxfp4, qat_forward
    activation offload                 ../trainer/offload.py: offload_saved_tensors
    the MoE over token tiles           ../trainer/kernels/tiled_experts.py: tile_mlp_
    experts as several FSDP2 units     ../trainer/kernels/expert_units.py: split_experts_, join_unit_entries
    evaluation through a server        ../trainer/evaluation/endpoint.py: Endpoint
"""

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
