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
    checked = 0
    for family in metrics.REGISTRY.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        row = re.search(rf"^\| `{name}` \| \w+ \|([^|]*)\|", text, re.MULTILINE)
        assert row is not None, name
        # A family's label names show on its samples (histograms add `le`); one without a
        # series yet is checked by the table row's presence only.
        labelled = {tuple(k for k in s.labels if k != "le") for s in family.samples}
        if labelled:
            assert labelled == {tuple(re.findall(r"`(\w+)`", row.group(1)))}, name
            checked += 1
    assert checked >= 10
