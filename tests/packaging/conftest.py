"""Packaging checks that need no cluster: kustomize renders, RBAC, security context, the image
recipe and Argo CD's health check. The checks against a real API server are in tests/e2e."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"


def require(what: str, why: str) -> None:
    """A missing tool is a failure, never a skip: hack/setup installs every one of them."""
    pytest.fail(f"{what} is needed: {why} (run hack/setup)")


def find_kubectl() -> str | None:
    """$KUBECTL, then kubectl on PATH, then the one hack/build-controlplane built."""
    explicit = os.environ.get("KUBECTL")
    if explicit:
        return explicit
    on_path = shutil.which("kubectl")
    if on_path:
        return on_path
    try:
        built = subprocess.run(
            [str(REPO / "hack" / "build-controlplane"), "--print"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    candidate = Path(built) / "kubectl"
    return str(candidate) if candidate.is_file() else None


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = find_kubectl()
    if found is None:
        require("kubectl", "its built-in kustomize renders manifests/ (or set $KUBECTL)")
    assert found is not None
    return found


@functools.cache
def _kustomize(kubectl: str, path: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl, "kustomize", path], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(scope="session")
def render(kubectl: str) -> Any:
    """render('manifests/overlays/production') -> the rendered objects (cached per path)."""

    def _render(relative: str) -> list[dict[str, Any]]:
        return copy.deepcopy(list(_kustomize(kubectl, str(REPO / relative))))

    return _render


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
