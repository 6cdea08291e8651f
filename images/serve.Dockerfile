# syntax=docker/dockerfile:1.7
# gptoss-cloud serving image: the official vLLM OpenAI-compatible server with the harmony vocabulary
# baked in, so GPT-OSS serves offline, and the API key middleware that guards every route
# (--middleware gptoss_serve_auth.ApiKeyMiddleware). Build from the repository root for linux/amd64;
# see images/README.md.
FROM --platform=linux/amd64 vllm/vllm-openai:v0.33.0

ENV TIKTOKEN_ENCODINGS_BASE=/opt/gptoss/tiktoken \
    PYTHONPATH=/opt/gptoss/python

# The same file, pinned by the same checksum, as the trainer image: training and serving tokenize alike.
ADD --checksum=sha256:446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d \
    https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken \
    /opt/gptoss/tiktoken/o200k_base.tiktoken
RUN chmod 0644 /opt/gptoss/tiktoken/o200k_base.tiktoken

# Standard library only: importable by vLLM's python without this package installed.
COPY cli/assets/vllm/gptoss_serve_auth.py /opt/gptoss/python/gptoss_serve_auth.py
