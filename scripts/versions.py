"""One line of the versions a GPU run depends on, for the logs kept beside its results.
   python3 scripts/versions.py [PACKAGE ...]     (default: transformers peft accelerate gptoss-cloud)"""
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import torch


def v(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "missing"


pkgs = sys.argv[1:] or ["transformers", "peft", "accelerate", "gptoss-cloud"]
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda, "|",
      " | ".join(f"{p} {v(p)}" for p in pkgs), "| GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
