"""The merge's export at full size: wall time and peak host memory of ``merge --format bf16|mxfp4`` over a
random-weight model of a preset's shape (20b by default), on one GPU machine, with one command:

    python -m gptoss_cloud.trainer.bench.export DIR [--model 20b] [--formats mxfp4,bf16] [--lora-experts]

It builds the model with random weights (``model.init: random``) on the GPU, writes it to ``DIR/base/``
as the published checkpoints are laid out (MXFP4 experts, bf16 elsewhere, ``quantization_config``),
wraps it in the spec's default LoRA (attention; ``--lora-experts`` adapts the experts too, so the export
requantises them instead of copying the base's bytes), checkpoints that with the real Checkpointer, then
runs each format's merge in a fresh process of its own (so the peak is the merge's, not the build's) and
writes ``DIR/export-bench.json``: each merge's ``MergeResult.stats()`` (wall_s, bytes_written,
peak_rss_gib) beside the machine's memory. Each merged folder is removed after it is measured (disk).
Offline, the merge generates the tokenizer from the harmony vocabulary: set TIKTOKEN_ENCODINGS_BASE.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

MEASURE = """
import json, sys
from gptoss_cloud.trainer.merge.export import merge
r = merge(sys.argv[1], sys.argv[2], fmt=sys.argv[3], base=sys.argv[4])
print(json.dumps(r.stats()))
"""


def build(folder: Path, model_name: str, lora_experts: bool, device: str) -> Path:
    """DIR/base (the published layout) and DIR/run (a LoRA checkpoint over it); returns the run home."""
    import torch

    from gptoss_cloud.contract.spec import RunSpec
    from gptoss_cloud.trainer import model as M
    from gptoss_cloud.trainer.checkpoint import shards as st
    from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
    from gptoss_cloud.trainer.merge.mxfp4 import Mxfp4Layout, quantization_config

    spec = RunSpec.model_validate({"model": {"name": model_name, "init": "random"},
                                   "method": {"kind": "lora", "lora": {"experts": lora_experts}}})
    shape = M.model_shape(spec.model)
    config = M.build_config(shape, "eager", "eager")
    model = M.create_model(config, torch.bfloat16, device, seed=0)
    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    layout = Mxfp4Layout()  # experts quantised on the device, everything else bf16
    entries = layout.plan([(k, tuple(v.shape), v.dtype) for k, v in sd.items()], adapted=lambda _: True,
                          where=lambda _: "the random model")
    shards = st.plan_shards(entries, 5 * 10**9)
    names = st.shard_names(len(shards))
    get = layout.getter(sd.__getitem__)
    for shard, name in zip(shards, names):
        st.write_shard(base / name, shard, get)
    st.write_index(base / "model.safetensors.index.json", shards, names)
    cfg = config.to_dict()
    cfg.update(architectures=["GptOssForCausalLM"], dtype="bfloat16", torch_dtype="bfloat16",
               quantization_config=quantization_config())
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    lm = M.apply_method(model, spec.method)  # the merge reads only the adapter from the checkpoint
    home = folder / "run"
    ck = Checkpointer(spec.checkpoint, str(home), spec=spec, record_metrics=False)
    ck.save(1, {"model": lm})
    ck.close()
    return home


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--model", default="20b", choices=("20b", "120b", "tiny"), help="a preset shape")
    p.add_argument("--formats", default="mxfp4,bf16", type=_formats, help="comma-separated: mxfp4, bf16")
    p.add_argument("--lora-experts", action="store_true", help="adapt the experts too (the export requantises them)")
    p.add_argument("--device", default=None, help="where to build the random model (default: cuda if available)")
    return p


def _formats(text: str) -> str:
    bad = [f for f in text.split(",") if f not in ("mxfp4", "bf16")]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"--formats {text!r}: comma-separated mxfp4 and/or bf16")
    return text


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    import torch

    from gptoss_cloud.trainer.checkpoint.stats import GiB, rss_bytes

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    home = build(a.dir, a.model, a.lora_experts, device)
    report = {"model": a.model, "lora_experts": a.lora_experts, "build_rss_gib": round(rss_bytes() / GiB, 3),
              "host_memory_gib": round(_mem_total() / GiB, 1), "merges": []}
    for fmt in a.formats.split(","):
        out = a.dir / f"merged-{fmt}"
        r = subprocess.run([sys.executable, "-c", MEASURE, str(home), str(out), fmt, str(a.dir / "base")],
                           capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stderr[-4000:])
            return r.returncode
        stats = json.loads(r.stdout.strip().splitlines()[-1])
        report["merges"].append(stats)
        print(f"{a.model} {fmt}: {stats['wall_s']:.1f}s, {stats['bytes_written'] / 1e9:.2f} GB written, "
              f"peak host memory {stats['peak_rss_gib']:.2f} GiB ({stats['peak_rss_scope']})", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    (a.dir / "export-bench.json").write_text(json.dumps(report, indent=2))
    return 0


def _mem_total() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))


if __name__ == "__main__":
    raise SystemExit(main())
