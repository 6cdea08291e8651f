"""The one rule for what looks like a credential, and which setting must carry it instead.

Plain environment in a spec (``cluster.env``) is written in clear text into every artifact made from
it: the JobSet, the spec ConfigMap, GitOps files meant for Git, the serve Deployment, the pushed Truss
project and the run home's spec.yaml. So a credential there is refused when the spec is validated,
whatever the backend, and the message names the setting that passes it by reference instead.

Credential-looking means either
  * the name has a word (split at ``_``) such as TOKEN, SECRET, PASSWORD, KEY, CREDENTIALS, APIKEY
    (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, MY_PASSWORD), unless the value is a plain
    switch (0/1/true/false/...), which no credential is (HF_HUB_DISABLE_IMPLICIT_TOKEN=1); or
  * the value has the shape of a known token, whatever the name: Hugging Face (hf_...), OpenAI and
    Anthropic style (sk-...), AWS access key ids (AKIA/ASIA...), GitHub (ghp_, github_pat_...),
    GitLab (glpat-), Slack (xox?-), a PEM private key, a JWT.
Values are never quoted back: the message names the key only.
"""

from __future__ import annotations

import re
from typing import Mapping

CREDENTIAL_WORDS = frozenset({
    "TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASSPHRASE",
    "KEY", "KEYS", "APIKEY", "CREDENTIAL", "CREDENTIALS", "CREDS", "AUTH",
})
SWITCH_VALUES = frozenset({"", "0", "1", "true", "false", "yes", "no", "on", "off", "none"})

TOKEN_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a Hugging Face token (hf_...)", re.compile(r"\bhf_[A-Za-z0-9]{20,}")),
    ("an API secret key (sk-...)", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")),
    ("an AWS access key id (AKIA.../ASIA...)", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
    ("a GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})")),
    ("a GitLab token (glpat-...)", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("a Slack token (xox?-...)", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("a JSON web token", re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.")),
)

STORE_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})


def name_looks_secret(name: str) -> bool:
    return any(word in CREDENTIAL_WORDS for word in name.upper().split("_"))


def token_shape(value: str) -> str | None:
    """What kind of token ``value`` looks like, or None."""
    for what, pattern in TOKEN_SHAPES:
        if pattern.search(value):
            return what
    return None


def carrier(name: str, backend: str) -> str:
    """The spec setting (or place) that passes ``name`` to the pods by reference, for this backend."""
    if backend == "local":
        return f"export {name} in the shell that runs gptoss-cloud (local runs inherit its environment)"
    if name in STORE_VARS:
        return ("cluster.store_secret: {name: <Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY>}"
                if backend == "k8s" else f"cluster.truss.secrets: {{{name}: <Baseten secret name>}} (default {name.lower()})")
    if name == "HF_TOKEN":
        return "cluster.hf_token_secret: {name: <Secret>, key: token}"
    if name == "GPTOSS_CHECKPOINT_KEY":
        return "cluster.checkpoint_key_secret: {name: <Secret>, key: key}"
    if backend == "truss":
        return f"cluster.truss.secrets: {{{name}: <Baseten secret name>}}"
    return f"cluster.secret_env: {{{name}: {{name: <Secret>, key: <key in it>}}}}"


def credential_problem(name: str, value: object) -> str | None:
    """Why ``name=value`` may not be plain environment, or None when it may."""
    text = "" if value is None else str(value)
    shape = token_shape(text)
    if shape:
        return f"holds a value shaped like {shape}"
    if name_looks_secret(name) and text.strip().lower() not in SWITCH_VALUES:
        return "looks like a credential"
    return None


def check_plain_env(env: Mapping[str, object], where: str, backend: str) -> None:
    """Raise ValueError naming the first credential in ``env`` (never its value) and where it belongs."""
    for name, value in env.items():
        problem = credential_problem(str(name), value)
        if problem:
            raise ValueError(
                f"{where}.{name} {problem}, and {where} is written in plain text into the run's spec and every "
                f"rendered artifact; pass it by reference instead: {carrier(str(name), backend)}"
            )


def check_reference_names(refs: Mapping[str, object], where: str) -> None:
    """Secret *names* are written in clear text too: refuse a token pasted where a name belongs."""
    for name, ref in refs.items():
        text = ref if isinstance(ref, str) else getattr(ref, "name", None)
        shape = token_shape(text) if isinstance(text, str) else None
        if shape:
            raise ValueError(f"{where}.{name} holds a value shaped like {shape}; it takes the name of a secret, not its value")


def require_plain_env(cluster, backend: str | None = None) -> None:
    """The renderers' own check, for a spec that reached them without validation (model_copy,
    a future code path): the same rule, raised as the CLI's one-line error."""
    from gptoss_cloud.contract.errors import SpecError

    try:
        check_plain_env(cluster.env, "cluster.env", backend or cluster.backend)
    except ValueError as e:
        raise SpecError(str(e)) from None
