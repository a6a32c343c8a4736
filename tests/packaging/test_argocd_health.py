"""Runs manifests/argocd/health.lua the way Argo CD runs a health check from argocd-cm.

Argo CD (util/lua) uses gopher-lua, a Lua 5.1, and for checks configured in argocd-cm opens
only the base, package, table and a reduced os library: no string or math. The object comes
from YAML through JSON as nested tables (maps keyed by string, lists 1-based, numbers as
Lua numbers, null as nil) in the global `obj`, and the script's returned table must be
{status=..., message=...}. lupa's Lua 5.1 runtime is used with the same libraries removed,
so a script that needs string.format or ("x"):sub() fails here before it fails in Argo CD.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from npuswarm.api.deployment import ModelDeployment, ModelDeploymentStatus

from .conftest import MANIFESTS, require

ARGOCD = MANIFESTS / "argocd"
HEALTH_KEY = "resource.customizations.health.npuswarm.io_ModelDeployment"
GATEWAY_HEALTH_KEY = "resource.customizations.health.npuswarm.io_ModelGateway"
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

try:
    from lupa import lua51
except ImportError:  # pragma: no cover - depends on the environment
    lua51 = None


class _JSONishLoader(yaml.SafeLoader):
    """YAML as sigs.k8s.io/yaml reads it: timestamps stay strings (no datetime objects)."""


_JSONishLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_JSONishLoader)  # a SafeLoader subclass


def cases() -> list[tuple[str, dict[str, str]]]:
    tests = load(ARGOCD / "health_test.yaml")["tests"]
    return [(case["inputPath"], case["healthStatus"]) for case in tests]


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({key: _to_lua(runtime, item) for key, item in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, item) for item in value])
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)  # gopher-lua has one number type, a float64
    raise TypeError(f"no JSON equivalent for {value!r}")


def run_health(obj: dict[str, Any]) -> dict[str, Any]:
    if lua51 is None:
        require("lupa", "it runs the Argo CD health check (pip install lupa)")
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    # What Argo CD leaves out for argocd-cm checks (useOpenLibs unset), string methods included.
    runtime.execute(
        "getmetatable('').__index = nil\n"
        "string, math, io, debug, coroutine, loadstring, dofile, loadfile = nil\n"
        "os = {time = os.time, date = os.date}"
    )
    runtime.globals().obj = _to_lua(runtime, obj)
    result = runtime.execute((ARGOCD / "health.lua").read_text())
    assert result is not None, "health.lua must return a table"
    return dict(result.items())


@pytest.mark.parametrize(("input_path", "expected"), cases(), ids=[c[0] for c in cases()])
def test_health_case(input_path: str, expected: dict[str, str]) -> None:
    obj = load(ARGOCD / input_path)
    assert run_health(obj) == expected


def test_every_testdata_file_is_a_case() -> None:
    listed = {path for path, _ in cases()}
    present = {f"testdata/{p.name}" for p in (ARGOCD / "testdata").glob("*.yaml")}
    assert listed == present


def test_cases_cover_every_health_verdict() -> None:
    seen = {expected["status"] for _, expected in cases()}
    assert seen == {"Healthy", "Progressing", "Degraded"}
    assert seen <= STATUSES


@pytest.mark.parametrize(("input_path", "expected"), cases(), ids=[c[0] for c in cases()])
def test_testdata_has_the_shape_npuswarm_writes(input_path: str, expected: dict[str, str]) -> None:
    """A test object whose status npuswarm could never write would test nothing real."""
    obj = load(ARGOCD / input_path)
    assert obj["apiVersion"] == "npuswarm.io/v1alpha1" and obj["kind"] == "ModelDeployment"
    if "status" in obj:
        ModelDeploymentStatus.model_validate(obj["status"])
    if "invalid" not in input_path:
        ModelDeployment.model_validate(obj)


def test_deleted_resource_wins_over_a_ready_status() -> None:
    obj = load(ARGOCD / "testdata" / "healthy.yaml")
    assert run_health(obj)["status"] == "Healthy"
    obj["metadata"]["deletionTimestamp"] = "2025-11-30T09:30:00Z"
    assert run_health(obj)["status"] == "Progressing"


def test_a_spec_change_turns_healthy_into_progressing_until_observed() -> None:
    obj = load(ARGOCD / "testdata" / "healthy.yaml")
    obj["metadata"]["generation"] += 1
    assert run_health(obj)["status"] == "Progressing"
    obj["status"]["observedGeneration"] += 1
    assert run_health(obj)["status"] == "Progressing", "conditions still from the old spec"
    for condition in obj["status"]["conditions"]:
        condition["observedGeneration"] += 1
    assert run_health(obj)["status"] == "Healthy"


def test_degraded_without_message_reports_the_reason() -> None:
    obj = load(ARGOCD / "testdata" / "task-failed.yaml")
    for condition in obj["status"]["conditions"]:
        if condition["type"] == "Degraded":
            condition["message"] = ""
    assert run_health(obj) == {"status": "Degraded", "message": "TaskFailed"}


def test_argocd_cm_patch_embeds_health_lua_verbatim() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["apiVersion"] == "v1" and patch["kind"] == "ConfigMap"
    assert patch["metadata"] == {"name": "argocd-cm", "namespace": "argocd"}
    assert list(patch["data"]) == [HEALTH_KEY, GATEWAY_HEALTH_KEY]
    for key in (HEALTH_KEY, GATEWAY_HEALTH_KEY):
        assert patch["data"][key] == (ARGOCD / "health.lua").read_text(), (
            "manifests/argocd/argocd-cm-patch.yaml no longer embeds health.lua: re-indent the "
            "file by 4 spaces under each data key"
        )


def test_argocd_folder_is_not_a_kustomization() -> None:
    # `kubectl apply -k` on it would replace Argo CD's whole argocd-cm with this one key.
    assert not (ARGOCD / "kustomization.yaml").exists()
    assert os.path.isfile(ARGOCD / "health.lua")
