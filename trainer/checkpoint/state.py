"""The small, non-tensor part of a checkpoint: scheduler, data position, RNG states.

These are saved per rank as tagged JSON (``extra/rank-R.json``), never pickled, so reading them
cannot run code. The codec knows tensors, bytes, tuples and numpy arrays besides JSON's own types.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import torch


def encode(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()
        return {"__tensor__": base64.b64encode(raw).decode(), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(x) for x in obj]}
    if isinstance(obj, list):
        return [encode(x) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: encode(v) for k, v in obj.items()}}
        return {"__items__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": base64.b64encode(obj.tobytes()).decode(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} in a state_dict (use tensors, numbers, strings, lists, dicts)")


def decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [decode(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        raw = bytearray(base64.b64decode(obj["__tensor__"]))
        dtype = getattr(torch, obj["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"bad dtype {obj['dtype']!r}")
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__tuple__" in obj:
        return tuple(decode(x) for x in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: decode(v) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {decode(k) if not isinstance(k, list) else tuple(decode(k)): decode(v) for k, v in obj["__items__"]}
    if "__ndarray__" in obj:
        import numpy as np

        return np.frombuffer(base64.b64decode(obj["__ndarray__"]), dtype=obj["dtype"]).reshape(obj["shape"]).copy()
    raise ValueError(f"unknown tagged value with keys {sorted(obj)}")


def dumps(state: dict) -> bytes:
    return json.dumps(encode(state)).encode()


def loads(data: bytes) -> dict:
    return decode(json.loads(data))


class RNGState:
    """All random generators a training step draws from, as one Stateful.

    Restored last on resume: anything restored earlier (a data loader rebuilding its shuffle order,
    say) could otherwise draw from the generators after they were set.
    """

    restore_last = True

    def state_dict(self) -> dict:
        st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        try:
            import numpy as np

            st["numpy"] = np.random.get_state()
        except ImportError:
            pass
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda"] = torch.cuda.get_rng_state()
        return st

    def load_state_dict(self, st: dict) -> None:
        random.setstate(st["python"])
        torch.set_rng_state(st["torch"])
        if "numpy" in st:
            import numpy as np

            np.random.set_state(st["numpy"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state(st["cuda"])
