"""``eval`` for a run home: pick the weights (its model, or one checkpoint merged for the occasion) or
the vLLM endpoint serving it, evaluate, and record the result where a run's results live: ``<home>/evals/``, an ``eval`` event in
``metrics.jsonl`` (so ``report`` shows it) and the trackers of ``output.report_to``."""

from __future__ import annotations

import json
import tempfile
import time
from typing import TYPE_CHECKING, Any

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import join, open_store

if TYPE_CHECKING:
    from gptoss_cloud.trainer.evaluation.endpoint import Endpoint


def _checkpoint_model(home: str, step: int, tmp: str):
    import torch
    from transformers import AutoModelForCausalLM

    from gptoss_cloud.trainer.merge.export import merge

    ref = join(home, f"checkpoints/step-{step}")
    if not open_store(ref).exists("manifest.json"):
        raise GptossError(f"run {home} has no published checkpoint at step {step} (no {ref}/manifest.json)",
                          hint="`gptoss-cloud status RUN` and the run's checkpoints/ folder show the steps kept")
    merge(ref, tmp)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval(), ref


def run_eval(run_id: str, home: str, spec: RunSpec, data: str, *, checkpoint: int | None = None, samples: int = 8,
             max_new_tokens: int = 256, endpoint: Endpoint | None = None) -> dict[str, Any]:
    """``endpoint``: evaluate through that server (the model it serves) instead of loading weights here."""
    from gptoss_cloud.contract.progress import read_summary

    from gptoss_cloud.trainer.evaluation.evaluate import LocalModel, eval_event, evaluate
    from gptoss_cloud.trainer.metrics import MetricsWriter

    def summary_step():
        step = (read_summary(home) or {}).get("steps")
        return step if isinstance(step, int) else None

    run = {"samples": samples, "max_new_tokens": max_new_tokens}
    if endpoint is not None:
        assert checkpoint is None, "a checkpoint is evaluated here, not through an endpoint"
        endpoint.model = endpoint.served_model(run_id)
        result = {"run_id": run_id, "model": f"{endpoint.url} (model {endpoint.model})", "step": summary_step(),
                  "endpoint": endpoint.url, **evaluate(endpoint, spec, data, **run)}
    else:
        with tempfile.TemporaryDirectory(prefix="gptoss-eval-") as tmp:
            if checkpoint is not None:
                model, source = _checkpoint_model(home, checkpoint, tmp)
                step = checkpoint
            else:
                from gptoss_cloud.trainer.chat import load_run_model

                model, source = load_run_model(home, spec)
                step = summary_step()
            result = {"run_id": run_id, "model": source, "step": step, "endpoint": None,
                      **evaluate(LocalModel(model), spec, data, **run)}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    key = f"evals/{stamp}-step-{result['step']}.json"
    open_store(home).write_bytes(key, json.dumps(result, indent=1).encode())
    result["saved"] = join(home, key)
    event = eval_event(result, result["step"])
    MetricsWriter(home).write(event)
    if spec.output.report_to:
        from gptoss_cloud.trainer.tracking import open_trackers

        trackers = open_trackers(spec, run_id, home)
        trackers.on_record(event)
        trackers.close(ok=True)
    return result
