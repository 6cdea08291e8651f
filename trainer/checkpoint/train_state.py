"""What a checkpoint holds of the training state, and the state dicts DCP saves and loads.

The loop's ``TrainState`` is seen as named Statefuls (``as_state``): the model and the optimizer go
through DCP as sharded tensors (``model_state`` / ``set_model_state``), everything else as per-rank
tagged JSON (``gptoss_cloud.trainer.checkpoint.state``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from gptoss_cloud.trainer.checkpoint.state import RNGState

MODEL_KEYS = ("model", "optimizer")


def _unwrap_optimizer(opt):
    # accelerate wraps the optimizer; DCP's state_dict helpers want the torch one.
    return getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt


class _Progress:
    """Step, token count and extras of the loop's TrainState, as one Stateful."""

    def __init__(self, ts):
        self.ts = ts

    def state_dict(self) -> dict:
        return {"step": self.ts.step, "tokens": self.ts.tokens, "extra": dict(self.ts.extra)}

    def load_state_dict(self, st: dict) -> None:
        self.ts.step, self.ts.tokens = int(st["step"]), int(st["tokens"])
        self.ts.extra.clear()
        self.ts.extra.update(st.get("extra") or {})


def as_state(state) -> Mapping[str, Any]:
    """Accept either a mapping of Stateful objects or the loop's TrainState (module, optimizer, scheduler, data, …)."""
    if isinstance(state, Mapping):
        return state
    return {"model": state.module, "optimizer": state.optimizer, "scheduler": state.scheduler, "data": state.data,
            "progress": _Progress(state), "rng": RNGState()}


def language_model(model):
    """The (possibly peft-wrapped) GptOssForCausalLM inside the trained module (the loop's wrapper holds it as ``lm``)."""
    return getattr(model, "lm", model) if model is not None else None


def model_config(model):
    """The transformers config of the (possibly peft-wrapped) model, saved with each checkpoint for merging."""
    inner = language_model(model)
    if inner is None:
        return None
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return getattr(inner, "config", None)


def _has_frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def state_dict_options(model) -> StateDictOptions:
    # LoRA: only the adapter (trainable) weights; the frozen base comes from the base model.
    return StateDictOptions(ignore_frozen_params=_has_frozen(model), strict=not _has_frozen(model))


def model_state(state: Mapping[str, Any]) -> dict:
    """``{"model": ..., "optimizer": ...}`` state dicts of ``state`` as DCP saves them (sharded, not gathered)."""
    model = state.get("model")
    if model is None:
        return {}
    opt = state.get("optimizer")
    if opt is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model, options=state_dict_options(model))}
    msd, osd = get_state_dict(model, _unwrap_optimizer(opt), options=state_dict_options(model))
    return {"model": msd, "optimizer": osd}


def set_model_state(state: Mapping[str, Any], sd: dict) -> None:
    """Load what DCP read into ``sd`` (``model_state``'s layout) back into the model and optimizer of ``state``."""
    model, opt = state["model"], state.get("optimizer")
    if opt is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, sd["model"], options=state_dict_options(model))
    else:
        set_state_dict(model, _unwrap_optimizer(opt), model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                       options=state_dict_options(model))
