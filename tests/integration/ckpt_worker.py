"""A small FSDP2 training process for the checkpoint tests (one rank; the test starts N of them).

A tiny GptOssForCausalLM (small vocabulary) trains on a deterministic token stream with the real
Checkpointer. The data position counts global samples, so it survives a change of world size; a
random label mask draws from the global RNG, so restoring RNG state (and its order) matters.
Rank 0 appends ``{"step", "loss", "attempt"}`` lines to --log; with --fingerprint it also records a
hash of the full (gathered) parameters after restore and after each save.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist


class DataPosition:
    def __init__(self, world: int, rank: int):
        self.samples, self.world, self.rank = 0, world, rank

    def next_batch(self, seq: int, vocab: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + self.samples + self.rank)
        self.samples += self.world
        return torch.randint(0, vocab, (1, seq), generator=g)

    def state_dict(self):
        return {"samples": self.samples}

    def load_state_dict(self, st):
        self.samples = st["samples"]


def tiny_config(vocab: int = 256):
    from transformers import GptOssConfig

    from gptoss_cloud.contract.shapes import TINY

    shape = replace(TINY, vocab_size=vocab, hidden_size=32, intermediate_size=48, head_dim=8, max_position_embeddings=4096)
    kw = shape.hf_config_dict()
    kw.update(pad_token_id=vocab - 1, eos_token_id=vocab - 2)
    cfg = GptOssConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build_model(method: str, seed: int = 0):
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(tiny_config()).float()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=True)
        model = get_peft_model(model, lcfg)
        # peft initialises B to zero: nudge it so the adapter changes the logits from step 0.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    return model


def train_state(method: str = "full", **extra) -> dict:
    """What the in-process checkpoint tests save: a tiny model, AdamW over what trains, a data position."""
    model = build_model(method)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return {"model": model, "optimizer": opt, "data": DataPosition(1, 0), **extra}


def train_step(state: dict) -> None:
    ids = state["data"].next_batch(8, 256)
    state["model"](input_ids=ids, labels=ids).loss.backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad()


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fingerprint(model) -> str:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    h = hashlib.sha256()
    for k in sorted(full):
        h.update(k.encode())
        h.update(full[k].float().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--method", default="full")
    ap.add_argument("--log", required=True)
    ap.add_argument("--attempt", type=int, default=0)
    ap.add_argument("--die-at", type=int, default=None, help="SIGKILL this rank after computing this step")
    ap.add_argument("--die-rank", type=int, default=1)
    ap.add_argument("--die-during-upload", type=int, default=None, help="SIGKILL while uploading this step")
    ap.add_argument("--local-dir", default=None)
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--fingerprint", action="store_true")
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--writer-threads", default="auto", help="checkpoint.writer_threads")
    ap.add_argument("--peer-timeout-s", type=float, default=None, help="checkpoint.peer_timeout_s")
    ap.add_argument("--die-once-peers-reported", action="store_true",
                    help="with --die-during-upload: die only once every other rank has written its part")
    ap.add_argument("--nudge", type=float, default=0.0, help="scale the weights by 1+NUDGE after restore: other bytes, "
                    "as other GPU kernels give")
    ap.add_argument("--slow-upload-rank", type=int, default=None, help="this rank waits --slow-upload-s before uploading")
    ap.add_argument("--slow-upload-s", type=float, default=2.0)
    a = ap.parse_args()
    from gptoss_cloud.contract.errors import GptossError

    try:
        run(a)
    except GptossError as e:  # what `gptoss-cloud train` prints: one line
        print(f"error: {e.message}", flush=True)
        os._exit(1)  # peers may be dead: no collective clean-up to wait on


def run(a) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    from torch.distributed.fsdp import fully_shard

    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
    from gptoss_cloud.trainer.checkpoint.state import RNGState

    local_dir = a.local_dir.format(rank=rank) if a.local_dir else None  # "{rank}": one folder per simulated node
    spec = RunSpec.model_validate({"method": {"kind": a.method}, "checkpoint": {
        "every_steps": a.every, "keep_last": a.keep, "async_save": a.async_save, "local_dir": local_dir,
        "writer_threads": a.writer_threads if a.writer_threads == "auto" else int(a.writer_threads),
        **({"peer_timeout_s": a.peer_timeout_s} if a.peer_timeout_s else {})}})
    model = build_model(a.method)
    base = model.base_model.model if a.method == "lora" else model
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    data = DataPosition(world, rank)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": data, "rng": RNGState()}

    import gptoss_cloud.trainer.checkpoint.publish as ck  # where the uploads happen

    real = ck.upload_files
    if a.die_during_upload is not None:  # the test's fault: die in the middle of publishing a step
        def dying_upload(store, items, **kw):
            step = a.die_during_upload
            if any(f"step-{step}/" in key for _, key in items) and rank == a.die_rank:
                real(store, items[:1], **kw)
                if a.die_once_peers_reported:
                    import time

                    others = [f"step-{step}/_parts/rank-{r}.json" for r in range(world) if r != rank]
                    deadline = time.time() + 60
                    while not all(store.exists(k) for k in others) and time.time() < deadline:
                        time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(store, items, **kw)

        ck.upload_files = dying_upload
    elif a.slow_upload_rank == rank:
        def slow_upload(store, items, **kw):
            import time

            time.sleep(a.slow_upload_s)
            return real(store, items, **kw)

        ck.upload_files = slow_upload

    ckpt = Checkpointer(spec.checkpoint, a.home, spec=spec)
    torch.manual_seed(1234 + rank)  # the RNG stream a fresh run starts from (restore overrides it)
    start = ckpt.restore(state)
    if a.nudge:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + a.nudge)
    log = open(a.log, "a") if rank == 0 else None
    if a.fingerprint:
        fp = fingerprint(model)
        if log:
            log.write(json.dumps({"restored": start, "fp": fp, "samples": data.samples, "attempt": a.attempt}) + "\n")
            log.flush()
    for step in range(start + 1, a.steps + 1):
        ids = data.next_batch(16, 256)
        labels = ids.clone()
        labels[torch.rand(labels.shape) < 0.3] = -100  # draws from the global RNG
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        if log:
            log.write(json.dumps({"step": step, "loss": avg.item() / world, "attempt": a.attempt}) + "\n")
            log.flush()
        if a.die_at == step and rank == a.die_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if ckpt.maybe_save(step, state, last=step == a.steps) and a.fingerprint:
            ckpt.wait()
            fp = fingerprint(model)
            if log:
                log.write(json.dumps({"saved": step, "fp": fp, "samples": data.samples}) + "\n")
                log.flush()
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
