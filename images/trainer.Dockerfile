# syntax=docker/dockerfile:1.7
# gptoss-cloud trainer: what every training pod runs (Kubernetes JobSet and Baseten Truss alike).
# Build from the repository root for linux/amd64; see images/README.md. Not built in CI: the pins
# below are linted offline by tests/unit/test_images.py.
#
# The CUDA runtime comes with torch's own wheels; the base image gives the user-space driver hooks,
# a CUDA-compatible glibc and nothing else we would have to keep in step.
FROM --platform=linux/amd64 nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TIKTOKEN_ENCODINGS_BASE=/opt/gptoss/tiktoken

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv

# The harmony vocabulary, pinned by content: openai-harmony would otherwise download it at first use
# (pods often have no internet, and a changed file would change every token).
ADD --checksum=sha256:446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d \
    https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken \
    /opt/gptoss/tiktoken/o200k_base.tiktoken
RUN chmod 0644 /opt/gptoss/tiktoken/o200k_base.tiktoken

# The heavy, slow-moving layer first: the data plane's pinned dependencies (inside pyproject's ranges).
RUN pip install \
      torch==2.13.0 \
      transformers==5.23.0 \
      peft==0.21.2 \
      accelerate==1.15.0 \
      safetensors==0.8.0 \
      pyarrow==26.0.1 \
      jsonschema==4.26.0 \
      torchao==0.18.0 \
      openai-harmony==0.0.8

# Then this package with the train extra; the pins above already satisfy it, so pip keeps them.
COPY pyproject.toml README.md /src/
COPY cli /src/cli
COPY trainer /src/trainer
COPY truss /src/truss
RUN pip install "/src[train]" && rm -rf /src

# Non-root by default (Kubernetes "restricted" profile). Ubuntu 24.04 bases already have user and group
# `ubuntu` at UID/GID 1000, so `useradd --uid 1000` fails there: remove it first (and only it).
# Baseten mounts its caches under /root/.cache: let the trainer user traverse /root to reach them.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --uid 1000 --user-group gptoss && chmod 0755 /root
USER 1000:1000
WORKDIR /home/gptoss

ENTRYPOINT ["gptoss-cloud", "train"]
