"""GptOssForCausalLM with our attention selected (``gptoss_flex``), fp32 on CPU, tiny shape.

The packed batch must give the loss of its samples run separately (no attention across samples,
windows restarting per sample), and the same loss and parameter gradients as the eager model.
Gradients need the flex CPU-backward guard lifted (see test_attention.py for why that is sound).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from gptoss_cloud.contract.shapes import TINY  # noqa: E402
from gptoss_cloud.trainer import causal_lm as LM  # noqa: E402
from gptoss_cloud.trainer import model as M  # noqa: E402
from gptoss_cloud.trainer.data.pack import PackedSample  # noqa: E402
from gptoss_cloud.trainer.kernels import attention as A  # noqa: E402

from test_attention import flex_backward_on_cpu, rel_err  # noqa: E402,F401  (tests/unit is on sys.path)

SHAPE = replace(TINY, vocab_size=512, sliding_window=4)  # a small window so sliding layers differ from full


Sample = PackedSample  # the data pipeline's own packed row


def _segment(n, g):
    ids = torch.randint(0, SHAPE.vocab_size, (n,), generator=g).tolist()
    return ids, [(-100 if i < n // 3 else t) for i, t in enumerate(ids)]  # an untrained prompt part


def _pack(segs, length):
    """One packed row: the segments, then a padding segment up to ``length`` (at least one token)."""
    ids = [t for s in segs for t in s[0]]
    labels = [t for s in segs for t in s[1]]
    pos = [i for s in segs for i in range(len(s[0]))]
    pad = length - len(ids)
    return Sample(ids + [0] * pad, labels + [-100] * pad, pos + list(range(pad)), [len(s[0]) for s in segs] + [pad])


def _model(attn, seed=0):
    cfg = M.build_config(SHAPE, attn, "eager")
    module = LM.CausalLMWithChunkedLoss(M.create_model(cfg, torch.float32, seed=seed), chunk_tokens=7)
    with torch.no_grad():  # transformers initialises sinks near 0: make them matter
        for layer in module.decoder.layers:
            layer.self_attn.sinks.normal_(0.5, 1.0)
    return module, cfg


def test_packed_loss_equals_samples_run_separately():
    module, cfg = _model(A.NAME)
    assert cfg._attn_implementation == "gptoss_flex"
    g = torch.Generator().manual_seed(1)
    segs = [_segment(n, g) for n in (9, 6, 11)]  # longer than the window
    packed = LM.Batch.from_samples([_pack(segs, 32)], torch.device("cpu"))
    with torch.no_grad():  # forward only: flex runs on CPU as is
        loss, count, _ = LM.run_batch(module, packed, cfg, torch.float32)
        sep_loss, sep_count = 0.0, 0
        for s in segs:
            b = LM.Batch.from_samples([_pack([s], len(s[0]) + 1)], torch.device("cpu"))
            l, c, _ = LM.run_batch(module, b, cfg, torch.float32)
            sep_loss += float(l)
            sep_count += int(c)
    assert int(count) == sep_count
    assert float(loss) == pytest.approx(sep_loss, rel=1e-5)


@pytest.mark.usefixtures("flex_backward_on_cpu")
def test_model_matches_eager_model_loss_and_gradients():
    ref, cfg_ref = _model("eager")
    ours, cfg = _model(A.NAME)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    rows = [_pack([_segment(12, g), _segment(5, g), _segment(10, g)], 30), _pack([_segment(29, g)], 30)]
    batch = LM.Batch.from_samples(rows, torch.device("cpu"))
    l1, c1, _ = LM.run_batch(ref, batch, cfg_ref, torch.float32)
    l2, c2, _ = LM.run_batch(ours, batch, cfg, torch.float32)
    (l1 / c1).backward()
    (l2 / c2).backward()
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    sinks = [n for n in grads if n.endswith("sinks")]
    assert len(sinks) == SHAPE.num_hidden_layers
    for n, p in ours.named_parameters():
        assert rel_err(p.grad, grads[n]) < 1e-5, n
    for n in sinks:
        assert grads[n].abs().min() > 1e-6, n  # the sinks do learn


def test_flex_is_refused_for_cpu_training():
    from gptoss_cloud.contract.sections import KernelsSection

    assert M.resolve_implementations(KernelsSection(attention="flex"), "cuda")[0] == "gptoss_flex"
    assert M.resolve_implementations(KernelsSection(attention="hf_flex"), "cuda")[0] == "flex_attention"
    with pytest.raises(ValueError, match="kernels.attention: flex trains only on a CUDA GPU"):
        M.resolve_implementations(KernelsSection(attention="flex"), "cpu")
