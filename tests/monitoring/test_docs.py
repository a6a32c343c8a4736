"""docs/monitoring.md lists exactly the metrics the operator exports."""

from __future__ import annotations

import re
from typing import Any

from .promql import MONITORING_DOC, exported_families


def documented_metrics() -> dict[str, str]:
    """Metric -> type from the rows of the metrics table: | `name` | type | labels | meaning |"""
    rows = re.findall(r"^\| `([a-z_:]+)` \| (\w+) \|", MONITORING_DOC.read_text(), re.MULTILINE)
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
    found = [m for m in vars(metrics).values() if isinstance(m, Counter | Gauge | Histogram | Summary)]
    names = {label_names(m)[0] for m in found}
    # Every family of the registry is one of the module's metrics, so none goes unchecked.
    assert names == set(exported_families())
    for metric in found:
        name, labels = label_names(metric)
        row = re.search(rf"^\| `{name}` \| \w+ \|([^|]*)\|", text, re.MULTILINE)
        assert row is not None, name
        assert re.findall(r"`(\w+)`", row.group(1)) == labels, name
