"""One rank of the real trainer (run_training + Loop) with the real Checkpointer, for the fault tests.

``--die-at STEP`` SIGKILLs rank 1 after that step's update, before its checkpoint could be saved: the
run dies mid-way, having logged that step's loss. Rank 0 writes the run summary to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
from types import SimpleNamespace


def samples(n: int, length: int, seed0: int):

    out = []
    for i in range(n):
        r = random.Random(seed0 + i)
        ids, labels, pos, lens = [], [], [], []
        while len(ids) < length - 24:
            k = r.randint(8, 20)
            toks = [r.randrange(200_000) for _ in range(k)]
            ids += toks
            labels += [-100] * 4 + toks[4:]
            pos += range(k)
            lens.append(k)
        pad = length - len(ids)
        ids += [199999] * pad
        labels += [-100] * pad
        pos += range(pad)
        lens.append(pad)
        out.append(SimpleNamespace(input_ids=ids, labels=labels, position_ids=pos, seq_lens=lens))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--out", required=True)
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
        "method": {"kind": "lora", "lora": {"r": 4, "alpha": 8}},
        "optim": {"max_steps": a.steps, "lr": 5e-3, "warmup_steps": 1, "log_every": 1},
        "parallelism": {"collective_timeout_s": 60},
        "checkpoint": {"every_steps": 2},
    })

    class DyingCheckpointer(Checkpointer):
        def maybe_save(self, step, state, **kw):
            if a.die_at == step and self.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().maybe_save(step, state, **kw)

    ds = SimpleNamespace(train=samples(8, 64, 0), validation=samples(2, 64, 100))
    try:
        summary = run_training(spec, "loop-ckpt", a.home, datasets=ds, interactive=False,
                               checkpointer=DyingCheckpointer(spec.checkpoint, a.home, spec=spec))
    finally:
        shutdown()
    if int(os.environ["RANK"]) == 0:
        with open(a.out, "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
