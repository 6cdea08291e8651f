"""``python -m gptoss_cloud.trainer SPEC --run-id ID``: what each rank runs under torchrun.

Equivalent to ``gptoss-cloud train SPEC --run-id ID``. SPEC is the resolved spec (what ``submit``
wrote to ``<home>/spec.yaml``), trained as written: no environment override and no user config is
applied, and an environment variable that names a spec setting is refused. The run home is
``<output.store>/<run-id>`` unless ``--home`` names it.

Node layout is not a training setting, and only the node knows it (Baseten's checkpoint volume and
project cache, a retried attempt): the start script passes it as options, which this entry applies
to the spec it trains, visibly in the command line, never through the environment.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.contract.runs import run_home
    from gptoss_cloud.contract.spec import check_pod_environ, read_resolved_spec
    from gptoss_cloud.contract.store.objects import open_store

    p = argparse.ArgumentParser(prog="python -m gptoss_cloud.trainer", description=__doc__)
    p.add_argument("spec", help="the resolved run spec (YAML)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--home", default=None, help="run home (default: <output.store>/<run-id>)")
    p.add_argument("--local-dir", default=None, help="node-local scratch for checkpoint shards (replaces checkpoint.local_dir on this node)")
    p.add_argument("--weights-cache", default=None, help="where this node caches base weights (replaces model.cache_dir on this node)")
    p.add_argument("--retried", action="store_true",
                   help="this attempt follows a failed one of the same run: continue from its latest published checkpoint (checkpoint.resume: auto)")
    args = p.parse_args(argv)
    try:
        check_pod_environ(os.environ)
        resolved = read_resolved_spec(args.spec)
        spec = node_spec(resolved, args)
        home = args.home or run_home(spec.output.store, args.run_id)
        from gptoss_cloud.trainer.train import run_training, shutdown

        if os.environ.get("RANK", "0") == "0" and not open_store(home).exists("spec.yaml"):
            open_store(home).write_bytes("spec.yaml", resolved.to_yaml().encode())  # the run's, not this node's
        try:
            summary = run_training(spec, args.run_id, home)
        finally:
            shutdown()
    except GptossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"run {args.run_id}: {summary['steps']} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; "
              f"outputs in {home}", file=sys.stderr)
    return 0


def node_spec(spec, args):
    """``spec`` with this node's layout options applied (validated like any other spec value)."""
    checkpoint, model = {}, {}
    if args.local_dir:
        checkpoint["local_dir"] = args.local_dir
    if args.retried:
        checkpoint["resume"] = "auto"
    if args.weights_cache:
        model["cache_dir"] = args.weights_cache
    if not (checkpoint or model):
        return spec
    from gptoss_cloud.contract.spec import deep_merge

    return type(spec).model_validate(deep_merge(spec.model_dump(), {"checkpoint": checkpoint, "model": model}))


if __name__ == "__main__":
    sys.exit(main())
