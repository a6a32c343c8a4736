"""docs/monitoring.md lists exactly the metrics the operator exports."""

from __future__ import annotations

import re

from .promql import MONITORING_DOC, exported_families


def documented_metrics() -> dict[str, str]:
    """Metric -> type from the rows of the metrics table: | `name` | type | labels | meaning |"""
    rows = re.findall(r"^\| `([a-z_:]+)` \| (\w+) \|", MONITORING_DOC.read_text(), re.MULTILINE)
    return dict(rows)


def test_every_exported_metric_is_documented_with_its_type() -> None:
    assert documented_metrics() == exported_families()


def test_documented_labels_match_the_registry() -> None:
    from npuswarm import metrics

    text = MONITORING_DOC.read_text()
    # prometheus_client has no public way to list collectors or their label names.
    for collector in metrics.REGISTRY._collector_to_names:
        name = collector._name + ("_total" if collector._type == "counter" else "")
        row = re.search(rf"^\| `{name}` \| \w+ \|([^|]*)\|", text, re.MULTILINE)
        assert row is not None, name
        assert re.findall(r"`(\w+)`", row.group(1)) == list(collector._labelnames), name
