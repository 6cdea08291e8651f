"""RunSpec: the one description of a run.

Loaded from YAML and validated by pydantic; unknown keys are errors. On this machine one precedence
order everywhere (``load_spec``):

    CLI flag  >  environment (GPTOSS_*)  >  spec file  >  user config (~/.config/gptoss-cloud/config.yaml)  >  default

``submit`` resolves the spec that way once and stores it as ``<home>/spec.yaml``; the pods train that
resolved spec as written (``read_resolved_spec``: no environment, no user config), and refuse an
environment variable that names a setting (``gptoss_cloud.contract.envnames``). The sections, each owned
by the component that reads it, are in ``gptoss_cloud.contract.sections``. ``version`` is the schema
version: a newer CLI reads older specs, and a pod refuses a spec newer than it understands.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gptoss_cloud.contract import safe_yaml
from gptoss_cloud.contract.envnames import ENV_ALIASES, PREFIX, override_path, setting_named_by, settings_in, without_settings
from gptoss_cloud.contract.deploy_sections import ClusterSection, ServeSection
from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.contract.promoted import PromoteSection
from gptoss_cloud.contract.sections import (
    CheckpointSection,
    DataSection,
    KernelsSection,
    MethodSection,
    ModelSection,
    OptimSection,
    OutputSection,
    ParallelismSection,
    Section,
)

SPEC_VERSION = 1
USER_CONFIG_PATH = Path("~/.config/gptoss-cloud/config.yaml")


# ---------------------------------------------------------------------------------------------- spec
class RunSpec(Section):
    version: int = SPEC_VERSION
    name: str = Field("gptoss", description="run name (prefix of the run id)")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    method: MethodSection = Field(default_factory=MethodSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    parallelism: ParallelismSection = Field(default_factory=ParallelismSection)
    kernels: KernelsSection = Field(default_factory=KernelsSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    output: OutputSection = Field(default_factory=OutputSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    promote: PromoteSection | None = Field(None, description="gated promotion after each run; off when unset")

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SPEC_VERSION:
            raise ValueError(
                f"spec version {v} is newer than this gptoss-cloud understands ({SPEC_VERSION}); upgrade gptoss-cloud"
            )
        if v < 1:
            raise ValueError("spec version must be >= 1")
        return v

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,28}[a-z0-9])?", v):
            raise ValueError(
                "name must be 1-30 lowercase letters, digits or '-', starting and ending with a letter or digit "
                "(it prefixes Kubernetes names)"
            )
        return v

    # -------------------------------------------------------------------------------- YAML in/out
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def world_size(self) -> int:
        return self.parallelism.nodes * self.parallelism.gpus_per_node

    @model_validator(mode="after")
    def _expert_units_on_dense_experts(self) -> "RunSpec":
        units = self.parallelism.expert_units
        if units == 1:
            return self
        clash = [what for what, on in (
            ("model.base_format: mxfp4 (packed experts are buffers, not FSDP2 parameters)", self.model.base_format == "mxfp4"),
            ("method.lora.experts: true (peft adapts the experts module itself)", self.method.kind == "lora" and self.method.lora.experts),
            (f"method.qat: {self.method.qat}", self.method.qat != "none"),
            ("kernels.moe_tile_tokens", self.kernels.moe_tile_tokens is not None),
            (f"kernels.experts: {self.kernels.experts} (split experts run the fused path)", self.kernels.experts in ("eager", "grouped_mm")),
        ) if on]
        if clash:
            raise ValueError(f"parallelism.expert_units: {units} splits dense bf16 experts into FSDP2 units; it does not "
                             f"combine with {'; '.join(clash)}. Set expert_units: 1 or drop those settings")
        return self

    @model_validator(mode="after")
    def _pod_env_names_no_setting(self) -> "RunSpec":
        # The pods train this spec as written: a variable there that reads like a setting would either
        # be refused by the trainer after scheduling, or (worse) be believed to have changed something.
        for where, names in (("cluster.env", self.cluster.env), ("cluster.secret_env", self.cluster.secret_env)):
            for var in names:
                setting = setting_named_by(var, type(self))
                if setting is not None:
                    raise ValueError(f"{where}.{var}: names the spec setting {setting}; the pods train the resolved "
                                     f"spec as written, so set {setting.split(' ')[0]} in the spec instead")
        return self


# ----------------------------------------------------------------------------------------- loading
def set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def env_overrides(environ: Mapping[str, str]) -> dict:
    tree: dict = {}
    for var, dotted in ENV_ALIASES.items():
        if environ.get(var):
            set_path(tree, dotted, environ[var])
    for var, value in environ.items():
        if var.startswith(PREFIX) and "__" in var:
            set_path(tree, override_path(var), safe_yaml.load(value, f"environment variable {var}") if value else value)
    return tree


def read_yaml_mapping(path: Path, what: str) -> dict:
    try:
        with path.open("rb") as f:
            raw = f.read(safe_yaml.MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise SpecError(f"{what} {path} is a folder, not a YAML file") from None
    except OSError as e:
        raise SpecError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    data = safe_yaml.load(raw, f"{what} {path}") or {}
    if not isinstance(data, dict):
        raise SpecError(f"{what} {path} must be a YAML mapping, not {type(data).__name__}")
    return data


MAX_REPORTED_ERRORS = 20  # a hostile spec can hold thousands of bad keys; the first ones say enough


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid run spec ({source}):"]
    errors = err.errors()
    for e in errors[:MAX_REPORTED_ERRORS]:
        loc = safe_yaml.quote(".".join(str(p) for p in e["loc"]) or "<root>").strip("'\"")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `gptoss-cloud init` writes every key with comments)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {safe_yaml.quote(e.get('input'))}"
        # A whole-spec check names its own keys (cluster.env.X: ...), so its message stands alone.
        lines.append(f"  {msg}" if msg.startswith(f"{loc}.") or not e["loc"] else f"  {loc}: {msg}")
    if len(errors) > MAX_REPORTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_REPORTED_ERRORS} more")
    return "\n".join(lines)


def load_spec(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    user_config: str | Path | None = None,
) -> RunSpec:
    """Resolve a RunSpec: flags (``overrides``, dotted keys) > env > spec file > user config > defaults."""
    environ = os.environ if environ is None else environ
    tree: dict = {}
    sources = []
    ucfg = Path(user_config) if user_config else Path(environ.get("GPTOSS_CONFIG", str(USER_CONFIG_PATH))).expanduser()
    if ucfg.is_file():
        tree = deep_merge(tree, read_yaml_mapping(ucfg, "user config"))
        sources.append(str(ucfg))
    if path is not None:
        tree = deep_merge(tree, read_yaml_mapping(Path(path), "spec file"))
        sources.append(str(path))
    env_tree = env_overrides(environ)
    if env_tree:
        tree = deep_merge(tree, env_tree)
        sources.append("environment")
    flag_tree: dict = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_path(flag_tree, dotted, value)
    if flag_tree:
        tree = deep_merge(tree, flag_tree)
        sources.append("flags")
    # A section whose keys are all commented out parses as null: it means "all defaults".
    for key, field in RunSpec.model_fields.items():
        if key in tree and tree[key] is None and isinstance(field.default_factory, type):
            tree[key] = {}
    try:
        return RunSpec.model_validate(tree)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, " + ".join(sources) or "defaults")) from None


def spec_from_yaml_text(text: str | bytes, source: str = "<spec>") -> RunSpec:
    """Parse a resolved spec (as stored in a run home or a ConfigMap); no env or user config applied."""
    data = safe_yaml.load(text, source) or {}
    if not isinstance(data, dict):
        raise SpecError(f"{source} must be a YAML mapping, not {type(data).__name__}")
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source)) from None


def read_resolved_spec(path: str | Path) -> RunSpec:
    """The resolved spec a run trains (``<home>/spec.yaml`` as ``submit`` wrote it), read as it is.

    No environment variable and no user config is applied: what the pod trains is exactly what was
    submitted, planned and stored. Bounded and strictly decoded like any other spec file."""
    path = Path(path)
    try:
        return RunSpec.model_validate(read_yaml_mapping(path, "resolved spec"))
    except ValidationError as e:
        raise SpecError(format_validation_error(e, str(path))) from None


def check_pod_environ(environ: Mapping[str, str]) -> None:
    """Refuse an environment that names a spec setting (``gptoss_cloud.contract.envnames``): a pod trains
    its resolved spec as written, so such a variable would be believed to change a run it cannot change."""
    named = settings_in(environ, RunSpec)
    if named:
        listed = "; ".join(f"{var} names {setting}" for var, setting in named.items())
        raise SpecError(f"the trainer's environment sets spec settings ({listed}): the trainer trains the resolved "
                        "spec as written, and its environment carries only topology, rendezvous, node layout and credentials",
                        hint="put the setting in the spec (submit applies GPTOSS_* variables on this machine before it "
                             "writes the run's spec.yaml) and remove the variable from cluster.env or the pod")


def pod_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less the variables that name a spec setting: what a trainer launched from this machine
    starts with (their values are already in the resolved spec it trains)."""
    return without_settings(environ, RunSpec)
