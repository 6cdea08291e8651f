"""Tiled experts and activation offloading under FSDP2 (2 gloo processes) give the gradients of one process
running neither: the tiled Function takes the unsharded expert parameters as inputs and returns their
gradients, so FSDP2's post-backward reduce-scatter sees ordinary ``.grad``s.

Tolerance (fp32 on CPU): the runs differ in the order of fp32 sums only -- FSDP's reduction over ranks,
the tiles' partial sums of each expert-weight gradient (see tests/unit/test_long_context.py) -- so, as in
test_fsdp.py, |g_fsdp - g_ref| <= 1e-4 |g_ref| + 1e-6 ||g||."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as tmp  # noqa: E402

from test_fsdp import SHAPE, TIMEOUT_S, _free_port, _full, _samples  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
TILE = 5  # 24-token rows: tiles of 5, 5, 5, 5, 4


def _grads(distributed: bool, out: Path, rank: int = 0) -> None:
    from gptoss_cloud.contract.sections import KernelsSection, MethodSection, ParallelismSection

    from gptoss_cloud.trainer import causal_lm as LM
    from gptoss_cloud.trainer import model as M
    from gptoss_cloud.trainer.parallel import init_distributed, make_accelerator, shard_model

    info = init_distributed(TIMEOUT_S)
    attn, impl = M.resolve_implementations(KernelsSection(experts="fused", attention="eager"), "cpu")
    cfg = M.build_config(SHAPE, attn, impl)
    hf = M.create_model(cfg, torch.float32, seed=0)
    if distributed:  # the long-context settings on the sharded run only
        M.configure_experts_(hf, KernelsSection(moe_tile_tokens=TILE))
        M.enable_recompute(hf, "full")
    lm = M.apply_method(hf, MethodSection(kind="full"))
    module = LM.CausalLMWithChunkedLoss(lm, chunk_tokens=7, activation_offload=distributed)
    module.offload_min_bytes = 0
    if distributed:
        module = shard_model(module, make_accelerator(ParallelismSection(), info, bf16=False))
    module.train()
    rows = _samples(2)
    mine = [rows[rank]] if distributed else rows
    for row in mine:
        batch = LM.Batch.from_samples([row], info.device)
        loss, _, _ = LM.run_batch(module, batch, cfg, torch.float32)
        (loss / len(rows) * (info.world_size if distributed else 1)).backward()  # FSDP2 averages over ranks
    grads = {n: _full(p.grad) for n, p in module.named_parameters() if p.requires_grad}
    if distributed:
        st = module.offload_stats  # FSDP2's unsharded parameters are Parameters too: kept, not copied
        assert st.offloaded > 0 and st.kept_parameters > 0, st
    if rank == 0:
        torch.save(grads, out)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        _grads(True, Path(out), rank)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_tiled_offloaded_fsdp2_gradients_match_one_plain_process(tmp_path):
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") if k in os.environ}
    try:
        _grads(False, tmp_path / "ref.pt")
        tmp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "fsdp.pt")), nprocs=2, join=True)
    finally:
        os.environ.update(saved)
    ref, got = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "fsdp.pt")
    assert set(got) == set(ref) and any("experts.gate_up_proj" in k for k in ref)
    norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in ref.values())))
    for k, v in ref.items():
        assert v.abs().max() > 0, f"{k}: no gradient reached it, so the comparison proves nothing"
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6 * norm, msg=k)
