"""The alert rules: promtool accepts them and their unit tests pass, every alert is tested
both firing and quiet, and carries what the person paged needs (severity, runbook)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .promql import (
    CHECK_SCRIPT,
    PROMETHEUS_SERIES,
    PROMTOOL_TESTS,
    REPO,
    RULE_FILE,
    RUNBOOKS,
    alerts,
    duration_seconds,
    exported_series_names,
    github_anchors,
    load_rule,
    selectors,
)

RUNBOOK_BASE = "docs/runbooks.md#"
SEVERITIES = {"critical", "warning", "info"}


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: apt-get install -y prometheus", pytrace=False)
    return found


def test_check_monitoring_passes(promtool: str) -> None:
    result = run_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rule_rules())} rules found" in result.stdout
    for test_file in sorted(PROMTOOL_TESTS.glob("*.yaml")):
        assert f"Unit Testing:  {test_file.name}" in result.stdout


def load_rule_rules() -> list[dict[str, Any]]:
    return [r for g in load_rule()["spec"]["groups"] for r in g["rules"]]


def test_every_alert_has_a_firing_test_that_depends_on_its_expression(
    promtool: str, tmp_path: Path
) -> None:
    """With each expression replaced by one that never returns anything, promtool must report
    a failed expectation for every alert: each one has a test that needs it to fire."""
    rule = load_rule()
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            if "alert" in item:
                item["expr"] = "vector(1) == 0"
    mutated = tmp_path / "prometheusrule.yaml"
    mutated.write_text(yaml.safe_dump(rule))
    result = run_check("--rule-file", str(mutated))
    assert result.returncode != 0
    silent = [a["alert"] for a in alerts() if f"alertname: {a['alert']}," not in result.stdout]
    assert not silent, f"no promtool test notices these alerts never firing: {silent}"


def test_check_monitoring_fails_on_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    rule = load_rule()
    rule["spec"]["groups"][0]["rules"][0]["expr"] = "sum(rate(up[5m]"
    broken = tmp_path / "prometheusrule.yaml"
    broken.write_text(yaml.safe_dump(rule))
    result = run_check("--rule-file", str(broken))
    assert result.returncode != 0
    assert '"NpuswarmOperatorDown": could not parse expression' in result.stdout


def test_extract_prints_the_rule_groups() -> None:
    result = run_check("--extract")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == {"groups": load_rule()["spec"]["groups"]}


def promtool_cases() -> list[dict[str, Any]]:
    cases = []
    for path in sorted(PROMTOOL_TESTS.glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        assert document["rule_files"] == ["npuswarm-rules.yaml"], path
        for test in document["tests"]:
            cases.extend(test.get("alert_rule_test") or [])
    return cases


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Quiet means "no alert" checked after the alert's `for` has passed: earlier, a pending
    alert is quiet whatever the expression says."""
    cases = promtool_cases()
    missing = []
    for alert in alerts():
        name = alert["alert"]
        hold = duration_seconds(alert.get("for", "0s"))
        mine = [c for c in cases if c["alertname"] == name]
        if not any(c.get("exp_alerts") for c in mine):
            missing.append(f"{name}: no test where it fires")
        if not any(
            not c.get("exp_alerts") and duration_seconds(c["eval_time"]) > hold for c in mine
        ):
            missing.append(f"{name}: no test where it stays quiet after its for: {hold}s")
    assert not missing


def test_promtool_tests_name_only_real_alerts() -> None:
    names = {a["alert"] for a in alerts()}
    unknown = {c["alertname"] for c in promtool_cases()} - names
    assert not unknown


def test_alerts_are_unique_and_fully_annotated() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    anchors = github_anchors(RUNBOOKS.read_text())
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        url = annotations["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), name
        anchor = url.removeprefix(RUNBOOK_BASE)
        assert (REPO / url.partition("#")[0]).is_file(), f"{name}: {url} is no file of the repo"
        assert anchor == name.lower(), f"{name}: runbook anchor {anchor}"
        assert anchor in anchors, f"{name}: docs/runbooks.md has no section {anchor}"


def test_runbooks_cover_only_real_alerts() -> None:
    """A section left behind by a renamed alert would send people to stale advice."""
    text = RUNBOOKS.read_text()
    sections = {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}
    alert_sections = {s for s in sections if s.startswith("Npuswarm")}
    assert alert_sections == {a["alert"] for a in alerts()}


def test_required_alerts_exist() -> None:
    exprs = {a["alert"]: a["expr"] for a in alerts()}
    required = {
        "NpuswarmOperatorDown": "up",
        "NpuswarmSwarmManagerUnreachable": "npuswarm_swarm_manager_reachable",
        "NpuswarmReconcileErrorsHigh": "controller_runtime_reconcile_errors_total",
        "NpuswarmReconcileStale": "npuswarm_last_successful_reconcile_timestamp_seconds",
        "NpuswarmModelDeploymentNotReady": "npuswarm_replicas_ready",
        "NpuswarmInsufficientNPUs": "npuswarm_unplaced_replicas",
        "NpuswarmNPUCapacityHigh": "npuswarm_npus",
    }
    for name, metric in required.items():
        assert name in exprs
        assert metric in {m for m, _ in selectors(exprs[name])}, name


def test_rule_expressions_use_exported_metrics_of_job_npuswarm() -> None:
    """A renamed metric would leave an alert silently matching nothing, and a selector without
    job="npuswarm" would also match other operators' controller_runtime_* series."""
    known = exported_series_names() | PROMETHEUS_SERIES
    for rule in load_rule_rules():
        for name, matchers in selectors(rule["expr"]):
            assert name in known, f"{rule.get('alert')}: {name} is not exported"
            assert 'job="npuswarm"' in matchers, f"{rule.get('alert')}: {name}{matchers}"


def test_rule_file_is_where_the_check_script_reads_it() -> None:
    assert RULE_FILE.exists()
    assert CHECK_SCRIPT.stat().st_mode & 0o111, "hack/check-monitoring must be executable"
