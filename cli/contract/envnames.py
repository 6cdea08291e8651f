"""Which environment variables name a spec setting.

On this machine ``load_spec`` applies them (CLI flag > GPTOSS_* > spec file > user config > default).
In a pod nothing may: the trainer trains the resolved spec it was given, and a pod's environment
carries only topology and rendezvous (torchrun's RANK, WORLD_SIZE, MASTER_ADDR, ..., GPTOSS_RUN_ID,
GPTOSS_NODES), node layout (cache folders) and credentials. One rule says both what ``load_spec``
sets from a variable and what the trainer and ``cluster.env`` refuse, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Mapping

from pydantic import BaseModel

PREFIX = "GPTOSS_"

# Short names for the settings people set per shell. Any field is also reachable as
# GPTOSS_<SECTION>__<FIELD> (double underscore between levels), e.g. GPTOSS_OPTIM__LR=1e-4.
ENV_ALIASES: dict[str, str] = {
    "GPTOSS_BACKEND": "cluster.backend",
    "GPTOSS_NAMESPACE": "cluster.namespace",
    "GPTOSS_CONTEXT": "cluster.context",
    "GPTOSS_IMAGE": "cluster.image",
    "GPTOSS_STORE": "output.store",
    "GPTOSS_MODEL": "model.name",
}

# Variables the trainer once read behind the spec's back, and the spec field that replaced each: a
# pod still setting one is told where the setting went instead of having it silently ignored.
RETIRED: dict[str, str] = {
    "GPTOSS_MXFP4_DEQUANT": "kernels.mxfp4_dequant",
    "GPTOSS_MXFP4_GEMM": "kernels.mxfp4_dequant (gemm)",
    "GPTOSS_EXPERTS_COMPILE": "kernels.experts_compile",
    "GPTOSS_STEP_SPLIT": "optim.step_split",
    "GPTOSS_CPU_THREADS": "parallelism.cpu_threads",
    "GPTOSS_PUBLISH_TIMEOUT_S": "checkpoint.peer_timeout_s",
}


def override_path(var: str) -> str | None:
    """The dotted spec path ``load_spec`` sets from ``var`` (an alias or GPTOSS_<SECTION>__<FIELD>), else None."""
    if var in ENV_ALIASES:
        return ENV_ALIASES[var]
    if var.startswith(PREFIX) and "__" in var:
        return var[len(PREFIX):].lower().replace("__", ".")
    return None


def _section(field) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _field_path(model: type[BaseModel], rest: str) -> str | None:
    # Longest names first: "max_seq_len" must win over a shorter field that prefixes it.
    for name in sorted(model.model_fields, key=len, reverse=True):
        sub = _section(model.model_fields[name])
        if rest == name and sub is None:
            return name
        if sub is not None and rest.startswith(name + "_"):
            inner = _field_path(sub, rest[len(name) + 1:].lstrip("_"))
            if inner is not None:
                return f"{name}.{inner}"
    return None


def setting_named_by(var: str, root: type[BaseModel]) -> str | None:
    """The spec setting ``var`` names, or None (GPTOSS_RUN_ID, GPTOSS_CHECKPOINT_KEY, NCCL_DEBUG, ...).

    A variable names a setting when ``load_spec`` would apply it, when it is a retired knob, or when it
    spells a field of a section of ``root`` with single underscores (GPTOSS_OPTIM_LR, GPTOSS_KERNELS_COMPILE).
    """
    if not var.startswith(PREFIX):
        return None
    if var in RETIRED:
        return RETIRED[var]
    path = override_path(var)
    if path is not None:
        return path
    rest = var[len(PREFIX):].lower()
    for name in sorted(root.model_fields, key=len, reverse=True):
        sub = _section(root.model_fields[name])
        if sub is not None and rest.startswith(name + "_"):
            inner = _field_path(sub, rest[len(name) + 1:].lstrip("_"))
            if inner is not None:
                return f"{name}.{inner}"
    return None


def settings_in(environ: Mapping[str, str], root: type[BaseModel]) -> dict[str, str]:
    """{variable: the setting it names} for every variable of ``environ`` that names one."""
    return {var: s for var in sorted(environ) if (s := setting_named_by(var, root)) is not None}


def without_settings(environ: Mapping[str, str], root: type[BaseModel]) -> dict[str, str]:
    """``environ`` less the variables that name a spec setting: what a process that trains an already
    resolved spec is started with (the settings they carried are in that spec already)."""
    named = settings_in(environ, root)
    return {k: v for k, v in environ.items() if k not in named}
