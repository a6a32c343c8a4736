"""The Argo CD examples point at things that exist, and the packaging docs name real files."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import pytest
import yaml

from npuswarm.api.deployment import ModelDeployment

from .conftest import REPO

EXAMPLES = REPO / "examples" / "argocd"
DOCS = ["install.md", "upgrade.md", "uninstall.md", "gitops.md", "gateway.md"]
CASCADE_FINALIZER = "resources-finalizer.argocd.argoproj.io"


def application(name: str) -> dict[str, Any]:
    app = yaml.safe_load((EXAMPLES / name).read_text())
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    return app


def wave(app: dict[str, Any]) -> int:
    return int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])


def test_operator_application_syncs_an_install_folder() -> None:
    app = application("npuswarm.yaml")
    path = REPO / app["spec"]["source"]["path"]
    assert (path / "kustomization.yaml").is_file()
    assert app["spec"]["destination"]["namespace"] == "npuswarm-system"


def test_models_application_syncs_valid_modeldeployments() -> None:
    app = application("models.yaml")
    source = app["spec"]["source"]
    include = source["directory"]["include"]
    candidates = sorted((REPO / source["path"]).glob("*.yaml"))
    files = [p for p in candidates if fnmatch.fnmatch(p.name, include)]
    assert files
    for path in files:
        for document in yaml.safe_load_all(path.read_text()):
            document.setdefault("metadata", {}).setdefault("namespace", "models")
            ModelDeployment.model_validate(document)


def test_models_come_after_the_operator() -> None:
    assert wave(application("npuswarm.yaml")) < wave(application("models.yaml"))


@pytest.mark.parametrize("name", ["npuswarm.yaml", "models.yaml"])
def test_deleting_an_application_deletes_nothing(name: str) -> None:
    # A cascading delete of the models would remove every model's Swarm services.
    assert CASCADE_FINALIZER not in application(name)["metadata"].get("finalizers", [])


def test_models_are_never_all_pruned_at_once() -> None:
    automated = application("models.yaml")["spec"]["syncPolicy"]["automated"]
    assert automated["allowEmpty"] is False


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_files_that_exist(doc: str) -> None:
    text = (REPO / "docs" / doc).read_text()
    named = set(re.findall(r"\b((?:manifests|examples|hack|crds|docs)/[\w.*/-]*[\w/*])", text))
    assert named
    missing = sorted(n for n in named if not any(REPO.glob(n.rstrip("/"))))
    assert not missing, f"{doc} names files that do not exist: {missing}"


def test_flux_example_waits_on_modeldeployments_and_the_doc_shows_it() -> None:
    path = REPO / "examples" / "flux" / "models.yaml"
    example = yaml.safe_load(path.read_text())
    assert example["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1" and example["kind"] == "Kustomization"
    spec = example["spec"]
    # wait: true health-checks every applied object through kstatus; a timeout bounds it.
    assert spec["wait"] is True and spec["timeout"] and spec["prune"] is True
    assert spec["dependsOn"] and spec["sourceRef"]["kind"] == "GitRepository"
    doc = (REPO / "docs" / "gitops.md").read_text()
    shown = doc.split("`examples/flux/models.yaml`:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(shown) == example, "docs/gitops.md's Flux example differs from the file"
