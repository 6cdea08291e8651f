"""Packing invariants: fixed length, no token lost or duplicated, segment boundaries and positions right."""

from __future__ import annotations

import random

from gptoss_cloud.trainer.data.harmony import IGNORE, TokenizedSequence
from gptoss_cloud.trainer.data.pack import PackStats, pack
from gptoss_cloud.trainer.data.vocab import PAD_ID


def _seqs(n, lo, hi, seed=0):
    rng = random.Random(seed)
    out = []
    for row in range(n):
        k = rng.randint(lo, hi)
        ids = [rng.randrange(1000, 2000) for _ in range(k)]
        labels = [t if rng.random() < 0.4 else IGNORE for t in ids]
        labels[-1] = ids[-1]  # at least one trained token
        out.append(TokenizedSequence(row=row, input_ids=ids, labels=labels))
    return out


def _unpack(samples):
    """Split packed samples back into (row, ids, labels) using only seq_lens and rows."""
    got = []
    for p in samples:
        start = 0
        for j, n in enumerate(p.seq_lens):
            ids, labels, pos = p.input_ids[start:start + n], p.labels[start:start + n], p.position_ids[start:start + n]
            assert pos == list(range(n)), "positions restart at 0 in every segment"
            if j < len(p.rows):
                got.append((p.rows[j], ids, labels))
            else:  # the tail padding: its own segment, never trained
                assert j == len(p.seq_lens) - 1
                assert ids == [PAD_ID] * n and labels == [IGNORE] * n
            start += n
        assert start == len(p.input_ids)
    return got


def test_no_token_lost_or_duplicated_and_fixed_length():
    seqs = _seqs(300, 1, 200)
    samples = pack(seqs, 256)
    for p in samples:
        assert len(p.input_ids) == len(p.labels) == len(p.position_ids) == 256
        assert sum(p.seq_lens) == 256 and all(n > 0 for n in p.seq_lens)
        assert len(p.seq_lens) - len(p.rows) in (0, 1)
    got = _unpack(samples)
    want = [(s.row, s.input_ids, s.labels) for s in seqs]
    assert sorted(got) == sorted(want)
    # Best-fit decreasing packs tightly: padding is a small share of the budget here.
    pad = sum(p.seq_lens[-1] for p in samples if len(p.seq_lens) > len(p.rows))
    assert pad / (256 * len(samples)) < 0.05


def test_exact_fit_has_no_padding_segment():
    seqs = [TokenizedSequence(0, [5] * 10, [5] * 10), TokenizedSequence(1, [6] * 6, [6] * 6)]
    [p] = pack(seqs, 16)
    assert p.seq_lens == [10, 6] and p.rows == [0, 1] and p.position_ids == list(range(10)) + list(range(6))


def test_overlong_drop_and_truncate_are_counted():
    seqs = [TokenizedSequence(0, list(range(1, 21)), list(range(1, 21))), TokenizedSequence(1, [7] * 5, [7] * 5)]
    st = PackStats()
    samples = pack(seqs, 16, stats=st)
    assert st.dropped == 1 and st.truncated == 0 and st.sequences == 1
    assert [r for p in samples for r in p.rows] == [1]
    st = PackStats()
    samples = pack(seqs, 16, overlong="truncate", stats=st)
    assert st.truncated == 1 and st.dropped == 0
    got = dict((r, ids) for r, ids, _ in _unpack(samples))
    assert got[0] == list(range(1, 17))


def test_untrained_sequences_are_left_out():
    st = PackStats()
    samples = pack([TokenizedSequence(0, [1, 2], [IGNORE, IGNORE]), TokenizedSequence(1, [3], [3])], 8, stats=st)
    assert st.untrained == 1 and [r for p in samples for r in p.rows] == [1]


def test_deterministic():
    seqs = _seqs(100, 1, 90, seed=3)
    a, b = pack(seqs, 128), pack(list(seqs), 128)
    assert [(p.input_ids, p.seq_lens, p.rows) for p in a] == [(p.input_ids, p.seq_lens, p.rows) for p in b]
