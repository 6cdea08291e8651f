"""``gptoss-cloud eval``: a trained run on a held-out set — loss with its breakdowns, then generation checks.

The held-out rows go through the training pipeline itself (``parse_row`` -> harmony items ->
``render_with_kinds``), so the loss is over exactly the tokens training would have trained, and each
trained token knows its span kind (final, analysis, call, commentary) and its row's reasoning effort.
The generation sample answers each row's last trained prompt (the same tokens the mask starts after)
and checks the reply with ``eval_checks``.

What scores the tokens and writes the replies is a ``Scorer``: ``LocalModel`` (the model loaded here)
or ``endpoint.Endpoint`` (a vLLM server). Both give the same per-token losses and reply tokens, so the
breakdowns and the checks are computed once, here, for either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.sections import DatasetSource

from gptoss_cloud.trainer.data.harmony import IGNORE, plan_sequences, render_with_kinds, to_items
from gptoss_cloud.trainer.data.rows import RowError, parse_row
from gptoss_cloud.trainer.data.sources import load_source
from gptoss_cloud.trainer.evaluation.checks import Checked, check_completion, rates


@dataclass
class EvalSequence:
    row: int
    effort: str
    input_ids: list[int]
    labels: list[int]
    kinds: list[str | None]
    tools: dict[str, dict | None] = field(default_factory=dict)

    @property
    def prompt(self) -> list[int]:
        """What the model sees before the last trained assistant run (where its labels begin)."""
        last = max(i for i, x in enumerate(self.labels) if x != IGNORE)
        start = last
        while start > 0 and self.labels[start - 1] != IGNORE:
            start -= 1
        return self.input_ids[:start]


def held_out(path: str, spec: RunSpec) -> list[EvalSequence]:
    """The held-out file's rows as evaluation sequences, rendered as the run's training rendered them.
    A malformed row is an error naming the file and row: an evaluation must not silently shrink."""
    from gptoss_cloud.contract.errors import DataError

    data = spec.data
    src = DatasetSource(path=path)
    rows = load_source(src)
    out = []
    for i, raw in enumerate(rows.rows):
        if isinstance(raw, RowError):
            raise raw
        row = parse_row(raw, source=rows.name, row=i)
        effort = row.reasoning_effort or data.reasoning_effort
        tools = {t.name: t.parameters for t in row.tools}
        for items, trained in plan_sequences(to_items(row, data, source=rows.name, index=i), data.train_on, data.thinking_turns):
            ids, labels, kinds = render_with_kinds(items, trained)
            if len(ids) > data.max_seq_len and data.overlong == "drop":
                continue
            out.append(EvalSequence(i, effort, ids[: data.max_seq_len], labels[: data.max_seq_len], kinds[: data.max_seq_len], tools))
    if not out:
        raise DataError(f"{rows.name}: no row left to evaluate (every sequence is longer than data.max_seq_len {data.max_seq_len})")
    return out


# ------------------------------------------------------------------------------------------ scorers
class Scorer(Protocol):
    def token_losses(self, seq: EvalSequence) -> list[float]:
        """Cross-entropy of each token at positions 1.. of ``seq.input_ids``, NaN where not trained."""

    def generate(self, prompt: list[int], stop: list[int], max_new_tokens: int) -> list[int]:
        """Greedy reply tokens after ``prompt``, ending with the stop token that ended it (if any)."""


@dataclass
class LocalModel:
    model: Any

    def token_losses(self, seq: EvalSequence) -> list[float]:
        """From one forward pass."""
        import torch

        dev = next(self.model.parameters()).device
        ids = torch.tensor([seq.input_ids], device=dev)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        target = torch.tensor(seq.labels[1:], device=dev)
        ce = torch.nn.functional.cross_entropy(logits, target.clamp(min=0), reduction="none")
        return ce.masked_fill(target == IGNORE, float("nan")).tolist()

    def generate(self, prompt: list[int], stop: list[int], max_new_tokens: int) -> list[int]:
        from gptoss_cloud.trainer.chat import greedy

        return greedy(self.model, prompt, stop, max_new_tokens)


def each(scorer: Scorer, fn: Callable[[Any], Any], items: list) -> list:
    """``[fn(x) for x in items]``, with up to ``scorer.concurrency`` calls in flight (a server batches them; the
    local model has none and runs them in turn). Results come back in ``items``' order, so every sum over them
    is the same whatever the concurrency; the first failure is raised once the calls in flight have ended."""
    workers = min(int(getattr(scorer, "concurrency", 1) or 1), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval") as pool:
        return list(pool.map(fn, items))


# -------------------------------------------------------------------------------------------- loss
def _mean(pairs: list[float]) -> dict[str, Any]:
    return {"loss": sum(pairs) / len(pairs), "tokens": len(pairs)}


def loss_breakdown(scorer: Scorer, seqs: list[EvalSequence]) -> dict[str, Any]:
    everything: list[float] = []
    by_effort: dict[str, list[float]] = {}
    by_kind: dict[str, list[float]] = {}
    for seq, losses in zip(seqs, each(scorer, scorer.token_losses, seqs)):
        for pos, ce in enumerate(losses, start=1):
            if math.isnan(ce):
                continue
            everything.append(ce)
            by_effort.setdefault(seq.effort, []).append(ce)
            by_kind.setdefault(seq.kinds[pos] or "other", []).append(ce)
    return {**_mean(everything), "by_effort": {k: _mean(v) for k, v in sorted(by_effort.items())},
            "by_kind": {k: _mean(v) for k, v in sorted(by_kind.items())}}


# -------------------------------------------------------------------------------------- generation
def generation_checks(scorer: Scorer, seqs: list[EvalSequence], *, samples: int, max_new_tokens: int) -> dict[str, Any]:
    """Answer the last sequence of each of the first ``samples`` rows and check each reply."""
    from gptoss_cloud.trainer.chat import encoding

    enc = encoding()
    last_of_row: dict[int, EvalSequence] = {}
    for s in seqs:
        last_of_row[s.row] = s
    picked = list(last_of_row.values())[:samples]
    checked: list[Checked] = []
    details = []
    stop = enc.stop_tokens_for_assistant_actions()
    replies = each(scorer, lambda s: scorer.generate(s.prompt, stop, max_new_tokens), picked)
    for s, reply in zip(picked, replies):
        c = check_completion(enc, reply, s.tools, s.effort)
        checked.append(c)
        details.append({"row": s.row, "effort": s.effort, "reply": enc.decode(reply)[:2000], **c.to_json()})
    return {"samples": len(picked), **rates(checked), "replies": details}


def evaluate(scorer: Scorer, spec: RunSpec, data_path: str, *, samples: int = 8, max_new_tokens: int = 256) -> dict[str, Any]:
    seqs = held_out(data_path, spec)
    return {"data": data_path, "rows": len({s.row for s in seqs}), "sequences": len(seqs),
            **loss_breakdown(scorer, seqs),
            "generation": generation_checks(scorer, seqs, samples=samples, max_new_tokens=max_new_tokens)}


def eval_event(result: dict[str, Any], step: int | None) -> dict[str, Any]:
    """The ``{"event": "eval"}`` record metrics.jsonl, the report and the trackers get: numbers only."""
    gen = result["generation"]
    ev: dict[str, Any] = {"event": "eval", "step": step, "loss": result["loss"], "tokens": result["tokens"]}
    ev.update({f"loss_{k}": v["loss"] for k, v in result["by_kind"].items()})
    ev.update({f"loss_effort_{k}": v["loss"] for k, v in result["by_effort"].items()})
    ev.update({k: v for k, v in gen.items() if k.endswith("_rate") and v is not None})
    return ev
