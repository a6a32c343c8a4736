"""Helpers shared by the monitoring tests: the metric names the operator really exports, the
PrometheusRule's alerts, and the metric selectors in a PromQL expression."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RULE_FILE = REPO / "manifests" / "monitoring" / "prometheusrule.yaml"
PROMTOOL_TESTS = REPO / "monitoring" / "tests"
DASHBOARD = REPO / "monitoring" / "grafana" / "npuswarm.json"
RUNBOOKS = REPO / "docs" / "runbooks.md"
MONITORING_DOC = REPO / "docs" / "monitoring.md"
CHECK_SCRIPT = REPO / "hack" / "check-monitoring"

# Series Prometheus makes itself for every scrape target, not exported by the operator.
PROMETHEUS_SERIES = frozenset({"up"})



def exported_families() -> dict[str, str]:
    """Every metric family in npuswarm.metrics.REGISTRY: name as users query it -> type."""
    from npuswarm import metrics

    families = {}
    for family in metrics.REGISTRY.collect():
        # prometheus_client strips _total from a counter family's name; queries keep it.
        name = f"{family.name}_total" if family.type == "counter" else family.name
        families[name] = family.type
    return families


def exported_series_names() -> set[str]:
    """The sample names on /metrics: histograms expose _bucket/_sum/_count, not their name."""
    names: set[str] = set()
    for name, kind in exported_families().items():
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


def load_rule() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(RULE_FILE.read_text()) if d]
    (rule,) = [d for d in documents if d["kind"] == "PrometheusRule"]
    return rule


def alerts() -> list[dict[str, Any]]:
    return [r for g in load_rule()["spec"]["groups"] for r in g["rules"] if "alert" in r]


_TOKEN = re.compile(
    r"""
      (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<matchers>\{[^}]*\})
    | (?P<range>\[[^\]]*\])
    | (?P<variable>\$\{?\w+\}?)
    | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
    | (?P<ident>[A-Za-z_:][\w:]*)
    | (?P<other>\S)
    """,
    re.VERBOSE,
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, "{matchers}" or "") for every vector selector in a PromQL expression.

    A tokenizer rather than a full parser: enough to tell metric names from functions,
    keywords and the label names in by()/without()/on() clauses.
    """
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    found = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text.lower() in _GROUPING and following[1] == "(":
            while i < len(tokens) and tokens[i][1] != ")":
                i += 1
        elif kind == "ident" and following[1].lower() in _GROUPING:
            pass  # an aggregation written `sum by (...) (...)`
        elif kind == "ident" and following[1] != "(" and text.lower() not in _KEYWORDS:
            matchers = following[1] if following[0] == "matchers" else ""
            found.append((text, matchers))
        i += 1
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (without duplicates' -1)."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", text))
