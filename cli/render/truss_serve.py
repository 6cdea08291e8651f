"""Pure builder of a Truss ``config.yaml`` that serves a run with vLLM on Baseten.

A docker_server Truss on the serve image: Baseten mounts the weights (``weights:`` sources, s3:// for
the run's merged folder or adapter, hf:// for a published base) and runs ``vllm serve`` on them.
Baseten guards the endpoint with its own API keys, so no vLLM key is set. Credentials are Baseten
secret *names*, never values.
"""

from __future__ import annotations

from ..spec import RunSpec
from ..store import join
from .serve import ServeTarget, base_model_ref, lora_rank, serve_image

STORE_SECRET = "gptoss_store_aws"      # Baseten secret with the store's AWS credentials
HF_SECRET = "hf_access_token"          # Baseten's conventional name for a Hugging Face token
SERVE_VOCAB_DIR = "/opt/gptoss/tokenizers"  # where images/serve.Dockerfile bakes the harmony vocabulary
MOUNT = "/models"


def _source(uri: str, mount: str) -> dict:
    out = {"source": uri, "mount_location": mount}
    if uri.startswith("s3://"):
        out["auth_secret_name"] = STORE_SECRET
    elif uri.startswith("hf://"):
        out["auth_secret_name"] = HF_SECRET
    return out


def start_command(t: ServeTarget) -> str:
    s = t.spec.serve
    if t.adapter:
        model, served = f"{MOUNT}/base", f"{t.run_id}-base"
    else:
        model, served = f"{MOUNT}/merged", t.run_id
    parts = [
        "vllm", "serve", model, "--served-model-name", served, "--host", "0.0.0.0", "--port", str(s.port),
        "--tensor-parallel-size", str(t.tp), "--max-model-len", str(s.max_model_len),
        "--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}",
    ]
    if t.adapter:
        parts += ["--enable-lora", "--lora-modules", f"{t.run_id}={MOUNT}/adapter", "--max-lora-rank", str(lora_rank(t.spec.method.lora.r))]
    return " ".join(parts)


def truss_config(t: ServeTarget, spec: RunSpec | None = None) -> dict:
    spec = spec or t.spec
    if t.adapter:
        base = base_model_ref(spec)
        base_uri = base if base.startswith("s3://") else f"hf://{base}" + (f"@{spec.model.revision}" if spec.model.revision else "")
        weights = [_source(base_uri, f"{MOUNT}/base"), _source(join(t.home, "adapter"), f"{MOUNT}/adapter")]
    else:
        weights = [_source(join(t.home, t.merged_key), f"{MOUNT}/merged")]
    secrets = {STORE_SECRET: None}
    if any(w["source"].startswith("hf://") for w in weights):
        secrets[HF_SECRET] = None
    return {
        "model_name": t.run_id,
        "description": f"gptoss-cloud run {t.run_id} served with vLLM",
        "base_image": {"image": serve_image(spec)},
        "docker_server": {
            "start_command": start_command(t),
            "server_port": spec.serve.port,
            "predict_endpoint": "/v1/chat/completions",
            "readiness_endpoint": "/health",
            "liveness_endpoint": "/health",
        },
        "environment_variables": {"TIKTOKEN_ENCODINGS_BASE": SERVE_VOCAB_DIR, "HF_HUB_OFFLINE": "0" if t.adapter else "1"},
        "resources": {"accelerator": f"{spec.cluster.gpu_type}:{t.tp}", "use_gpu": True, "cpu": str(4 * t.tp),
                      "memory": f"{16 + 16 * t.tp}Gi"},
        "runtime": {"predict_concurrency": 256},
        "secrets": secrets,
        "weights": weights,
    }
