"""run_training end to end on 2 gloo processes: the tiny preset (real 201,088 vocabulary), LoRA,
metrics.jsonl, summary.json, the base folder and a peft adapter that loads onto it."""

from __future__ import annotations

import json
import os
import random
import socket
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as tmp  # noqa: E402

from gptoss_cloud.trainer.data.pack import PackedSample  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
               "mem_allocated_gib", "mem_reserved_gib"}


Sample = PackedSample  # the data pipeline's own packed row


def _sample(length: int, seed: int) -> Sample:
    r = random.Random(seed)
    ids, labels, pos, lens = [], [], [], []
    while len(ids) < length - 24:
        n = r.randint(8, 20)
        toks = [r.randrange(200_000) for _ in range(n)]
        ids += toks
        labels += [-100] * 4 + toks[4:]
        pos += range(n)
        lens.append(n)
    pad = length - len(ids)
    ids += [199999] * pad
    labels += [-100] * pad
    pos += range(pad)
    lens.append(pad)
    return Sample(ids, labels, pos, lens)


def _spec():
    from gptoss_cloud.contract.spec import RunSpec

    return RunSpec.model_validate({
        "model": {"name": "tiny", "init": "random"},
        "data": {"max_seq_len": 64},
        "method": {"kind": "lora", "lora": {"r": 4, "alpha": 8}},
        "optim": {"max_steps": 3, "lr": 5e-3, "warmup_steps": 1, "eval_every": 2, "log_every": 1},
        "parallelism": {"collective_timeout_s": 60},
        # Async saves staged in the background across both ranks (the loop waits before each optimizer step).
        "checkpoint": {"every_steps": 2, "async_save": True},
    })


def _worker(rank: int, port: int, home: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gptoss_cloud.trainer.train import run_training, shutdown

    ds = SimpleNamespace(train=[_sample(64, i) for i in range(6)], validation=[_sample(64, 100 + i) for i in range(3)])
    try:
        run_training(_spec(), "e2e-1", home, datasets=ds, interactive=False)
    finally:
        shutdown()


def test_run_training_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "e2e-1"
    tmp.spawn(_worker, args=(port, str(home)), nprocs=2, join=True)

    lines = [json.loads(x) for x in (home / "metrics.jsonl").read_text().splitlines()]
    saves = [x for x in lines if x.get("event") == "checkpoint"]
    assert [(x["step"], x["mode"]) for x in saves] == [(2, "async"), (3, "async")]
    assert all(0 < x["staged_s"] <= x["write_s"] for x in saves)
    lines = [x for x in lines if "event" not in x]  # step records only
    assert [x["step"] for x in lines[:3]] == [1, 2, 3]
    assert all(METRIC_KEYS <= set(x) for x in lines)
    assert "eval_loss" in lines[1] and "eval_loss" in lines[-1]
    toks = [x["tokens"] for x in lines[:3]]
    assert all(isinstance(t, int) for t in toks) and toks[0] < toks[1] < toks[2]  # trained tokens, cumulative
    assert lines[0]["loss"] == pytest.approx(12.2, abs=0.5)  # ln(201088) at random init
    summary = json.loads((home / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2 and summary["method"] == "lora"

    from peft import PeftModel
    from transformers import GptOssForCausalLM

    base = GptOssForCausalLM.from_pretrained(str(home / "base"))
    assert base.config.vocab_size == 201088
    model = PeftModel.from_pretrained(base, str(home / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # trained, not the zero init
