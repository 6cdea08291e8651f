"""The chunked linear + cross-entropy against plain logits + F.cross_entropy."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from gptoss_cloud.trainer.kernels.loss import IGNORE_INDEX, chunked_linear_cross_entropy, reference_linear_cross_entropy, shift_packed_labels


def _inputs(n=37, h=24, v=301, masked=0.4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.2
    targets = torch.randint(0, v, (2, n), generator=g)
    targets[torch.rand(2, n, generator=g) < masked] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_values_and_gradients_match_reference_fp32(chunk):
    hidden, weight, targets = _inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, count = chunked_linear_cross_entropy(h1, w1, targets, chunk_tokens=chunk)
    ref, ref_count = reference_linear_cross_entropy(h2, w2, targets)
    assert int(count) == int(ref_count) == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # A non-unit upstream gradient (what dividing by a global token count does).
    (loss * 0.37).backward()
    (ref * 0.37).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, targets = _inputs(seed=1)
    h = hidden.clone().requires_grad_()
    loss, _ = chunked_linear_cross_entropy(h, weight, targets, chunk_tokens=8)
    loss.backward()
    assert weight.grad is None and h.grad is not None
    # Untrained positions get exactly zero gradient: their logits were never computed.
    assert torch.all(h.grad[targets == IGNORE_INDEX] == 0)


def test_uses_exactly_the_given_labels():
    hidden, weight, targets = _inputs(seed=2)
    loss, count = chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=5)
    # Recompute by hand, token by token, from the labels we passed in.
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    expect = 0.0
    n = 0
    for i, y in enumerate(targets.reshape(-1).tolist()):
        if y != IGNORE_INDEX:
            expect += float(torch.logsumexp(logits[i], 0) - logits[i, y])
            n += 1
    assert int(count) == n
    assert abs(float(loss) - expect) < 1e-3
    # Changing one trained label changes the loss; changing an ignored position's input does not.
    t2 = targets.clone()
    i = int((targets.reshape(-1) != IGNORE_INDEX).nonzero()[0])
    t2.view(-1)[i] = (t2.view(-1)[i] + 1) % weight.shape[0]
    assert float(chunked_linear_cross_entropy(hidden, weight, t2)[0]) != pytest.approx(float(loss))
    h2 = hidden.clone()
    j = int((targets.reshape(-1) == IGNORE_INDEX).nonzero()[0])
    h2.view(-1, hidden.shape[-1])[j] += 5.0
    assert float(chunked_linear_cross_entropy(h2, weight, targets)[0]) == pytest.approx(float(loss), rel=1e-6)


def test_no_trained_tokens_gives_zero_with_a_graph():
    hidden, weight, _ = _inputs()
    h = hidden.clone().requires_grad_()
    targets = torch.full(hidden.shape[:2], IGNORE_INDEX)
    loss, count = chunked_linear_cross_entropy(h, weight, targets)
    assert int(count) == 0 and float(loss) == 0.0
    loss.backward()
    assert torch.all(h.grad == 0)


def test_bad_target_id_is_refused():
    hidden, weight, targets = _inputs()
    targets[0, 0] = weight.shape[0]
    with pytest.raises(ValueError, match="target ids"):
        chunked_linear_cross_entropy(hidden, weight, targets)


def test_bf16_close_to_fp32_reference():
    hidden, weight, targets = _inputs(seed=3)
    loss, _ = chunked_linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, chunk_tokens=9)
    ref, _ = reference_linear_cross_entropy(hidden, weight, targets)
    assert float(loss) == pytest.approx(float(ref), rel=1e-2)


def test_shift_packed_labels_never_crosses_segments():
    labels = torch.tensor([[10, 11, 12, 20, 21, -100, -100]])
    t = shift_packed_labels(labels, [[3, 2, 2]])
    assert t.tolist() == [[11, 12, -100, 21, -100, -100, -100]]
