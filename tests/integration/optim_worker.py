"""One rank of the real trainer (run_training, accelerate FSDP2, gloo, tiny preset, full fine-tuning)
with ``optim.name`` / ``optim.master_weights`` from the command line, for the low-bit resume tests.

``--die-at STEP`` SIGKILLs rank 1 before that step's checkpoint is saved. Each rank writes the summary
and a digest of its shard of every optimizer state tensor (the codes and scales of the 8-bit
moments) after the last step to ``--out`` + ``.rank-R``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from types import SimpleNamespace

from ckpt_loop_worker import samples


def state_digest(optimizer) -> dict[str, str]:
    """sha256 of this rank's shard of each optimizer state tensor (8-bit moments: codes and scales)."""
    import torch
    from torch.distributed.tensor import DTensor

    out = {}
    for i, (p, st) in enumerate(optimizer.state.items()):
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                continue
            local = v.to_local() if isinstance(v, DTensor) else v
            parts = [getattr(local, a) for a in ("codes", "scale")] if hasattr(local, "codes") else [local]
            h = hashlib.sha256()
            for t in parts:
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            out[f"{i}.{k}"] = h.hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="adamw_8bit")
    ap.add_argument("--masters", default="fp32")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--die-at", type=int, default=None)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
    from gptoss_cloud.trainer.train import run_training, shutdown

    spec = RunSpec.model_validate({
        "model": {"name": "tiny", "init": "random"},
        "data": {"max_seq_len": 64},
        "method": {"kind": "full"},
        "optim": {"max_steps": a.steps, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "name": a.name,
                  "master_weights": a.masters},
        "parallelism": {"collective_timeout_s": 60},
        "checkpoint": {"every_steps": 2},
    })
    seen = {}

    class DyingCheckpointer(Checkpointer):
        def maybe_save(self, step, state, **kw):
            if a.die_at == step and self.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            seen["optimizer"] = state.optimizer
            return super().maybe_save(step, state, **kw)

    ds = SimpleNamespace(train=samples(8, 64, 0), validation=[])
    try:
        summary = run_training(spec, "optim-ckpt", a.home, datasets=ds, interactive=False,
                               checkpointer=DyingCheckpointer(spec.checkpoint, a.home, spec=spec))
        digest = state_digest(seen["optimizer"])
    finally:
        shutdown()
    with open(f"{a.out}.rank-{os.environ['RANK']}", "w") as f:
        json.dump({"summary": summary, "state": digest}, f)


if __name__ == "__main__":
    main()
