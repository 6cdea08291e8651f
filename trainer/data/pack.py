"""Pack tokenized sequences into fixed budgets of max_seq_len tokens.

Every sample is exactly max_seq_len long. ``seq_lens`` lists the segments in order (the tail padding
is a segment of its own), so variable-length attention never lets a real token see another sequence
or the padding; ``position_ids`` restart at 0 in every segment.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from gptoss_cloud.trainer.data.harmony import IGNORE, TokenizedSequence
from gptoss_cloud.trainer.data.vocab import PAD_ID


@dataclass
class PackedSample:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]
    rows: list[int] = field(default_factory=list)  # source row of each real segment (padding excluded)


@dataclass
class PackStats:
    sequences: int = 0  # packed
    dropped: int = 0  # longer than max_seq_len with overlong: drop
    truncated: int = 0  # cut to max_seq_len with overlong: truncate
    untrained: int = 0  # no trained token (all masked): left out


def pack(seqs: list[TokenizedSequence], max_seq_len: int, *, overlong: str = "drop",
         stats: PackStats | None = None) -> list[PackedSample]:
    """Best-fit decreasing bin packing; deterministic (ties keep input order)."""
    stats = stats if stats is not None else PackStats()
    kept: list[tuple[int, list[int], list[int]]] = []
    for s in seqs:
        ids, labels = s.input_ids, s.labels
        if len(ids) > max_seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            stats.truncated += 1
        if all(x == IGNORE for x in labels):
            stats.untrained += 1
            continue
        kept.append((s.row, ids, labels))
    stats.sequences += len(kept)

    # Longest first, each into the fullest bin that still has room.
    order = sorted(range(len(kept)), key=lambda i: (-len(kept[i][1]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = len(kept[i][1])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))

    out = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        lens: list[int] = []
        rows: list[int] = []
        for i in members:
            row, s_ids, s_labels = kept[i]
            ids += s_ids
            labels += s_labels
            pos += range(len(s_ids))
            lens.append(len(s_ids))
            rows.append(row)
        pad = max_seq_len - len(ids)
        if pad:
            ids += [PAD_ID] * pad
            labels += [IGNORE] * pad
            pos += range(pad)
            lens.append(pad)
        out.append(PackedSample(ids, labels, pos, lens, rows))
    return out
