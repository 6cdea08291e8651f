"""RunSpec -> Baseten Truss training project (pure: returns file contents, touches nothing).

A project folder holds three files:

    config.py   truss_train definitions (TrainingProject, TrainingJob, Image, Compute, Runtime),
                built here from data: values are written with repr(), so no template language and
                no string-built shell logic
    spec.yaml   the resolved RunSpec the trainer reads on every node
    run.sh      the start script, copied verbatim from the template folder truss/ (a real shell
                script with its own tests); it maps Baseten's BT_* variables onto torchrun

Credentials appear only as SecretReference names (Baseten secrets), never as values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gptoss_cloud import __version__
from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.contract.credentials import carrier, credential_problem, require_plain_env
from gptoss_cloud.contract.images import trainer_image
from gptoss_cloud.contract.spec import RunSpec

CONFIG_FILE = "config.py"
SPEC_FILE = "spec.yaml"
START_SCRIPT = "run.sh"
TEMPLATE_FILES = (START_SCRIPT,)

# Baseten secret names used when the spec names no other (`cluster.truss.secrets` overrides each).
STORE_SECRETS = {"AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key"}
HF_TOKEN_ENV = "HF_TOKEN"
CHECKPOINT_KEY_ENV = "GPTOSS_CHECKPOINT_KEY"

# Set by the renderer (run.sh and the trainer read them); cluster.env may not redefine them.
RESERVED_ENV = ("GPTOSS_RUN_ID", "GPTOSS_NODES", "GPTOSS_GPUS_PER_NODE", "GPTOSS_SPEC_FILE")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ACCELERATOR = re.compile(r"^[A-Z0-9_]+$")


@dataclass(frozen=True)
class TrussProject:
    """A rendered project: relative file name -> text, plus which files are executable."""

    run_id: str
    files: dict[str, str]
    executable: frozenset[str] = frozenset({START_SCRIPT})
    data: dict[str, Any] = field(default_factory=dict)  # what config.py was built from


# ------------------------------------------------------------------------------------ the data
def default_image(spec: RunSpec) -> str:
    return spec.cluster.truss.base_image or trainer_image(spec)


def project_name(spec: RunSpec) -> str:
    return spec.cluster.truss.project or spec.name


def secret_refs(spec: RunSpec) -> dict[str, str]:
    """Environment variable -> Baseten secret name, for every credential the pods need."""
    c = spec.cluster
    refs: dict[str, str] = {}
    if spec.output.store.startswith("s3://") or c.store_secret is not None:
        refs.update(STORE_SECRETS)
    if c.hf_token_secret is not None:
        refs[HF_TOKEN_ENV] = c.hf_token_secret.name
    if c.checkpoint_key_secret is not None:
        refs[CHECKPOINT_KEY_ENV] = c.checkpoint_key_secret.name
    for env, ref in c.secret_env.items():
        refs[env] = ref.name
    for env, name in c.truss.secrets.items():
        where = f"cluster.truss.secrets.{env}"
        if not _ENV_NAME.match(env):
            raise SpecError(f"{where}: {env!r} is not a valid environment variable name")
        if name is None:
            refs.pop(env, None)
        elif not name.strip():
            raise SpecError(f"{where}: the Baseten secret name is empty (use null to drop the default)")
        else:
            refs[env] = name
    return refs


def plain_env(spec: RunSpec, run_id: str, secret_names: set[str]) -> dict[str, str]:
    env = {
        "GPTOSS_RUN_ID": run_id,
        "GPTOSS_NODES": str(spec.parallelism.nodes),
        "GPTOSS_GPUS_PER_NODE": str(spec.parallelism.gpus_per_node),
        "GPTOSS_RDZV_PORT": str(spec.cluster.rendezvous_port),
    }
    for k, v in spec.cluster.env.items():
        where = f"cluster.env.{k}"
        if not _ENV_NAME.match(k):
            raise SpecError(f"{where}: {k!r} is not a valid environment variable name")
        if k in RESERVED_ENV:
            raise SpecError(f"{where}: {k} is set by gptoss-cloud itself; remove it from cluster.env")
        if k in secret_names:
            raise SpecError(f"{where}: {k} is already a secret reference (cluster.truss.secrets); remove it from cluster.env")
        problem = credential_problem(k, v)
        if problem:  # the spec refuses it already; this guards a spec that skipped validation
            raise SpecError(f"{where} {problem}, and cluster.env is written into the pushed project",
                            hint=f"reference a Baseten secret instead: {carrier(k, 'truss')}")
        env[k] = str(v)
    return env


def truss_job_data(spec: RunSpec, run_id: str) -> dict[str, Any]:
    """Everything config.py says, as plain data (tests and `--dry-run -o json` read this)."""
    t = spec.cluster.truss
    accelerator = (t.accelerator or spec.cluster.gpu_type).upper()
    if not _ACCELERATOR.match(accelerator):
        raise SpecError(f"cluster.truss.accelerator: {accelerator!r} is not a Baseten accelerator name (e.g. H100, H200)")
    secrets = secret_refs(spec)
    checkpointing: dict[str, Any] = {"enabled": t.checkpointing}
    if t.checkpointing and t.checkpoint_volume_gib:
        checkpointing["volume_size_gib"] = t.checkpoint_volume_gib
    return {
        "project": project_name(spec),
        "job_name": run_id,
        "base_image": default_image(spec),
        "node_count": spec.parallelism.nodes,
        "accelerator": accelerator,
        "accelerator_count": spec.parallelism.gpus_per_node,
        "start_commands": [f"bash ./{START_SCRIPT}"],
        "environment": plain_env(spec, run_id, set(secrets)),
        "secrets": secrets,
        "checkpointing": checkpointing,
        "cache": {"enabled": t.cache},
    }


# ------------------------------------------------------------------------------- Python source
@dataclass(frozen=True)
class _Call:
    """A constructor call in the generated source: ``func(key=value, ...)``."""

    func: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class _Code:
    """Source text placed as is (a name defined earlier in the generated file)."""

    text: str


_SCALARS = (type(None), bool, int, float, str)
_INLINE_WIDTH = 88


def _flat(value: Any) -> bool:
    """A call or list of plain values only: written on one line when it fits."""
    if isinstance(value, _Call):
        return all(isinstance(v, _SCALARS) for v in value.kwargs.values())
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _SCALARS) for v in value)
    return False


def _py(value: Any, indent: int = 0) -> str:
    pad, inner = "    " * indent, "    " * (indent + 1)
    if _flat(value):
        if isinstance(value, _Call):
            one = f"{value.func}({', '.join(f'{k}={v!r}' for k, v in value.kwargs.items())})"
        else:
            one = f"[{', '.join(repr(v) for v in value)}]"
        if len(pad) + len(one) <= _INLINE_WIDTH:
            return one
    if isinstance(value, _Code):
        return value.text
    if isinstance(value, _Call):
        if not value.kwargs:
            return f"{value.func}()"
        args = "".join(f"{inner}{k}={_py(v, indent + 1)},\n" for k, v in value.kwargs.items())
        return f"{value.func}(\n{args}{pad})"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = "".join(f"{inner}{_py(k)}: {_py(v, indent + 1)},\n" for k, v in value.items())
        return f"{{\n{items}{pad}}}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        items = "".join(f"{inner}{_py(v, indent + 1)},\n" for v in value)
        return f"[\n{items}{pad}]"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise TypeError(f"cannot write {type(value).__name__} into config.py")


def render_config_py(data: dict[str, Any]) -> str:
    job = _Call(
        "definitions.TrainingJob",
        {
            "name": data["job_name"],
            "image": _Call("definitions.Image", {"base_image": data["base_image"]}),
            "compute": _Call(
                "definitions.Compute",
                {
                    "node_count": data["node_count"],
                    "accelerator": _Call(
                        "truss_config.AcceleratorSpec",
                        {"accelerator": data["accelerator"], "count": data["accelerator_count"]},
                    ),
                },
            ),
            "runtime": _Call(
                "definitions.Runtime",
                {
                    "start_commands": data["start_commands"],
                    "environment_variables": _Code("{**ENVIRONMENT, **SECRET_REFERENCES}"),
                    "checkpointing_config": _Call("definitions.CheckpointingConfig", data["checkpointing"]),
                    "cache_config": _Call("definitions.CacheConfig", data["cache"]),
                },
            ),
        },
    )
    secret_refs_src = {k: _Call("definitions.SecretReference", {"name": v}) for k, v in data["secrets"].items()}
    header = (
        f"# Baseten training project for gptoss-cloud run {data['job_name']} (rendered by gptoss-cloud {__version__}).\n"
        "# Re-render rather than edit: `gptoss-cloud submit --backend truss --dry-run --out DIR`.\n"
        "# Push with `gptoss-cloud submit --backend truss` (or `truss train push config.py`).\n"
        "# Credentials are Baseten secrets, referenced by name only.\n"
    )
    return (
        header
        + "from truss.base import truss_config\n"
        + "from truss_train import definitions\n\n"
        + f"ENVIRONMENT = {_py(data['environment'])}\n\n"
        + f"SECRET_REFERENCES = {_py(secret_refs_src)}\n\n"
        + f"training_job = {_py(job)}\n\n"
        + f"training_project = {_py(_Call('definitions.TrainingProject', {'name': data['project'], 'job': _Code('training_job')}))}\n"
    )


# -------------------------------------------------------------------------------- the project
def template_dir() -> Path:
    """The truss/ template folder: packaged under gptoss_cloud/assets/truss, or the source tree's."""
    packaged = Path(str(resources.files("gptoss_cloud"))) / "assets" / "truss"
    if (packaged / START_SCRIPT).is_file():
        return packaged
    source = Path(__file__).resolve().parents[3] / "truss"  # cli/render/truss/train.py -> the repository root
    if (source / START_SCRIPT).is_file():
        return source
    raise FileNotFoundError(f"Truss template not found in {packaged} or {source}; reinstall gptoss-cloud")


def render_truss_project(spec: RunSpec, run_id: str) -> TrussProject:
    """The project folder for one run, as file contents. Reads only the packaged template."""
    require_plain_env(spec.cluster, "truss")  # before the copy below re-validates it into a raw pydantic error
    spec = spec.model_copy(deep=True)
    spec.cluster.backend = "truss"
    data = truss_job_data(spec, run_id)
    tdir = template_dir()
    files = {name: (tdir / name).read_text() for name in TEMPLATE_FILES}
    files[CONFIG_FILE] = render_config_py(data)
    files[SPEC_FILE] = spec.to_yaml()
    return TrussProject(run_id=run_id, files=files, data=data)
