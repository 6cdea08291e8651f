"""Offline lint of images/*.Dockerfile: Docker cannot build here, so check what can be checked without it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from support import REPO, shared_path

IMAGES = REPO / "images"
DOCKERFILES = {name: IMAGES / f"{name}.Dockerfile" for name in ("trainer", "serve")}
VOCAB = "o200k_base.tiktoken"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s\"']*)$")


def parse(name: str) -> list[dict]:
    return DockerfileParser(path=str(DOCKERFILES[name])).structure


def instructions(name: str, kind: str) -> list[str]:
    return [i["value"] for i in parse(name) if i["instruction"] == kind]


def env(name: str) -> dict[str, str]:
    return DockerfileParser(path=str(DOCKERFILES[name])).envs


def pip_pins(name: str) -> dict[str, str]:
    """Every `pkg==version` of the image's `pip install` lines; unpinned packages are an error."""
    pins: dict[str, str] = {}
    for run in instructions(name, "RUN"):
        for cmd in run.split("&&"):
            words = cmd.split()
            if words[:2] != ["pip", "install"]:
                continue
            for word in words[2:]:
                word = word.strip("\"'")
                if word.startswith("-") or word.startswith("/src"):  # flags; this package from the build context
                    continue
                m = PIN.match(word)
                assert m, f"{name}.Dockerfile: `pip install {word}` is not pinned (write {word}==<version>)"
                pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def from_image(name: str) -> tuple[str, str, str]:
    (value,) = instructions(name, "FROM")
    words = value.split()
    platform = next((w.split("=", 1)[1] for w in words if w.startswith("--platform=")), "")
    image = next(w for w in words if not w.startswith("--"))
    repo, _, tag = image.rpartition(":")
    return platform, repo, tag


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["train"]]
    return {canonicalize_name(r.name): r for r in reqs}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_is_pinned_for_linux_amd64(name):
    platform, repo, tag = from_image(name)
    assert platform == "linux/amd64"
    assert repo and tag and tag != "latest", f"{name}.Dockerfile: pin the base image by tag"
    assert re.search(r"\d+\.\d+", tag), f"{name}.Dockerfile: base tag {tag!r} is not a version"


def test_trainer_pins_cover_the_train_extra_within_pyproject_ranges():
    pins = pip_pins("trainer")
    reqs = pyproject_requirements()
    train = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    for r in map(Requirement, train):
        assert canonicalize_name(r.name) in pins, f"trainer.Dockerfile does not pin {r.name} (train extra)"
    for pkg, version in pins.items():
        if pkg in reqs:
            assert reqs[pkg].specifier.contains(version, prereleases=True), (
                f"trainer.Dockerfile pins {pkg}=={version}, outside pyproject's {reqs[pkg]}"
            )
    assert 'pip install "/src[train]"' in " ".join(instructions("trainer", "RUN"))


def test_pins_exist_in_the_package_registry():
    """Every pinned wheel (and the vLLM release the serve image is tagged with) is a real release,
    asked of the package index the way pip sees it (CI reaches the registries)."""
    wanted = dict(pip_pins("trainer"))
    _, _, vllm_tag = from_image("serve")
    wanted["vllm"] = vllm_tag.lstrip("v")
    for pkg, version in wanted.items():
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", pkg],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"pip could not list {pkg}: {out.stderr.strip()[-300:]}"
        line = next((x for x in out.stdout.splitlines() if x.startswith("Available versions:")), "")
        released = {Version(v.strip()).public for v in line.split(":", 1)[-1].split(",") if v.strip()}
        assert Version(version).public in released, f"{pkg}=={version} is not a release on the package index"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_vocabulary_is_baked_where_tiktoken_encodings_base_points(name):
    base = env(name).get("TIKTOKEN_ENCODINGS_BASE")
    assert base, f"{name}.Dockerfile does not set TIKTOKEN_ENCODINGS_BASE"
    adds = [a.split() for a in instructions(name, "ADD") if VOCAB in a]
    assert len(adds) == 1, f"{name}.Dockerfile must ADD {VOCAB} once"
    words = adds[0]
    dest = words[-1]
    assert Path(dest) == Path(base) / VOCAB
    checksum = next(w.split("=", 1)[1] for w in words if w.startswith("--checksum="))
    digest = hashlib.sha256(shared_path("tokenizers", VOCAB).read_bytes()).hexdigest()
    assert checksum == f"sha256:{digest}", "the pinned checksum is not the vocabulary openai-harmony verifies"
    assert words[-2].endswith(f"/{VOCAB}")


def test_trainer_runs_as_a_numeric_non_root_user():
    users = instructions("trainer", "USER")
    assert users, "trainer.Dockerfile sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and uid != "0", "use a numeric non-root USER (Kubernetes runAsNonRoot checks it)"


def test_trainer_build_context_sends_what_it_copies():
    ignore = (IMAGES / "trainer.Dockerfile.dockerignore").read_text().split()
    allowed = {p.lstrip("!").rstrip("/") for p in ignore if p.startswith("!")}
    for copy in instructions("trainer", "COPY"):
        for src in copy.split()[:-1]:
            if not src.startswith("--"):
                assert src in allowed, f"COPY {src} is excluded by trainer.Dockerfile.dockerignore"
                assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"


def _train_command_exists() -> bool:
    import typer.main

    from gptoss_cloud.main import app

    return "train" in typer.main.get_command(app).commands


def test_entrypoint_is_a_command_of_this_package():
    (value,) = instructions("trainer", "ENTRYPOINT")
    argv = json.loads(value)  # exec form: no shell between the pod and the trainer
    script, command = argv[0], argv[1]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert script in scripts
    assert _train_command_exists() and command == "train"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_vocabulary_dir_is_the_one_constant_the_renderers_use(name):
    from gptoss_cloud.contract.images import VOCAB_DIR

    assert env(name)["TIKTOKEN_ENCODINGS_BASE"] == VOCAB_DIR, f"{name}.Dockerfile bakes the vocabulary elsewhere"


def test_trainer_user_creation_works_on_ubuntu_24_04_bases():
    """Ubuntu 24.04 images ship user `ubuntu` at UID 1000: `useradd --uid 1000` fails unless it goes first."""
    _, repo, tag = from_image("trainer")
    run = next(r for r in instructions("trainer", "RUN") if "useradd" in r)
    if "ubuntu24" in tag or "24.04" in tag:
        steps = [s.strip() for s in run.split("&&")]
        drop = next(i for i, s in enumerate(steps) if "userdel" in s and "ubuntu" in s)
        add = next(i for i, s in enumerate(steps) if s.startswith("useradd"))
        assert drop < add, "remove user ubuntu (UID 1000) before useradd --uid 1000"
    assert "--uid 1000" in run and users_uid() == "1000"


def users_uid() -> str:
    return instructions("trainer", "USER")[-1].split(":")[0]


def test_serve_image_ships_the_auth_middleware_where_the_renderers_point():
    from gptoss_cloud.contract.images import MIDDLEWARE_DIR
    from gptoss_cloud.render.vllm import AUTH_MIDDLEWARE

    module = AUTH_MIDDLEWARE.rsplit(".", 1)[0]
    assert env("serve")["PYTHONPATH"] == MIDDLEWARE_DIR
    (copy,) = [c.split() for c in instructions("serve", "COPY") if module in c]
    src, dest = copy
    assert (REPO / src).is_file() and Path(dest) == Path(MIDDLEWARE_DIR) / f"{module}.py"
    ignore = (IMAGES / "serve.Dockerfile.dockerignore").read_text().split()
    assert f"!{src}" in ignore, "the build context would not send the middleware"
