"""kstatus-verdict (hack/kstatus): sigs.k8s.io/cli-utils' kstatus, as Flux, kpt and cli-utils
read health, run over ModelDeployment objects. Built by hack/build-kstatus (hack/test does it
before pytest); a missing binary is a failure that says how to build it, never a skip."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "hack" / "build-kstatus"


def binary() -> Path:
    where = subprocess.run([str(BUILD), "--print"], capture_output=True, text=True, check=True)
    path = Path(where.stdout.strip())
    if not path.is_file():
        pytest.fail(f"{path} is missing: run hack/build-kstatus (Go, from the Go module proxy)",
                    pytrace=False)
    return path


def verdicts(*files: Path, stdin: str | None = None) -> list[dict[str, Any]]:
    """One {name, namespace, status, message, conditions} per object, in input order."""
    args = [str(binary()), "--json", *(str(f) for f in files)]
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"kstatus-verdict failed: {result.stderr}"
    return [json.loads(line) for line in result.stdout.splitlines()]
