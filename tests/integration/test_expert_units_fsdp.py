"""parallelism.expert_units end to end on 2 gloo FSDP2 processes (full fine-tuning, tiny preset with the real
201,088 vocabulary): the run with each layer's 4 experts in 2 FSDP2 units trains the same losses as the run
with the experts whole, its checkpoint merges to transformers' names and shapes with the same weights, and
resuming it under another split stops with the setting named, the checkpoint kept.

Tolerance: both runs compute the same products on the same rows; the split run slices the sorted rows by
unit and reduce-scatters two smaller gradient buffers per layer, so the gradients differ only in the order
of fp32 sums (tests/unit/test_expert_units.py): the losses agree to 1e-4 relative. The weights then go
through AdamW, which divides each gradient element by its running RMS: an element whose gradient is near
Adam's eps can move by a different fraction of the learning rate in the two runs. So per element the bound
is the update budget itself, 2 x steps x lr, while over a tensor the mean difference stays at the level of
fp32 rounding of the updates (measured 1e-8 to 6e-8; asserted <= 1e-6). A wrong mapping of units to
experts would differ by the weights themselves (init std 0.02): a mean ~1e-2."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as tmp  # noqa: E402

from support import free_port  # noqa: E402
from test_fsdp_train import _sample  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _spec(units: int):
    from gptoss_cloud.contract.spec import RunSpec

    return RunSpec.model_validate({
        "model": {"name": "tiny", "init": "random"},
        "data": {"max_seq_len": 64},
        "method": {"kind": "full"},
        "optim": {"max_steps": 3, "lr": 5e-3, "warmup_steps": 1, "eval_every": 100, "log_every": 1},
        "parallelism": {"collective_timeout_s": 60, "expert_units": units},
        "checkpoint": {"every_steps": 3},
    })


def _datasets():
    return SimpleNamespace(train=[_sample(64, i) for i in range(6)], validation=[_sample(64, 100 + i) for i in range(2)])


def _worker(rank: int, port: int, home: str, units: int):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gptoss_cloud.trainer.train import run_training, shutdown

    try:
        run_training(_spec(units), "units", home, datasets=_datasets(), interactive=False)
    finally:
        shutdown()


def _losses(home: Path) -> list[float]:
    lines = [json.loads(x) for x in (home / "metrics.jsonl").read_text().splitlines()]
    by_step = {x["step"]: x["loss"] for x in lines if "event" not in x and "loss" in x}  # the last record repeats the final step
    return [by_step[s] for s in sorted(by_step)]


def _merged(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") if k in os.environ}
    try:
        homes = {}
        for units in (1, 2):
            homes[units] = tmp_path_factory.mktemp(f"units-{units}") / "run"
            tmp.spawn(_worker, args=(free_port(), str(homes[units]), units), nprocs=2, join=True)
    finally:
        os.environ.update(saved)
    return homes


def test_split_experts_train_the_same_losses(runs):
    whole, split = _losses(runs[1]), _losses(runs[2])
    assert len(whole) == len(split) == 3 and len(set(whole)) == 3  # the weights moved between steps
    assert split == pytest.approx(whole, rel=1e-4)


def test_split_checkpoint_merges_to_transformers_names(runs, tmp_path):
    from gptoss_cloud.trainer.merge.export import merge

    got = {}
    for units, home in runs.items():
        merge(str(home), str(tmp_path / f"merged-{units}"), verify=True, dtype="float32")
        got[units] = _merged(tmp_path / f"merged-{units}")
    assert set(got[2]) == set(got[1]) and "model.layers.0.mlp.experts.gate_up_proj" in got[2]
    assert not any(".units." in k for k in got[2])
    spec = _spec(2)
    budget = 2 * spec.optim.max_steps * spec.optim.lr
    for k, v in got[1].items():
        assert got[2][k].shape == v.shape, k
        diff = (got[2][k] - v).abs()
        assert float(diff.max()) <= budget and float(diff.mean()) <= 1e-6, (k, float(diff.max()), float(diff.mean()))


def test_resuming_under_another_split_names_the_setting_and_keeps_the_checkpoint(runs):
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.trainer.train import run_training

    home = runs[2]
    before = sorted(p.relative_to(home).as_posix() for p in (home / "checkpoints").rglob("*") if p.is_file())
    spec = _spec(1).model_copy(update={"optim": _spec(1).optim.model_copy(update={"max_steps": 4})})
    with pytest.raises(GptossError, match=r"trained with parallelism.expert_units: 2, this run has 1") as e:
        run_training(spec, "units", str(home), datasets=_datasets(), interactive=False)
    assert "expert_units: 2" in (e.value.hint or "")
    after = sorted(p.relative_to(home).as_posix() for p in (home / "checkpoints").rglob("*") if p.is_file())
    assert after == before and any(p.endswith("manifest.json") for p in after)


def test_one_process_without_checkpoints_saves_transformers_names(tmp_path):
    """Without checkpoints a full fine-tune's weights are gathered into merged/ directly: joined there too."""
    from transformers import GptOssForCausalLM

    from gptoss_cloud.trainer.loop import NoCheckpoints
    from gptoss_cloud.trainer.train import run_training

    spec = _spec(2)
    spec = spec.model_copy(update={"optim": spec.optim.model_copy(update={"max_steps": 1})})
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") if k in os.environ}
    try:
        run_training(spec, "one", str(tmp_path / "one"), datasets=_datasets(), checkpointer=NoCheckpoints(), interactive=False)
    finally:
        os.environ.update(saved)
    names = set(_merged(tmp_path / "one" / "merged"))
    assert "model.layers.1.mlp.experts.down_proj" in names and not any(".units." in n for n in names)
    model = GptOssForCausalLM.from_pretrained(str(tmp_path / "one" / "merged"))
    assert tuple(model.model.layers[1].mlp.experts.down_proj.shape) == (4, 64, 64)
