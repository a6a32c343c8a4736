"""RoCE links of a node's NPUs, from `hccn_tool` as the node agent runs it. Pure.

Multi-node groups (vllm-ascend's data-parallel members across nodes) talk over each NPU's RoCE
NIC; vllm-ascend's multi-node guide asks for every NPU's `hccn_tool -i N -link -g` to say UP
and its `-net_health -g` to say Success before a start. A node whose NPU links are down gets no
multi-node group member: placement reads ``NodeInfo.roce_problem`` (core/nodes.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HCCN_TOOL = "/usr/local/Ascend/driver/tools/hccn_tool"
_LINK = re.compile(r"link status:\s*(\S+)")
_NET_HEALTH = re.compile(r"net health status:\s*(.+?)\s*$", re.MULTILINE)
# MindCluster's exporter counts Init (no netdetect address to probe) as healthy too.
NET_HEALTHY = frozenset({"Success", "Init"})


@dataclass(frozen=True)
class RoceLink:
    npu: int
    link: str  # UP, DOWN, or "" when hccn_tool did not say
    net_health: str  # Success, Fault, Init, ... or ""

    @property
    def ok(self) -> bool:
        return self.link == "UP" and self.net_health in NET_HEALTHY


def parse_link(text: str) -> str:
    found = _LINK.search(text)
    return found.group(1).upper() if found else ""


def parse_net_health(text: str) -> str:
    found = _NET_HEALTH.search(text)
    return found.group(1) if found else ""


def links(answer: Mapping[str, Any]) -> dict[int, RoceLink] | None:
    """The agent's RoCE part: per NPU its link and net health; None when the node has no
    hccn_tool (not a RoCE node, or the runtime does not mount it: nothing is concluded)."""
    roce = answer.get("roce") or {}
    if not roce.get("present"):
        return None
    found = {}
    for key, value in (roce.get("npus") or {}).items():
        npu = int(key)
        found[npu] = RoceLink(
            npu, parse_link(str(value.get("link", ""))), parse_net_health(str(value.get("net", "")))
        )
    return found


def problem(hostname: str, found: Mapping[int, RoceLink] | None) -> str:
    """Why the node takes no multi-node group member, or ''."""
    if not found:
        return ""
    bad = [link for _, link in sorted(found.items()) if not link.ok]
    if not bad:
        return ""
    shown = ", ".join(
        f"NPU {link.npu} link {link.link or '?'}, net health {link.net_health or '?'}"
        for link in bad[:3]
    )
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"RoCE on node {hostname}: {shown}{more} (hccn_tool)"
