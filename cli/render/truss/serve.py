"""Pure builder of a Truss ``config.yaml`` that serves a run with vLLM on Baseten.

A docker_server Truss on the serve image: Baseten mounts the weights (``weights:`` sources, s3:// for
the run's merged folder or adapter, hf:// for a published base) and runs vLLM's OpenAI server on them
(the command render/vllm.py builds for every backend). Baseten guards the endpoint with its own API keys, so no vLLM key is set. Credentials are Baseten
secret *names*, never values.
"""

from __future__ import annotations

import shlex

from gptoss_cloud.contract import prompt_rule
from gptoss_cloud.contract.images import VOCAB_DIR
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import join
from gptoss_cloud.render import vllm as vv
from gptoss_cloud.render.k8s.serve import MODELS_DIR, ServeTarget, base_model_ref, serve_image, vllm_args

STORE_SECRET = "gptoss_store_aws"      # Baseten secret with the store's AWS credentials
HF_SECRET = "hf_access_token"          # Baseten's conventional name for a Hugging Face token
MOUNT = MODELS_DIR   # the same paths the Deployment mounts, so vllm_args serves both


def _source(uri: str, mount: str) -> dict:
    out = {"source": uri, "mount_location": mount}
    if uri.startswith("s3://"):
        out["auth_secret_name"] = STORE_SECRET
    elif uri.startswith("hf://"):
        out["auth_secret_name"] = HF_SECRET
    return out


def start_command(t: ServeTarget) -> str:
    # Baseten's gateway requires its API key on every route, so vLLM's own key check stays off here.
    return shlex.join(vv.server_command("python3", vllm_args(t, api_key=False)))


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
        "environment_variables": {"TIKTOKEN_ENCODINGS_BASE": VOCAB_DIR, "HF_HUB_OFFLINE": "0" if t.adapter else "1",
                                  **prompt_rule.vllm_env(spec.data)},
        "resources": {"accelerator": f"{spec.cluster.gpu_type}:{t.tp}", "use_gpu": True, "cpu": str(4 * t.tp),
                      "memory": f"{16 + 16 * t.tp}Gi"},
        "runtime": {"predict_concurrency": 256},
        "secrets": secrets,
        "weights": weights,
    }
