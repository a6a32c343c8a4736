"""docs/monitoring.md lists exactly the metrics the operator exports."""

from __future__ import annotations

import re
from typing import Any

from .promql import MONITORING_DOC, exported_families


def documented_metrics() -> dict[str, str]:
    """Metric -> type from the rows of the metrics table: | `name` | type | labels | meaning |"""
    rows = re.findall(r"^\| `([a-z0-9_:]+)` \| (\w+) \|", MONITORING_DOC.read_text(), re.MULTILINE)
    return dict(rows)


def test_every_exported_metric_is_documented_with_its_type() -> None:
    assert documented_metrics() == exported_families()


def label_names(metric: Any) -> tuple[str, list[str]]:
    """(name as queried, label names) through prometheus_client's public API only: a sample's
    labels name them; a labeled metric without children gets a probe child, removed after."""
    (family,) = metric.collect()
    name = family.name + ("_total" if family.type == "counter" else "")
    skip = {"le", "quantile"}
    if family.samples:
        return name, [k for k in family.samples[0].labels if k not in skip]
    for count in range(1, 10):
        values = [f"probe{i}" for i in range(count)]
        try:
            metric.labels(*values)
        except ValueError:  # not that many labels
            continue
        try:
            (probed,) = metric.collect()
            return name, [k for k in probed.samples[0].labels if k not in skip]
        finally:
            metric.remove(*values)
    raise AssertionError(f"{name}: could not find its label names")


def test_documented_labels_match_the_registry() -> None:
    from prometheus_client import Counter, Gauge, Histogram, Summary

    from npuswarm import metrics

    text = MONITORING_DOC.read_text()

    def documented(name: str) -> list[str]:
        row = re.search(rf"^\| `{name}` \| \w+ \|([^|]*)\|", text, re.MULTILINE)
        assert row is not None, name
        return re.findall(r"`(\w+)`", row.group(1))

    checked = set()
    for metric in vars(metrics).values():
        if isinstance(metric, Counter | Gauge | Histogram | Summary):
            name, labels = label_names(metric)
            assert documented(name) == labels, name
            checked.add(name)
    # The rest come from the pass's custom collector: its samples name their labels (before
    # the first pass there are none, and the row's presence is what can be checked).
    for family in metrics.REGISTRY.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        if name in checked:
            continue
        labelled = {tuple(k for k in s.labels if k != "le") for s in family.samples}
        assert labelled <= {tuple(documented(name))}, name
        checked.add(name)
    assert checked == set(exported_families())
