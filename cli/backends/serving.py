"""`serve`: decide what to serve from the run store; each backend's ``serve`` renders (pure) and applies (thin) it.

The run's own spec (``<home>/spec.yaml``) is the baseline; serve/cluster flags and GPTOSS_* variables
override it. The store is read to learn which merged folder is published (``merged-mxfp4/`` or ``merged/``,
contract/merged.py; else a merge Job is rendered), whether the adapter exists, and a custom model's shape.
TP is sized for the format served (contract/plan/serving.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from gptoss_cloud.contract import prompt_rule
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.render.k8s import serve as rs
from gptoss_cloud.contract.runs import merged_key, resolve_run
from gptoss_cloud.contract.merged import SERVE_PREFERENCE, base_is_mxfp4, merge_format_for, published_format
from gptoss_cloud.contract.plan.serving import per_gpu, size_tp, sizing_args, valid_tp
from gptoss_cloud.contract.shapes import ModelShape, shape_for, shape_from_config
from gptoss_cloud.contract.spec import RunSpec, deep_merge, env_overrides, format_validation_error, set_path
from gptoss_cloud.contract.store.objects import open_store


def run_spec_with_overrides(home: str, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RunSpec:
    """The run's spec with serve/cluster settings from the environment and flags (dotted keys) applied."""
    from pydantic import ValidationError

    from gptoss_cloud.contract.runs import read_run_spec

    base = read_run_spec(home)
    tree = base.model_dump(mode="json")
    env = env_overrides(os.environ if environ is None else environ)
    # Only where and how to serve may change; what was trained (model, method, data) may not.
    tree = deep_merge(tree, {k: v for k, v in env.items() if k in ("cluster", "serve")})
    flags: dict = {}
    for dotted, value in overrides.items():
        if value is not None:
            set_path(flags, dotted, value)
    tree = deep_merge(tree, flags)
    try:
        return RunSpec.model_validate(tree)
    except ValidationError as e:
        raise GptossError(format_validation_error(e, f"{home}/spec.yaml + flags")) from None


def model_shape(spec: RunSpec, home: str) -> ModelShape:
    try:
        return shape_for(spec.model.name, spec.model.layers)
    except ValueError:
        store = open_store(home)
        for key in [f"{merged_key(f)}/config.json" for f in SERVE_PREFERENCE] + ["adapter/config.json"]:
            if store.exists(key):
                return shape_from_config(json.loads(store.read_bytes(key)), name=spec.model.name)
        raise GptossError(f"cannot tell the shape of model {spec.model.name!r}: no merged/config.json in {home}")


def pick_tp(spec: RunSpec, shape: ModelShape, notes: list[str], fmt: str = "bf16") -> int:
    s = spec.serve
    args = sizing_args(spec, shape) | {"fmt": fmt}
    if s.tp is None:
        sized = size_tp(shape, **args)
        notes.append(f"note: {sized.describe()}")
        return sized.tp
    if not valid_tp(shape, s.tp):
        raise GptossError(f"--tp {s.tp} does not divide {shape.name}'s {shape.num_attention_heads} attention / "
                          f"{shape.num_key_value_heads} KV heads and intermediate size {shape.intermediate_size}",
                          hint="use 1, 2, 4 or 8")
    sized = per_gpu(shape, s.tp, **args)
    if not sized.fits:
        notes.append(f"warning: {sized.describe()}; vLLM may run out of memory")
    return s.tp


def _base_json(store, key: str) -> dict | None:
    """A small JSON file of the run's own base/ (random-init runs keep their base there), bounded like every store read."""
    if not store.exists(key):
        return None
    try:
        doc = json.loads(store.read_range(key, 0, 16 << 20))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _base_description(store) -> tuple[dict | None, tuple[str, ...]]:
    """The run's base/ config.json and the tensor names of its index, for ``merged.base_is_mxfp4``."""
    index = _base_json(store, "base/model.safetensors.index.json") or {}
    weight_map = index.get("weight_map")
    return _base_json(store, "base/config.json"), tuple(weight_map) if isinstance(weight_map, dict) else ()


def serve_format(spec: RunSpec, store, step: int | None) -> tuple[str, bool]:
    """(format, published): the published merged folder ``serve.format`` accepts, else the format to merge into."""
    found = published_format(store, step, spec.serve.format)
    if found is not None:
        return found, True
    return merge_format_for(spec, *_base_description(store)), False


def resolve_target(run_ref: str, store_uri: str, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> tuple[rs.ServeTarget, list[str]]:
    run_id, home = resolve_run(run_ref, store_uri)
    spec = run_spec_with_overrides(home, overrides, environ)
    store = open_store(home)
    notes: list[str] = []
    step = None if spec.serve.checkpoint == "latest" else int(spec.serve.checkpoint)
    if spec.serve.adapter:
        if spec.method.kind != "lora":
            raise GptossError(f"run {run_id} is a full fine-tune: it has no adapter to serve", hint="drop --adapter")
        if step is not None:
            raise GptossError("--adapter serves the run's final adapter", hint="use --checkpoint latest, or drop --adapter to merge that step")
        if not store.exists(f"adapter/{rs.ADAPTER_MARKER}"):
            raise GptossError(f"no adapter in {home}/adapter/ (training not finished?)", hint=f"gptoss-cloud status {run_id}")
    elif step is not None and not store.exists(f"checkpoints/step-{step}/manifest.json"):
        steps = sorted({k.split("/")[1] for k in store.list("checkpoints") if k.endswith("/manifest.json")})
        raise GptossError(f"no published checkpoint step-{step} in {home}/checkpoints/",
                          hint=f"published: {', '.join(steps) or 'none'}")
    shape = model_shape(spec, home)
    if spec.serve.max_model_len > shape.max_position_embeddings:
        notes.append(f"note: serving with --max-model-len {shape.max_position_embeddings}, {shape.name}'s "
                     f"max_position_embeddings (serve.max_model_len is {spec.serve.max_model_len})")
    notes += [f"note: {d}" for d in prompt_rule.vllm_differences(spec.data)]
    # --adapter serves the published base (MXFP4 for the GPT-OSS releases) plus the adapter: sized as MXFP4.
    fmt, published = ("mxfp4" if base_is_mxfp4(spec) else "bf16", True) if spec.serve.adapter else serve_format(spec, store, step)
    tp = pick_tp(spec, shape, notes, fmt)
    return rs.ServeTarget(run_id=run_id, home=home, spec=spec, shape=shape, tp=tp, needs_merge=not published,
                          step=step, fmt=fmt), notes


def resolve_promoted(name: str, store_uri: str, overrides: Mapping[str, Any],
                     environ: Mapping[str, str] | None = None) -> tuple[rs.ServeTarget, list[str]]:
    """``serve --promoted NAME``: the run promoted as NAME sizes the Deployment (its spec, its shape);
    the Deployment itself names only NAME, so a later promotion needs a restart, never a new render."""
    from dataclasses import replace

    from gptoss_cloud.contract.promoted import read_record

    rec = read_record(store_uri, name)
    if rec is None:
        raise GptossError(f"nothing promoted as {name!r} in {store_uri} (no promoted/{name}.json)",
                          hint="gptoss-cloud promote RUN, or a tick of a spec with promote.name set")
    t, notes = resolve_target(rec.run_id, store_uri, overrides, environ)
    if t.adapter or t.step is not None:
        raise GptossError("--promoted serves the promoted run's final merge", hint="drop --adapter and --checkpoint")
    if t.needs_merge:
        raise GptossError(f"promoted run {rec.run_id} has no published merged folder ({t.merged_key}/)", hint=f"gptoss-cloud merge {rec.run_id}")
    if t.spec.cluster.backend == "truss":
        raise GptossError("a Truss deployment serves one fixed run and cannot follow a promotion",
                          hint=f"serve {rec.run_id} --backend truss, or --promoted on --backend k8s")
    notes.append(f"note: {name} is run {rec.run_id} now; the server reads promoted/{name}.json each time its pod starts "
                 f"and serves that run's {t.fmt} folder (TP {t.tp} is sized for it)")
    return replace(t, run_id=name, promoted_store=t.home.rstrip("/").rsplit("/", 1)[0]), notes
