"""gptoss-cloud: fine-tune GPT-OSS on cloud GPUs from one command (control plane)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("gptoss-cloud")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
