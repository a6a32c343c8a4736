"""One verdict everywhere: Argo CD (manifests/argocd/health.lua) and kstatus (Flux, kpt,
cli-utils; sigs.k8s.io/cli-utils from the Go module proxy, hack/build-kstatus) read every
object in manifests/argocd/testdata the same way, and docs/gitops.md's table says so."""

from __future__ import annotations

import json
import re

import pytest

from tests import kstatus

from .conftest import REPO
from .test_argocd_health import ARGOCD, load, run_health

AGREE = {"Healthy": "Current", "Progressing": "InProgress", "Degraded": "Failed"}
# Objects the two read differently, and why that never reaches a user. Each is pinned, so a
# change on either side shows up here.
APART = {
    # kstatus decides on metadata.deletionTimestamp before anything the object says, and Argo
    # CD has no such verdict. Neither is done: Flux and cli-utils go on waiting.
    "being-deleted.yaml": ("Progressing", "Terminating"),
    # Never served: the CRD defaults status to {observedGeneration: 0} (not-observed-yet.yaml).
    "no-status.yaml": ("Progressing", "Current"),
    # Never written: npuswarm writes all five conditions, for status.observedGeneration, in every
    # status (tests/unit/test_kstatus_conditions.py); kstatus compares only that field.
    "no-conditions-yet.yaml": ("Progressing", "Current"),
    "conditions-from-older-generation.yaml": ("Progressing", "Current"),
}
TESTDATA = sorted((ARGOCD / "testdata").glob("*.yaml"))
DOC = REPO / "docs" / "gitops.md"
ROW = re.compile(r"^\| `(?P<file>[\w.-]+\.yaml)` \| (?P<argocd>\w+) \| (?P<kstatus>\w+) \|")


@pytest.fixture(scope="module")
def table() -> dict[str, tuple[str, str]]:
    """file -> (Argo CD's verdict, kstatus's verdict), both computed now."""
    found = kstatus.verdicts(*TESTDATA)
    assert [v["name"] for v in found] == [load(p)["metadata"]["name"] for p in TESTDATA]
    return {
        path.name: (run_health(load(path))["status"], verdict["status"])
        for path, verdict in zip(TESTDATA, found, strict=True)
    }


@pytest.mark.parametrize("name", [p.name for p in TESTDATA])
def test_argocd_and_kstatus_agree(table: dict[str, tuple[str, str]], name: str) -> None:
    argocd, verdict = table[name]
    if name in APART:
        assert (argocd, verdict) == APART[name]
    else:
        assert verdict == AGREE[argocd], f"{name}: Argo CD says {argocd}, kstatus {verdict}"


def test_every_verdict_is_covered(table: dict[str, tuple[str, str]]) -> None:
    agreeing = {pair for name, pair in table.items() if name not in APART}
    assert agreeing == set(AGREE.items())
    assert set(APART) <= set(table)


def test_stalled_objects_fail_with_the_reason(table: dict[str, tuple[str, str]]) -> None:
    """A Flux user sees why, not a timeout: kstatus's message is the Degraded message."""
    for path in TESTDATA:
        if table[path.name][1] != "Failed":
            continue
        (verdict,) = kstatus.verdicts(path)
        degraded = next(c for c in load(path)["status"]["conditions"] if c["type"] == "Degraded")
        assert verdict["message"] == degraded["message"] and verdict["message"]
        assert verdict["conditions"][0]["reason"] == degraded["reason"]


def test_gitops_doc_table_is_the_computed_one(table: dict[str, tuple[str, str]]) -> None:
    rows = [ROW.match(line) for line in DOC.read_text().splitlines()]
    documented = {m["file"]: (m["argocd"], m["kstatus"]) for m in rows if m}
    assert documented == table, "docs/gitops.md's verdict table is out of date"


def test_a_list_from_kubectl_get_is_read_item_by_item() -> None:
    items = [load(ARGOCD / "testdata" / name) for name in ("healthy.yaml", "invalid-spec.yaml")]
    listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    assert [v["status"] for v in kstatus.verdicts(stdin=listing)] == ["Current", "Failed"]
