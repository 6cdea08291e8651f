"""Container image references. The tag follows the package version, so the pod reads the spec
version that the CLI wrote; every backend takes its default from here."""

from __future__ import annotations

from gptoss_cloud import __version__

TRAINER_REPO = "ghcr.io/gptoss-cloud/trainer"
SERVE_REPO = "ghcr.io/gptoss-cloud/serve"
# Where both images bake the harmony vocabulary (their TIKTOKEN_ENCODINGS_BASE); every renderer that
# points a container at it uses this, and tests/unit/test_images.py reads it back from the Dockerfiles.
VOCAB_DIR = "/opt/gptoss/tiktoken"
# Where the serve image puts gptoss_serve_auth (the API key middleware) on PYTHONPATH.
MIDDLEWARE_DIR = "/opt/gptoss/python"


def image_tag(version: str = __version__) -> str:
    # A source-tree version ("0.0.0+src") is not a valid tag: '+' is not allowed there.
    return version.replace("+", "-")


def trainer_image(spec) -> str:
    return spec.cluster.image or f"{TRAINER_REPO}:{image_tag()}"


def serve_image(spec) -> str:
    return spec.serve.image or f"{SERVE_REPO}:{image_tag()}"
