"""bench/fleet.py --report: saved results become docs/performance.md's tables and plot.

Only the rendering; the runs themselves are benchmarks, never tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fleet

PAGE = """# Performance

<!-- targets:begin -->
old
<!-- targets:end -->

<!-- fleet:begin -->
old
<!-- fleet:end -->
tail
"""


def result(checkout: str, nodes: int, deployments: int, **phases: dict[str, Any]) -> dict[str, Any]:
    return {
        "started": f"2026-12-03T10:{deployments % 60:02d}:00+00:00",
        "checkout": checkout,
        "machine": {"cpus": 2, "cpu_model": "test"},
        "params": {"nodes": nodes, "deployments": deployments},
        "phases": phases,
        "duration_s": 100.0,
    }


def test_report_fills_the_blocks_and_draws_the_plot(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    runs = [
        result(
            "before",
            50,
            100,
            converge={"all_services_s": 17.2, "all_running_s": 17.7, "all_ready_s": 58.3},
            steady={
                "operator_cpu_pct": 19.2,
                "list_calls_per_min": 799.2,
                "writes_per_min": 0.0,
                "list_calls_per_reconcile": 4.0,
            },
            restore={"service_back_s": 27.2},
            memory={"vmrss_mib": 113.6},
        ),
        result("before", 50, 10, steady={"operator_cpu_pct": 1.0, "list_calls_per_min": 79.9}),
        result(
            "after",
            1000,
            2000,
            converge={"all_services_s": None, "all_services_s_note": "not reached in 300 s"},
            steady={"operator_cpu_pct": 4.0, "list_calls_per_min": 16.0, "writes_per_min": 0.0},
            update={"changed": 10, "writes": 11},
            memory={"vmrss_mib": 320.5},
        ),
    ]
    for n, run in enumerate(runs):
        (results / f"fleet-{n}.json").write_text(json.dumps(run))
    page = tmp_path / "performance.md"
    page.write_text(PAGE)

    fleet.report(page, results)

    text = page.read_text()
    assert "old" not in text
    assert text.endswith("<!-- fleet:end -->\ntail\n")
    targets = text.split("<!-- targets:begin -->")[1].split("<!-- targets:end -->")[0]
    assert "| `before` | `after` |" in targets
    assert "19.2 %: missed already at 50x100" in targets
    assert "4.0 %: met" in targets
    assert "113.6 MiB at 50x100 (target size not run)" in targets
    assert "not reached in 300 s" in targets
    assert "10 changed, 11 writes: met" in targets
    assert "M=10: 79.9/min; M=100: 799.2/min (4.0/reconcile)" in targets
    rows = [
        line
        for line in text.split("<!-- fleet:begin -->")[1].splitlines()
        if line.startswith("| 50")
    ]
    assert [row.split("|")[1].strip() for row in rows] == ["50 x 10", "50 x 100"]
    svg = (tmp_path / "performance-fleet.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2  # "before" in both panels


def test_report_refuses_a_page_without_its_blocks(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "fleet-0.json").write_text(json.dumps(result("x", 5, 1)))
    page = tmp_path / "performance.md"
    page.write_text("# no blocks\n")
    with pytest.raises(SystemExit, match="fleet:begin"):
        fleet.report(page, results)
    assert page.read_text() == "# no blocks\n"
