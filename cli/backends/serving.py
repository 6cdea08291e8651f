"""`serve`: decide what to serve from the run store, then render (pure) and apply (thin) per backend.

The run's own spec (``<home>/spec.yaml``) is the baseline; serve/cluster flags and GPTOSS_* variables
override it. The store is read to learn whether ``merged/`` is published (else a merge Job is
rendered), whether the adapter exists, and a custom model's shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from gptoss_cloud.contract import prompt_rule
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.render.k8s import serve as rs
from gptoss_cloud.contract.runs import resolve_run
from gptoss_cloud.contract.plan.serving import per_gpu, size_tp, valid_tp
from gptoss_cloud.contract.shapes import ModelShape, shape_for, shape_from_config
from gptoss_cloud.contract.spec import RunSpec, deep_merge, env_overrides, format_validation_error, set_path, spec_from_yaml_text
from gptoss_cloud.contract.store.objects import is_remote, join, open_store


def run_spec_with_overrides(home: str, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RunSpec:
    """The run's spec with serve/cluster settings from the environment and flags (dotted keys) applied."""
    from pydantic import ValidationError

    base = spec_from_yaml_text(open_store(home).read_bytes("spec.yaml").decode(), f"{home}/spec.yaml")
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
        for key in ("merged/config.json", "adapter/config.json"):
            if store.exists(key):
                return shape_from_config(json.loads(store.read_bytes(key)), name=spec.model.name)
        raise GptossError(f"cannot tell the shape of model {spec.model.name!r}: no merged/config.json in {home}")


def pick_tp(spec: RunSpec, shape: ModelShape, notes: list[str]) -> int:
    s, c = spec.serve, spec.cluster
    if s.tp is None:
        return size_tp(shape, gpu_memory_gib=c.gpu_memory_gib, utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len).tp
    if not valid_tp(shape, s.tp):
        raise GptossError(f"--tp {s.tp} does not divide {shape.name}'s {shape.num_attention_heads} attention / "
                          f"{shape.num_key_value_heads} KV heads", hint="use 1, 2, 4 or 8")
    sized = per_gpu(shape, s.tp, gpu_memory_gib=c.gpu_memory_gib, utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len)
    if not sized.fits:
        notes.append(f"warning: {sized.describe()}; vLLM may run out of memory")
    return s.tp


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
    tp = pick_tp(spec, shape, notes)
    key = "merged" if step is None else f"merged-step-{step}"
    needs_merge = not spec.serve.adapter and not store.exists(f"{key}/{rs.MERGED_MARKER}")
    return rs.ServeTarget(run_id=run_id, home=home, spec=spec, shape=shape, tp=tp, needs_merge=needs_merge, step=step), notes


# ---------------------------------------------------------------------------------------- render
def render_k8s(t: rs.ServeTarget) -> list[dict]:
    return rs.serve_objects(t)


def render_truss(t: rs.ServeTarget) -> dict:
    from gptoss_cloud.render.truss.serve import truss_config

    if not is_remote(t.home):
        raise GptossError(f"Baseten cannot read the local store {t.home}", hint="train with output.store: s3://bucket/prefix")
    if t.needs_merge:
        raise GptossError(f"{t.home}/{t.merged_key}/ is not published yet; Truss serves published weights only",
                          hint=f"gptoss-cloud merge {t.run_id}   (or serve with --adapter, or on --backend k8s which merges in the cluster)")
    return truss_config(t)


def dump(objects: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(objects if len(objects) != 1 else objects[0], indent=2, sort_keys=True) + "\n"
    return yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False)


def write_objects(objects: list[dict], out: Path, fmt: str = "yaml") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, o in enumerate(objects):
        p = out / f"{i:02d}-{o['kind'].lower()}-{o['metadata']['name']}.{'json' if fmt == 'json' else 'yaml'}"
        p.write_text(dump([o], fmt))
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------- apply
def apply_k8s(t: rs.ServeTarget, objects: list[dict]) -> list[str]:
    from gptoss_cloud.kube.apply import Kube

    if not is_remote(t.home):
        raise GptossError(f"the cluster cannot read the local store {t.home}",
                          hint="train with output.store: s3://bucket/prefix, or serve with --backend local")
    kube = Kube(namespace=t.namespace, context=t.spec.cluster.context)
    lines = []
    if t.spec.serve.api_key and t.spec.serve.api_key_secret is None:
        name, key = rs.api_key_ref(t.spec, t.run_id)
        if kube.ensure_api_key_secret(name, key, rs.labels(t.run_id, "serve")):
            lines.append(f"created Secret {name} with a random API key (key {key!r})")
    for obj in objects:
        lines.append(f"{obj['kind']} {obj['metadata']['name']}: {kube.apply(obj)}")
    return lines


def usage_lines(t: rs.ServeTarget, base_url: str) -> list[str]:
    out = [f"endpoint: {base_url}"]
    if t.spec.serve.api_key and t.spec.cluster.backend == "k8s":
        name, key = rs.api_key_ref(t.spec, t.run_id)
        out.append(f"API key:  export VLLM_API_KEY=$(kubectl -n {t.namespace} get secret {name} -o jsonpath='{{.data.{key}}}' | base64 -d)")
        out.append(f"from your machine: kubectl -n {t.namespace} port-forward svc/{rs.deployment_name(t.run_id)} {t.port}:{t.port}")
    out.append(rs.curl_example(base_url, t.run_id, api_key=t.spec.serve.api_key and t.spec.cluster.backend == "k8s"))
    return out
