"""Shared test helpers: repo paths, and small builders for pure-unit inputs."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The lab and control-plane tooling are plain modules under hack/, shared by tests and users.
sys.path.insert(0, str(REPO / "hack"))
