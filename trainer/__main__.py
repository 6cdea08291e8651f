"""``python -m gptoss_cloud.trainer SPEC --run-id ID``: what each rank runs under torchrun.

Equivalent to ``gptoss-cloud train SPEC --run-id ID``. The run home is ``<output.store>/<run-id>``
unless ``--home`` names it.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.contract.runs import run_home
    from gptoss_cloud.contract.spec import load_spec
    from gptoss_cloud.contract.store.objects import open_store

    p = argparse.ArgumentParser(prog="python -m gptoss_cloud.trainer", description=__doc__)
    p.add_argument("spec", help="the run spec (YAML)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--home", default=None, help="run home (default: <output.store>/<run-id>)")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        home = args.home or run_home(spec.output.store, args.run_id)
        from gptoss_cloud.trainer.train import run_training, shutdown

        import os

        if os.environ.get("RANK", "0") == "0" and not open_store(home).exists("spec.yaml"):
            open_store(home).write_bytes("spec.yaml", spec.to_yaml().encode())
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


if __name__ == "__main__":
    sys.exit(main())
