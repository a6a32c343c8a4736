"""The PromQL tokenizer the other monitoring tests rely on must find exactly the metrics."""

from __future__ import annotations

from .promql import duration_seconds, github_anchors, metric_names, selectors


def test_metric_names_skip_functions_keywords_and_grouping_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, operation) (rate(foo_bucket{job=~"$job"}'
        "[$__rate_interval]))) / on (job) group_left (node) bar > bool 0.5 and "
        "time() - baz offset 5m unless sum(qux) without (pod)"
    )
    assert metric_names(expr) == {"foo_bucket", "bar", "baz", "qux"}


def test_selectors_keep_matchers_and_ignore_strings() -> None:
    expr = 'label_replace(up{job="a"}, "dst", "$1", "src", "(.*)") or absent(up)'
    assert selectors(expr) == [("up", '{job="a"}'), ("up", "")]
    assert metric_names('vector(1) * 2e3 + foo{a="sum(b)"}') == {"foo"}


def test_github_anchors_and_durations() -> None:
    assert github_anchors("# Runbooks\n## NpuswarmOperatorDown\n### What it means\n") == {
        "runbooks",
        "npuswarmoperatordown",
        "what-it-means",
    }
    assert duration_seconds("15m") == 900
    assert duration_seconds("1h30m") == 5400
