"""Harmony data pipeline: sources, rendering + label masks, packing. Needs no torch.

The trainer calls ``build_datasets(spec.data)`` (rank 0 first, then a barrier, then the other ranks,
which read the cache at ``cache_path(spec.data)``).
"""

from gptoss_cloud.trainer.data.harmony import IGNORE, TokenizedSequence, tokenize_row
from gptoss_cloud.trainer.data.pack import PackedSample, pack
from gptoss_cloud.trainer.data.pipeline import Datasets, DataStats, build_datasets, cache_path
from gptoss_cloud.trainer.data.vocab import PAD_ID, load_encoding

__all__ = ["IGNORE", "PAD_ID", "DataStats", "Datasets", "PackedSample", "TokenizedSequence", "build_datasets",
           "cache_path", "load_encoding", "pack", "tokenize_row"]
