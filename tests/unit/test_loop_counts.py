"""The loop counts each step's trained and processed positions on the host, for every rank at once; the
counts must equal what the device batches hold."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from gptoss_cloud.trainer.loop import Loop  # noqa: E402
from gptoss_cloud.trainer.causal_lm import Batch  # noqa: E402


def _sample(seq_lens: list[int], untrained: set[int], seed: int) -> SimpleNamespace:
    n = sum(seq_lens)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n,), generator=g).tolist()
    labels = [-100 if t in untrained else ids[t] for t in range(n)]
    pos = [p for length in seq_lens for p in range(length)]
    return SimpleNamespace(input_ids=ids, labels=labels, position_ids=pos, seq_lens=seq_lens)


@pytest.mark.parametrize("seq_lens, untrained", [
    ([16], set()),
    ([5, 7, 4], {0, 1, 5, 6}),          # prompts masked in two of three packed segments
    ([3, 13], set(range(16))),          # nothing trained
    ([10, 6], {9, 10, 11}),             # a segment boundary inside the masked span
])
def test_host_counts_equal_the_device_batch(seq_lens, untrained):
    samples = [_sample(seq_lens, untrained, seed=i) for i in range(3)]
    loop = SimpleNamespace(samples=samples, _token_counts={}, config=SimpleNamespace(sliding_window=4))
    for i, s in enumerate(samples):
        trained, processed, full, sliding = Loop._tokens(loop, i)
        batch = Batch.from_samples([s], torch.device("cpu"))
        assert (trained, processed) == (batch.trained_tokens, batch.input_ids.numel())
        # The attention pairs are those the packed causal mask allows: within a segment, and for the
        # sliding layers at most the window's 4 latest keys.
        seg = torch.tensor([j for j, n in enumerate(seq_lens) for _ in range(n)])
        q, k = torch.meshgrid(torch.arange(len(seg)), torch.arange(len(seg)), indexing="ij")
        allowed = (seg[q] == seg[k]) & (k <= q)
        assert full == int(allowed.sum())
        assert sliding == int((allowed & (q - k < 4)).sum())
    assert set(loop._token_counts) == {0, 1, 2}  # counted once, then cached
