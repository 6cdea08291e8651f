"""Re-count the FLOPs of reports written before they followed what each row ran (report version 1).

Version-1 reports counted 6N (LoRA) or 8N (full) per token for every row, as if every row recomputed
its layers, and no attention. This reads such a report, infers the recomputation each row ran from
what its options and variant said (a row of ``auto`` that does not say is marked unknown rather than
guessed), and prints the old and the corrected TFLOP/s and MFU:

    python -m gptoss_cloud.trainer.bench.rederive docs/benchmarks/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptoss_cloud.contract.plan.flops import training_flops
from gptoss_cloud.contract.shapes import shape_for


def ran_recompute(report: dict, row: dict) -> str | None:
    """What the row ran: none | selective | full, or None where the report cannot tell."""
    if row.get("recompute"):
        return row["recompute"]
    opts = report["options"]
    if row["variant"]["stack"] == "transformers":
        return "none" if opts.get("recompute") == "none" else "full"
    asked = (row["variant"].get("overrides") or {}).get("recompute") or opts.get("recompute")
    if asked in ("none", "selective", "full"):
        return asked
    if opts.get("device") == "cuda" and asked is None and "recompute" not in opts:
        return "full"  # reports before the option existed: every row of ours recomputed
    return None


def rederive(report: dict) -> list[dict]:
    opts = report["options"]
    shape = shape_for(opts["model"], opts.get("layers"))
    peak = (report.get("flops") or {}).get("peak_tflops_per_gpu")
    out = []
    for row in report["results"]:
        tps = row.get("tokens_per_s_per_gpu")
        policy = ran_recompute(report, row)
        new_tflops = new_mfu = None
        if tps and policy:
            new_tflops = training_flops(shape, opts["method"], policy, [opts["seq"]]).per_token * tps / 1e12
            new_mfu = new_tflops / peak if peak else None
        out.append({"variant": row["variant"]["name"], "tokens_per_s_per_gpu": tps, "recompute": policy or "unknown",
                    "old_mfu": row.get("mfu"), "mfu": new_mfu, "tflops_per_gpu": new_tflops})
    return out


def main(paths: list[str]) -> None:
    print("| report | variant | tokens/s/GPU | recompute ran | MFU as reported | MFU corrected |")
    print("|---|---|---|---|---|---|")
    for p in paths:
        report = json.loads(Path(p).read_text())
        if report.get("report_version", 1) >= 2:
            continue
        for r in rederive(report):
            if r["tokens_per_s_per_gpu"] is None:
                continue
            old = f"{r['old_mfu']:.3f}" if r["old_mfu"] is not None else "–"
            new = f"{r['mfu']:.3f}" if r["mfu"] is not None else "unknown"
            print(f"| {Path(p).name} | {r['variant']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['recompute']} | {old} | {new} |")


if __name__ == "__main__":
    main(sys.argv[1:])
