"""The serving-size tables of docs/serving-sizes.md and README.md are what the sizing computes (their defaults:
32,768 tokens, utilization 0.9, serve.kv_sequences 2, the catalog's 80 and 141 GiB)."""

from __future__ import annotations

import re

import pytest

from gptoss_cloud.contract.plan.serving import size_tp, weight_bytes
from gptoss_cloud.contract.shapes import GPT_OSS_20B, GPT_OSS_120B
from support import REPO

SHAPES = {"20b": GPT_OSS_20B, "120b": GPT_OSS_120B}
ROW = re.compile(r"^\| (20b|120b) \| (bf16|mxfp4) \| ([\d.]+) \|(.*)\|$", re.M)


def rows(page: str) -> list[tuple]:
    found = ROW.findall((REPO / page).read_text())
    assert len(found) == 4, f"{page}: expected the 4 rows (20b, 120b x bf16, mxfp4), found {len(found)}"
    return found


@pytest.mark.parametrize("model,fmt,gb,rest", rows("README.md"))
def test_readme_table(model, fmt, gb, rest):
    shape = SHAPES[model]
    assert float(gb) == round(weight_bytes(shape, fmt) / 1e9, 1)
    tps = [int(c) for c in rest.split("|")]
    assert tps == [size_tp(shape, gpu_memory_gib=g, fmt=fmt).tp for g in (80, 141)]


@pytest.mark.parametrize("model,fmt,gb,rest", rows("docs/serving-sizes.md"))
def test_serving_sizes_table(model, fmt, gb, rest):
    shape = SHAPES[model]
    assert float(gb) == round(weight_bytes(shape, fmt) / 1e9, 1)
    for cell, gib in zip(rest.split("|"), (80, 141)):
        tp, per_gpu, held = (c.strip() for c in cell.split(","))
        s = size_tp(shape, gpu_memory_gib=gib, fmt=fmt)
        assert (int(tp), float(per_gpu), int(held)) == (s.tp, round(s.per_gpu_gib, 1), s.sequences_held), cell
