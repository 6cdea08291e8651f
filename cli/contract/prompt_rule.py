"""The one rule for the harmony system message, as the serving side must reproduce it.

Training (``trainer/data/harmony.py``) and ``chat`` (``trainer/chat.py``) render the system message from
``spec.data``: ``knowledge_cutoff``, ``conversation_date`` only when set, ``model_identity`` only when set,
``reasoning_effort``. vLLM's harmony path (``get_system_message`` in
vllm/entrypoints/openai/parser/harmony_utils.py, vllm 0.32) renders harmony's defaults for all of them
except the date, which it takes from ``VLLM_SYSTEM_START_DATE`` and otherwise sets to *today*. So serve
passes the date, and says which trained fields a vLLM server cannot reproduce.
"""

from __future__ import annotations

from gptoss_cloud.contract.sections import DataSection

START_DATE_ENV = "VLLM_SYSTEM_START_DATE"
# What vLLM renders when a request names no effort, and harmony's own defaults (openai-harmony 0.0.8).
VLLM_DEFAULT_EFFORT = "medium"
HARMONY_DEFAULT_CUTOFF = "2024-06"


def vllm_env(data: DataSection) -> dict[str, str]:
    """Environment for the vLLM process so its system message carries the trained date."""
    return {START_DATE_ENV: data.conversation_date} if data.conversation_date else {}


def vllm_differences(data: DataSection) -> list[str]:
    """One line per system-message field where vLLM's prompt would differ from the trained one."""
    out = []
    if not data.conversation_date:
        out.append("data.conversation_date is not set: training rendered no date, but vLLM always writes one "
                   "(today's); set data.conversation_date when training a model you will serve")
    if data.model_identity:
        out.append(f"data.model_identity ({data.model_identity!r}) is not passed by vLLM, which renders harmony's "
                   "default identity")
    if data.knowledge_cutoff != HARMONY_DEFAULT_CUTOFF:
        out.append(f"data.knowledge_cutoff is {data.knowledge_cutoff!r}, vLLM renders {HARMONY_DEFAULT_CUTOFF!r}")
    if data.reasoning_effort != VLLM_DEFAULT_EFFORT:
        out.append(f"data.reasoning_effort is {data.reasoning_effort!r}, vLLM's default is {VLLM_DEFAULT_EFFORT!r}: "
                   f"send \"reasoning_effort\": \"{data.reasoning_effort}\" in each request")
    return out
