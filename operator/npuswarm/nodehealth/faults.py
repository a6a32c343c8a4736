"""Fault grades: what npu-smi's error codes mean for a replica, in the levels of Huawei's
MindCluster (docs/node-health.md, "Fault grades"). Pure.

npu-smi's Health column gives the most serious alarm of an NPU; `npu-smi info -t health -i N
-c 0` gives its error codes (hex, as DCMI reports them). Each code has a level; the most
serious level of an NPU's codes decides what npuswarm does:

- tolerate (NotHandleFault, SubHealthFault): the NPU keeps serving;
- restart (RestartRequest, RestartBusiness): the replica on it gets a new task on the same node
  and NPUs, once per fault occurrence;
- pre-separate (PreSeparateNPU): nothing new is placed on the NPU; a replica on it stays;
- isolate (FreeRestartNPU, RestartNPU, SeparateNPU, ManuallySeparateNPU): given to nobody; a
  replica on it moves after the grace, as for an unhealthy NPU;
- node (SeparateNode, npuswarm's own level, no code has it by default): the node takes no new
  replica; those that run there stay.

A code the table does not know is graded as MindCluster's device plugin grades a code missing
from its faultCode.json, by the alarm's severity: NotHandleFault on a minor alarm (Health
`Warning`), SeparateNPU above it. An NPU whose health is not OK but whose codes could not be
read keeps the rule of the Health column (OK and Warning serve).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["tolerate", "restart", "preseparate", "isolate", "node"]

# Least to most serious; the most serious level of an NPU's codes wins (MindCluster's order,
# component/ascend-device-plugin getMostSeriousFaultType, with SeparateNode above all).
LEVELS: tuple[str, ...] = (
    "NotHandleFault",
    "SubHealthFault",
    "RestartRequest",
    "RestartBusiness",
    "FreeRestartNPU",
    "RestartNPU",
    "PreSeparateNPU",
    "SeparateNPU",
    "ManuallySeparateNPU",
    "SeparateNode",
)
ACTIONS: dict[str, Action] = {
    "NotHandleFault": "tolerate",
    "SubHealthFault": "tolerate",
    "RestartRequest": "restart",
    "RestartBusiness": "restart",
    "FreeRestartNPU": "isolate",
    "RestartNPU": "isolate",
    "PreSeparateNPU": "preseparate",
    "SeparateNPU": "isolate",
    "ManuallySeparateNPU": "isolate",
    "SeparateNode": "node",
}
UNKNOWN_LEVEL = "SeparateNPU"
# npu-smi's Health column for a minor alarm (DCMI health 1): an unknown code there is tolerated.
MINOR = "Warning"

# The defaults: a few codes per level from MindCluster's published table (its device plugin's
# faultCode.json; docs/node-health.md lists them). For the whole table, point
# NPUSWARM_FAULT_CODES_FILE at MindCluster's faultCode.json.
DEFAULT_CODES: dict[str, tuple[str, ...]] = {
    "NotHandleFault": (
        "80E21007",
        "80E38003",
        "80F78006",
        "80C98006",
        "80CB8006",
        "81318006",
        "81078603",
        "A4025021",
    ),
    "SubHealthFault": (
        "81A3880C",
        "81AD8605",
        "80E20207",
        "81078605",
        "80DE0207",
        "8C2FA001",
        "819B8605",
        "80818C06",
        "8C1F860A",
        "80E18405",
        "81B18605",
    ),
    "RestartRequest": (
        "80C98008",
        "80C98002",
        "80C98003",
        "80C98009",
        "80CB8002",
        "80CB8008",
        "80CB8009",
        "80CF8003",
        "81318008",
        "80D58000",
    ),
    "RestartBusiness": (
        "8C204E00",
        "A8028802",
        "A6301002",
        "A60250A1",
        "A2301001",
        "A2301002",
        "A2303001",
        "80E01801",
        "81B38002",
    ),
    "FreeRestartNPU": (
        "8C0E4E00",
        "8C104E00",
        "8C0C4E00",
        "8C044E00",
        "8C064E00",
        "8C17A005",
        "8C1DA005",
        "8C19A005",
        "8C0A4E00",
        "8C084E00",
        "A4193217",
        "A4193218",
        "A42A0000",
        "A42F3917",
        "A42F3918",
        "8C464E00",
        "8C124E00",
        "41AE4E01",
        "8C484E00",
        "8C4C4E00",
        "80AD8009",
        "81CB8003",
        "81CB8009",
    ),
    "RestartNPU": ("8C03A000", "8C1FA006", "40F84E00", "80E24E00", "80E21E01", "80E38008"),
    "SeparateNPU": ("80E3A201", "80E18402", "80E0020B", "817F8002", "814F8002", "9419321B"),
    "PreSeparateNPU": ("8118043C", "8118045A", "8F180220"),
}

_ERROR_CODE = re.compile(r"^\s*Error Code\s*:\s*(.*)$", re.MULTILINE)
_CODE = re.compile(r"^[0-9A-Fa-f]{1,16}$")


class FaultConfigError(ValueError):
    """A fault table or override that cannot be read (a setting error, said at startup)."""


@dataclass(frozen=True)
class FaultTable:
    """Error code (upper-case hex) -> level."""

    levels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def default(cls) -> FaultTable:
        return cls.from_lists(DEFAULT_CODES)

    @classmethod
    def from_lists(cls, lists: Mapping[str, Iterable[str]]) -> FaultTable:
        found: dict[str, str] = {}
        for level, codes in lists.items():
            if level not in ACTIONS:
                known = ", ".join(LEVELS)
                raise FaultConfigError(f"unknown fault level {level!r} (known: {known})")
            for code in codes:
                key = _code(code)
                # A code listed at two levels takes the more serious one, as MindCluster does.
                if key not in found or LEVELS.index(level) > LEVELS.index(found[key]):
                    found[key] = level
        return cls(found)

    @classmethod
    def from_mindcluster(cls, document: Mapping[str, Any]) -> FaultTable:
        """MindCluster's faultCode.json: ``{"RestartRequestCodes": ["80C98008", ...], ...}``
        (keys of other shapes, such as its duration settings, are left out)."""
        lists = {
            key.removesuffix("Codes"): value
            for key, value in document.items()
            if key.endswith("Codes") and isinstance(value, list)
        }
        return cls.from_lists({k: [str(c) for c in v] for k, v in lists.items() if k in ACTIONS})

    def with_overrides(self, text: str) -> FaultTable:
        """``CODE=Level`` pairs, comma-separated, on top of this table."""
        levels = dict(self.levels)
        for pair in (p.strip() for p in text.split(",")):
            if not pair:
                continue
            code, sep, level = pair.partition("=")
            if not sep or level.strip() not in ACTIONS:
                raise FaultConfigError(
                    f"fault code override {pair!r}: want CODE=Level, Level one of "
                    + ", ".join(LEVELS)
                )
            levels[_code(code)] = level.strip()
        return FaultTable(levels)

    def level(self, code: str, health: str = "") -> str:
        """A code's level; one the table lacks by the alarm's severity (``health``)."""
        unknown = "NotHandleFault" if health == MINOR else UNKNOWN_LEVEL
        return self.levels.get(code.upper(), unknown)


def _code(text: str) -> str:
    code = text.strip().upper().removeprefix("0X")
    if not _CODE.match(code):
        raise FaultConfigError(f"fault code {text!r} is not a hex error code")
    return code


def load_table(path: str, overrides: str) -> FaultTable:
    """The defaults, or MindCluster's faultCode.json at ``path``, then ``overrides``."""
    table = FaultTable.default()
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                table = FaultTable.from_mindcluster(json.load(file))
        except (OSError, ValueError) as error:
            raise FaultConfigError(f"NPUSWARM_FAULT_CODES_FILE {path}: {error}") from error
    return table.with_overrides(overrides)


def error_codes(health_text: str) -> tuple[str, ...]:
    """The codes of `npu-smi info -t health -i N -c 0` ("Error Code : A4025021 8C03A000";
    NA when there are none)."""
    found = _ERROR_CODE.search(health_text)
    if found is None:
        return ()
    return tuple(c.upper() for c in found.group(1).split() if _CODE.match(c))


@dataclass(frozen=True)
class Fault:
    """An NPU's fault: its codes, their most serious level, and what npuswarm does."""

    codes: tuple[str, ...]
    level: str
    action: Action

    def describe(self) -> str:
        shown = " ".join(self.codes[:4]) + (" ..." if len(self.codes) > 4 else "")
        return f"{self.level}: error code {shown}" if self.codes else self.level


def grade(health: str, codes: Iterable[str], table: FaultTable) -> Fault | None:
    """The fault of an NPU whose Health column reads ``health`` and whose error codes are
    ``codes`` (None: no fault, or one the Health column's rule decides without codes)."""
    codes = tuple(codes)
    if health == "OK" or not codes:
        return None
    level = max((table.level(c, health) for c in codes), key=LEVELS.index)
    return Fault(codes, level, ACTIONS[level])
