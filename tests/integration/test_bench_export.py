"""The full-size export benchmark's one command, run on the tiny shape on the CPU: it builds the
published-layout base and a LoRA checkpoint, measures the merge in a process of its own, and reports it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_export_bench_measures_the_requantising_merge(tmp_path):
    cmd = [sys.executable, "-m", "gptoss_cloud.trainer.bench.export", str(tmp_path), "--model", "tiny",
           "--formats", "mxfp4", "--lora-experts", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "export-bench.json").read_text())
    (m,) = report["merges"]
    assert m["format"] == "mxfp4" and m["wall_s"] > 0 and m["peak_rss_gib"] > 0 and m["bytes_written"] > m["model_bytes"] > 0
    assert report["lora_experts"] is True and f"tiny mxfp4: {m['wall_s']:.1f}s" in r.stdout
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert not (tmp_path / "merged-mxfp4").exists()  # removed once measured: a 20b folder needs the disk
