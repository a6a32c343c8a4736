"""The image recipe agrees with the manifests, the project and hack/build-image.

hack/build-image builds and checks the image for real (hack/test runs it before pytest); the
e2e tests run the operator from it. These checks need no Docker.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

from .conftest import REPO, only

DOCKERFILE = (REPO / "Dockerfile").read_text()
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


def stage_lines(stage: int) -> list[tuple[str, str]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages[stage]


def test_install_stage_needs_no_index() -> None:
    install = " ".join(args for kind, args in stage_lines(0) if kind == "RUN")
    assert "/opt/npuswarm/bin/python -m pip install --no-index --find-links /wheels npuswarm" in install
    assert "python3 -m venv /opt/npuswarm" in install
    assert [args for kind, args in stage_lines(0) if kind == "COPY"] == ["wheels/ /wheels/"]


def test_final_stage_gets_only_the_venv() -> None:
    copies = [args for kind, args in stage_lines(1) if kind == "COPY"]
    assert copies == ["--from=install /opt/npuswarm /opt/npuswarm"]


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


def test_base_images_satisfy_requires_python() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    match = re.search(r"^ARG BASE_IMAGE=python:(\d+\.\d+)-slim-(\w+)$", DOCKERFILE, re.MULTILINE)
    assert match, "the default base image is a slim Python image"
    assert match.group(1) in SpecifierSet(project["requires-python"])
    import baseimage

    # The base CI builds: Debian's python3 of the same release, so the same Python.
    assert (match.group(1), match.group(2)) == ("3.11", baseimage.SUITE)
    assert {"python3", "python3-venv", "passwd"} <= set(baseimage.PACKAGES)


def test_image_tag_is_the_project_version(render: Any) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}\n" in DOCKERFILE
    for root in ("manifests", "manifests/overlays/production"):
        pod = only(render(root), "Deployment", "npuswarm")["spec"]["template"]["spec"]
        assert [c["image"] for c in pod["containers"]] == [f"npuswarm:{version}"]


@pytest.mark.parametrize("script", ["build-image", "build-base-image", "build-fakevllm-image"])
def test_hack_scripts_are_executable(script: str) -> None:
    assert os.access(REPO / "hack" / script, os.X_OK)


def test_cli_version_is_the_project_version() -> None:
    import subprocess

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    said = subprocess.run([sys.executable, "-m", "npuswarm.cli", "--version"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert said == f"npuswarm {version}"
