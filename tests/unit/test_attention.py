"""Our flex attention with learned sinks (kernels/attention.py) against transformers' eager GPT-OSS
attention, fp32 on CPU: forward, dq/dk/dv, d sinks, packed segments, 128-token sliding windows.

torch's flex_attention has no CPU backward: its front end refuses ``requires_grad`` inputs on CPU
(``_validate_device``) because the compiled CPU kernel is inference-only. The uncompiled flex path
underneath (the same higher-order op, with its reference forward and backward, including the
gradient of the returned log-sum-exp) is device-agnostic, so the gradient tests lift that one
guard (``flex_backward_on_cpu``) and run the real flex op. Forward-only tests run it unpatched.
The fused Triton kernel itself is checked in tests/gpu/test_attention_gpu.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding, eager_attention_forward  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask  # noqa: E402

from gptoss_cloud.contract.shapes import TINY  # noqa: E402
from gptoss_cloud.trainer import causal_lm as LM  # noqa: E402
from gptoss_cloud.trainer import model as M  # noqa: E402
from gptoss_cloud.trainer.kernels import attention as A  # noqa: E402

WINDOW = 128  # GPT-OSS's sliding window, at full size: rows longer than it are cheap on CPU here
FP32 = dict(rtol=1e-5, atol=1e-5)


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)


def eager_mask(seq_lens, seq_len, window, dtype=torch.float32):
    """(B, 1, L, L) additive mask built directly from the definition, independent of our code."""
    rows = []
    for lens in seq_lens:
        seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        q = torch.arange(seq_len)[:, None]
        k = torch.arange(seq_len)[None, :]
        ok = (k <= q) & (seg[:, None] == seg[None, :])
        if window is not None:
            ok &= q - k < window
        rows.append(ok)
    ok = torch.stack(rows)[:, None]
    return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)


class _Heads(torch.nn.Module):
    """What eager_attention_forward reads off the attention module: sinks and the GQA group size."""

    def __init__(self, sinks, groups):
        super().__init__()
        self.sinks = sinks
        self.num_key_value_groups = groups
        self.training = True


def _inputs(seed, b=2, hq=4, hkv=2, n=300, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g) * 2  # sharper scores than unit: masks and sinks matter more
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    sinks = torch.randn(hq, generator=g) * 2 + 1  # some heads lean on the sink, some barely
    return q, k, v, sinks


SEQ_LENS = [[150, 7, 131, 12], [1, 299]]  # several lengths, a 1-token segment, none a multiple of 128


@pytest.mark.parametrize("window", [None, WINDOW], ids=["full", "sliding128"])
def test_forward_and_gradients_match_eager(window, flex_backward_on_cpu):
    q, k, v, sinks = _inputs(0)
    n = q.shape[2]
    scale = q.shape[-1] ** -0.5
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))

    ref_in = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    mod = _Heads(ref_in[3], q.shape[1] // k.shape[1])
    ref, _ = eager_attention_forward(mod, *ref_in[:3], eager_mask(SEQ_LENS, n, window), scaling=scale)
    ref.backward(go.transpose(1, 2))

    ours_in = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    segs = A.segment_ids(SEQ_LENS, n, "cpu")
    out = A.sink_attention(*ours_in[:3], ours_in[3], A.build_block_mask(segs, window), scale)
    out.backward(go)

    torch.testing.assert_close(out.transpose(1, 2), ref, **FP32)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), ours_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, **FP32, msg=lambda m, name=name: f"{name}: {m}")
    assert ref_in[3].grad.abs().min() > 1e-4  # every head's sink really receives a gradient


def test_sliding_window_and_segments_change_the_result():
    """The cases above are not vacuous: window, segments and sinks each change the output."""
    q, k, v, sinks = _inputs(1, b=1)
    n = q.shape[2]
    scale = q.shape[-1] ** -0.5
    segs = A.segment_ids([[300]], n, "cpu")
    packed = A.segment_ids([[150, 150]], n, "cpu")
    full = A.sink_attention(q, k, v, sinks, A.build_block_mask(segs, None), scale)
    slid = A.sink_attention(q, k, v, sinks, A.build_block_mask(segs, WINDOW), scale)
    sep = A.sink_attention(q, k, v, sinks, A.build_block_mask(packed, None), scale)
    nosink = A.sink_attention(q, k, v, sinks - 1e4, A.build_block_mask(segs, None), scale)
    # Rows before the window fills (q < 128) are identical; after it, they differ.
    torch.testing.assert_close(full[:, :, :WINDOW], slid[:, :, :WINDOW], **FP32)
    assert (full[:, :, WINDOW:] - slid[:, :, WINDOW:]).abs().max() > 1e-2
    torch.testing.assert_close(full[:, :, :150], sep[:, :, :150], **FP32)
    assert (full[:, :, 150:] - sep[:, :, 150:]).abs().max() > 1e-2
    assert (full - nosink).abs().max() > 1e-2


def test_block_mask_is_the_packed_sliding_causal_mask():
    """Our BlockMask, materialised, is exactly transformers' eager packed mask for both layer types."""
    shape = replace(TINY, vocab_size=512, sliding_window=WINDOW)
    cfg = M.build_config(shape, "eager", "eager")
    seq_lens = [[150, 7, 131, 12], [1, 299]]
    hf = LM.packed_attention_masks(cfg, seq_lens, 300, torch.device("cpu"), torch.float32)
    A.clear_mask_cache()
    ours = A.packed_block_masks(cfg, seq_lens, 300, "cpu")
    for layer_type, window in (("full_attention", None), ("sliding_attention", WINDOW)):
        dense = ours[layer_type].to_dense()  # block-level; the element mask comes from mask_mod
        assert dense.shape[-1] == 3  # ceil(300 / 128) blocks
        from torch.nn.attention.flex_attention import create_mask

        elem = create_mask(ours[layer_type].mask_mod, 2, None, 300, 300, device="cpu")
        assert torch.equal(elem, hf[layer_type] == 0)
        assert torch.equal(elem, eager_mask(seq_lens, 300, window) == 0)


def test_block_masks_are_built_once_per_batch_shape():
    cfg = M.build_config(replace(TINY, vocab_size=512, sliding_window=WINDOW), "eager", "eager")
    A.clear_mask_cache()
    a = A.packed_block_masks(cfg, [[100, 100]], 200, "cpu")
    b = A.packed_block_masks(cfg, [[100, 100]], 200, "cpu")
    c = A.packed_block_masks(cfg, [[60, 140]], 200, "cpu")
    assert set(a) == {"full_attention", "sliding_attention"}
    assert a["full_attention"] is b["full_attention"] and a["sliding_attention"] is b["sliding_attention"]
    assert c["full_attention"] is not a["full_attention"]
    with pytest.raises(ValueError, match="sum to the row length 200"):
        A.packed_block_masks(cfg, [[60, 100]], 200, "cpu")


def test_sink_fold_is_the_concatenated_softmax():
    """out * sigmoid(lse - sink) == softmax over [scores, sink] with the sink column dropped."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 5, 7, generator=g) * 4
    v = torch.randn(2, 3, 7, 4, generator=g)
    sinks = torch.randn(3, generator=g) * 3
    cat = torch.cat([s, sinks.view(1, 3, 1, 1).expand(2, 3, 5, 1)], -1).softmax(-1)[..., :-1] @ v
    folded = A.fold_sinks(s.softmax(-1) @ v, s.logsumexp(-1), sinks)
    torch.testing.assert_close(folded, cat, rtol=1e-6, atol=1e-6)
    empty = A.fold_sinks(torch.zeros(1, 3, 1, 4), torch.full((1, 3, 1), float("-inf")), sinks)
    assert torch.equal(empty, torch.zeros_like(empty))  # a query seeing nothing outputs 0, as in eager


def test_sink_fold_gradients_gradcheck():
    g = torch.Generator().manual_seed(4)
    out = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lse = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(A.fold_sinks, (out, lse, sinks))


def test_bf16_fold_keeps_the_factor_in_fp32():
    """bf16 activations: the factor comes from the fp32 lse, the sink gradient is reduced in fp32."""
    g = torch.Generator().manual_seed(6)
    out = torch.randn(1, 2, 64, 16, generator=g)
    lse = torch.randn(1, 2, 64, generator=g) + 10  # where bf16 spacing is 1/16
    sinks = torch.tensor([9.5, 10.5])
    go = torch.randn(out.shape, generator=g)
    ref_in = [t.clone().requires_grad_() for t in (out, lse, sinks)]
    A.fold_sinks(*ref_in).backward(go)
    bf = [t.clone().requires_grad_() for t in (out.bfloat16(), lse, sinks.bfloat16())]
    y = A.fold_sinks(*bf)
    assert y.dtype == torch.bfloat16
    y.backward(go.bfloat16())
    ref = A.fold_sinks(out, lse, sinks)
    assert rel_err(y.float(), ref) < 4e-3  # bf16 rounding of the output, nothing more
    assert rel_err(bf[2].grad.float(), ref_in[2].grad) < 4e-3
    assert rel_err(bf[1].grad, ref_in[1].grad) < 4e-3


# ------------------------------------------------------------------------------ through transformers
def _layer(impl, seed=0):
    shape = replace(TINY, vocab_size=512, sliding_window=WINDOW)
    cfg = M.build_config(shape, impl, "eager")
    torch.manual_seed(seed)
    attn = GptOssAttention(cfg, layer_idx=0)  # layer 0 is a sliding layer
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.1)  # larger weights give gradients in the thousands: fp32 rounding, not the kernel
    return attn, cfg


def test_registered_layer_matches_eager_layer(flex_backward_on_cpu):
    """GptOssAttention dispatching to ours by name: hidden-state and all parameter gradients."""
    ref, cfg_ref = _layer("eager")
    ours, cfg = _layer(A.NAME)
    ours.load_state_dict(ref.state_dict())
    assert ours.layer_type == "sliding_attention"
    seq_lens = [[140, 3, 87], [230]]
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 230, cfg.hidden_size, generator=g)
    pos = torch.cat([torch.arange(n) for n in seq_lens[0]])[None].expand(2, -1).clone()
    pos[1] = torch.arange(230)
    rope = GptOssRotaryEmbedding(cfg)
    cos_sin = rope(h, pos)
    results = []
    for mod, c in ((ref, cfg_ref), (ours, cfg)):
        masks = LM.packed_attention_masks(c, seq_lens, 230, torch.device("cpu"), torch.float32)
        x = h.clone().requires_grad_()
        out, _ = mod(x, cos_sin, masks["sliding_attention"])
        out.square().sum().backward()
        results.append((out, x.grad, {n: p.grad for n, p in mod.named_parameters()}))
    (o1, g1, p1), (o2, g2, p2) = results
    assert isinstance(LM.packed_attention_masks(cfg, seq_lens, 230, "cpu", torch.float32)["full_attention"], BlockMask)
    torch.testing.assert_close(o2, o1, **FP32)
    torch.testing.assert_close(g2, g1, **FP32)
    for name in p1:  # sums over 460 tokens: compared as a whole (norm-relative), fp32 rounding is ~1e-6
        assert rel_err(p2[name], p1[name]) < 1e-5, name


def test_a_plain_tensor_mask_is_refused():
    attn, cfg = _layer(A.NAME)
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(TypeError, match="needs a flex BlockMask"):
        A.gptoss_flex_attention_forward(attn, q, q[:, :2], q[:, :2], torch.zeros(1, 1, 8, 8))
