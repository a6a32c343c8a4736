"""The image recipe agrees with the manifests and with the CI check that stands in for it.

No image is built here (no base image can be pulled); hack/check-image-install runs the
Dockerfile's wheel build and install in CI, and these tests keep the two from drifting.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

from .conftest import REPO, only

DOCKERFILE = (REPO / "Dockerfile").read_text()
CHECK_SCRIPT = REPO / "hack" / "check-image-install"
UID = 10001


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def pip_command(text: str, subcommand: str) -> list[str]:
    """The arguments after `-m pip <subcommand>`, with the paths that differ between the
    image (/dist, /opt/npuswarm) and the script ("$dist", "$venv") made comparable."""
    match = re.search(rf"-m pip {subcommand}\b([^&|;)>\n]*)", text)
    assert match, f"no `pip {subcommand}` found"
    return [re.sub(r"^(/dist|\$dist)", "DIST", token) for token in shlex.split(match.group(1))]


def stage_lines(stage: int) -> list[tuple[str, str]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages[stage]


def test_wheel_build_is_the_same_in_the_image_and_in_ci() -> None:
    builder = " ".join(args for kind, args in stage_lines(0) if kind == "RUN")
    script = CHECK_SCRIPT.read_text()
    assert pip_command(builder, "wheel") == pip_command(script, "wheel")
    assert pip_command(builder, "wheel") == ["--no-deps", "--wheel-dir", "DIST", "."]


def test_install_is_the_same_in_the_image_and_in_ci() -> None:
    final = " ".join(args for kind, args in stage_lines(1) if kind == "RUN")
    script = CHECK_SCRIPT.read_text()
    assert pip_command(final, "install") == pip_command(script, "install")
    assert pip_command(final, "install") == ["DIST/*.whl"]
    # Both install into a venv made by the same interpreter that then runs the operator.
    assert "-m venv /opt/npuswarm" in final
    assert '-m venv "$venv"' in script
    assert "/opt/npuswarm/bin/python -m pip install" in final


def test_final_stage_gets_only_the_wheel() -> None:
    copies = [args for kind, args in stage_lines(1) if kind == "COPY"]
    assert copies == ["--from=builder /dist/ /dist/"]


def test_image_user_is_the_deployments_user(render: Any) -> None:
    instructions = dockerfile_instructions()
    users = [args for kind, args in instructions if kind == "USER"]
    assert users == [f"{UID}:{UID}"], "numeric, so the kubelet can enforce runAsNonRoot"
    run = " ".join(args for kind, args in instructions if kind == "RUN")
    assert f"--uid {UID}" in run and f"--gid {UID}" in run
    for root in ("manifests", "manifests/overlays/production"):
        pod = only(render(root), "Deployment", "npuswarm")["spec"]["template"]["spec"]
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (UID,) * 3


def test_entrypoint_is_npuswarm() -> None:
    entrypoints = [args for kind, args in dockerfile_instructions() if kind == "ENTRYPOINT"]
    assert entrypoints == ['["npuswarm"]']


def test_base_image_satisfies_requires_python() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    match = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-slim", DOCKERFILE, re.MULTILINE)
    assert match, "the base image is a slim Python image"
    assert match.group(1) in SpecifierSet(project["requires-python"])
    assert match.group(1) == "3.11"


def test_build_context_holds_what_the_builder_copies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allowlist: nothing enters the context unless named"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for kind, args in stage_lines(0):
        if kind == "COPY":
            copied.update(s.rstrip("/") for s in args.split()[:-1])
    assert copied == allowed
    # setuptools needs the readme that pyproject names to build the wheel.
    assert project["readme"] in copied
    assert "pyproject.toml" in copied and "operator" in copied


@pytest.mark.parametrize("script", ["build-image", "check-image-install"])
def test_hack_scripts_are_executable(script: str) -> None:
    assert os.access(REPO / "hack" / script, os.X_OK)
