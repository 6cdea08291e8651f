"""method.qat: mxfp4 closes the export gap: the tiny model, full fine-tuning on the bundled sample from an
MXFP4 base (expert weights on the MXFP4 grid, as the released checkpoints hold them), 40 steps with and
without QAT; then the eval loss of each trained model as it trained (its own forward) and of its MXFP4
export (every expert matrix through quantize_expert_weight -> dequantize, the export's arithmetic,
evaluated without QAT).

The export gap is export loss - trained loss. With QAT it is 0.0 exactly: in fp32 the QAT forward and
the exported model run the same kernels on bit-identical weights (tests/unit/test_qat.py), so any
difference means the forward did not train what the export writes. Without QAT it is what rounding
costs a fine-tune whose expert updates are smaller than the MXFP4 step: measured 0.116 nats here (and
0.02-0.07 at other learning rates and expert scales). The margin, 0.02, is a fifth of that and 20x
the +-0.001 the gap moves by when the experts hardly matter (expert scale 0.02), so a change that
made rounding harmless, or QAT not the export, shows. About 20 s on 2 cores.

The trained-and-exported losses themselves are printed, not asserted: at this size QAT's export is
about as good as the plain run's (5.448 against 5.476 here), better or worse by a few hundredths
depending on the learning rate (docs/qat.md).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

STEPS, LR, EXPERT_STD, MARGIN = 40, 3e-4, 0.1, 0.02
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def _sample_rows():
    """The bundled sample, packed at 256 tokens, its token ids renumbered densely (444 ids -> a 448-row
    vocabulary: the 201,088 one would make the embedding nearly all the parameters)."""
    from gptoss_cloud.contract.sections import DataSection
    from gptoss_cloud.trainer.data.pipeline import build_datasets
    from gptoss_cloud.trainer.data.sources import sample_path

    data = DataSection.model_validate({"datasets": [{"path": str(sample_path())}], "max_seq_len": 256, "shuffle": False})
    ds = build_datasets(data, use_cache=False, log_notes=False)
    rows = ds.train + ds.validation
    ids = {t: i for i, t in enumerate(sorted({t for r in rows for t in r.input_ids}))}
    rows = [replace(r, input_ids=[ids[t] for t in r.input_ids], labels=[ids[t] if t >= 0 else t for t in r.labels])
            for r in rows]
    return rows, -(-len(ids) // 64) * 64


def _round_experts_(model) -> None:
    from gptoss_cloud.trainer.kernels.mxfp4 import dequantize_expert_weight, quantize_expert_weight

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(EXPERTS):
                p.copy_(dequantize_expert_weight(*quantize_expert_weight(p), p.dtype))


def _train(qat: str, rows, vocab: int):
    from gptoss_cloud.contract.shapes import TINY
    from gptoss_cloud.contract.sections import MethodSection, OptimSection
    from gptoss_cloud.trainer import causal_lm as LM
    from gptoss_cloud.trainer import model as M
    from gptoss_cloud.trainer.loop import Loop, make_optimizer
    from gptoss_cloud.trainer.parallel import DistInfo

    torch.manual_seed(0)
    config = M.build_config(replace(TINY, vocab_size=vocab), "eager", "eager")
    hf = M.create_model(config, torch.float32, "cpu", seed=0)
    with torch.no_grad():  # experts that carry signal, on the MXFP4 grid (a released base)
        for name, p in hf.named_parameters():
            if name.endswith(EXPERTS):
                p.normal_(0, EXPERT_STD)
    _round_experts_(hf)
    module = LM.CausalLMWithChunkedLoss(M.apply_method(hf, MethodSection(kind="full", qat=qat)), 1024)
    optim = OptimSection(lr=LR, warmup_steps=0, schedule="constant", max_steps=STEPS, micro_batch_size=1, seed=0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    loop = Loop(module=module, config=config, optimizer=make_optimizer(list(module.parameters()), optim, info.device),
                optim=optim, info=info, samples=rows, val_samples=rows, steps=STEPS)
    loop.run()
    trained = loop.evaluate()
    exported = copy.deepcopy(module)
    exported.config._experts_implementation = "eager"  # the served model: no fake quantisation
    _round_experts_(exported)
    loop.module = exported
    return trained, loop.evaluate()


def test_qat_trains_what_the_mxfp4_export_writes():
    torch.set_num_threads(2)
    rows, vocab = _sample_rows()
    plain_trained, plain_export = _train("none", rows, vocab)
    qat_trained, qat_export = _train("mxfp4", rows, vocab)
    gap_plain, gap_qat = plain_export - plain_trained, qat_export - qat_trained
    print(f"\nplain: trained {plain_trained:.4f} exported {plain_export:.4f} gap {gap_plain:.4f}"
          f"\nqat:   trained {qat_trained:.4f} exported {qat_export:.4f} gap {gap_qat:.4f}")
    assert plain_trained < 5.9 and qat_trained < 5.9  # both learned (the untrained loss is ~6.1)
    assert gap_qat == 0.0
    assert gap_plain > MARGIN, (plain_trained, plain_export)
