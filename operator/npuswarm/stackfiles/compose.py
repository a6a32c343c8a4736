"""Compose stack files as `docker stack deploy` reads them: what Swarm ignores or refuses, the
value forms (sizes, durations, command lines, escapes), the notes an import makes, and the
parse of a whole file. Shared by importer.py and exporter.py."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from npuswarm.api import deployment as deployment_api
from npuswarm.core.clock import SECOND_NS

# --- Facts about `docker stack deploy` --------------------------------------------------------

# docker/cli cli/compose/types/types.go `UnsupportedProperties` (master as of 2025): stack
# deploy prints "Ignoring unsupported options: ..." and deploys without them.
SWARM_UNSUPPORTED = frozenset(
    {
        "build",
        "cgroupns_mode",
        "cgroup_parent",
        "devices",
        "domainname",
        "external_links",
        "ipc",
        "links",
        "mac_address",
        "network_mode",
        "pid",
        "privileged",
        "restart",
        "security_opt",
        "shm_size",
        "userns_mode",
    }
)
# Older CLIs had a longer list: cap_add/cap_drop became supported in 20.10 (docker/cli#2687),
# sysctls and ulimits later; a cluster on such a CLI ignored these as well.
SWARM_UNSUPPORTED_BEFORE = {
    "cap_add": "20.10",
    "cap_drop": "20.10",
    "sysctls": "20.10",
    "ulimits": "23.0",
}
# `DeprecatedProperties` of the same file: ignored with a warning.
SWARM_DEPRECATED = frozenset({"container_name", "expose"})
# `ForbiddenProperties`: stack deploy refuses a file that uses them.
SWARM_FORBIDDEN = frozenset(
    {
        "extends",
        "volume_driver",
        "volumes_from",
        "cpu_quota",
        "cpu_shares",
        "cpuset",
        "mem_limit",
        "memswap_limit",
    }
)

# Mounted by Ascend Docker Runtime (its base.list) with the NPUs; mounting them again is noise
# at best and a driver/library mismatch at worst when the runtime's list changes.
RUNTIME_DRIVER_MOUNTS = frozenset(
    {
        "/usr/local/dcmi",
        "/usr/local/bin/npu-smi",
        "/usr/local/Ascend/driver/lib64",
        "/usr/local/Ascend/driver/version.info",
        "/etc/ascend_install.info",
    }
)
# Control devices the runtime hook adds to every container that gets an NPU.
RUNTIME_CONTROL_DEVICES = frozenset({"/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"})

SHM_PATH = "/dev/shm"
# Swarm's default restart delay, for telling the user what changes when none was given.
SWARM_RESTART_DELAY_SECONDS = 5
EXTENSION = "x-npuswarm"
COMPOSE_VERSION = "3.8"  # tmpfs size needs 3.6, extension fields on services 3.7

_INTERPOLATION = re.compile(r"\$\$|\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")
_RAM = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp])?i?b?$", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}
_DURATION_NS["h"] = 3600 * 10**9


class StackFileError(ValueError):
    """The stack file cannot be converted; the message names the service and the reason."""


NoteKind = Literal["mapped", "dropped", "swarm-ignored", "check", "skipped"]


@dataclass(frozen=True)
class Note:
    kind: NoteKind
    key: str
    text: str

    def __str__(self) -> str:
        return f"{self.kind:<13} {self.key}: {self.text}"


@dataclass
class Notes:
    items: list[Note] = field(default_factory=list)

    def mapped(self, key: str, text: str) -> None:
        self.items.append(Note("mapped", key, text))

    def dropped(self, key: str, text: str) -> None:
        self.items.append(Note("dropped", key, text))

    def check(self, key: str, text: str) -> None:
        """Something converted that a person must verify before applying."""
        self.items.append(Note("check", key, text))


# --- Small parsers for compose value forms ----------------------------------------------------


def command_line(service: Mapping[str, Any]) -> list[str]:
    """entrypoint + command as one argv; compose's string form is split like a shell would."""
    return _argv(service.get("entrypoint"), "entrypoint") + _argv(service.get("command"), "command")


def _argv(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as error:
            raise StackFileError(f"{key}: cannot split {value!r}: {error}") from None
    if isinstance(value, list):
        return [scalar(item) for item in value]
    raise StackFileError(f"{key} must be a string or a list, not {type(value).__name__}")


def scalar(value: Any) -> str:
    """A YAML scalar as compose reads it; bools as the lowercase words compose writes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def ram_bytes(value: Any) -> int:
    """Compose/Docker size (``1g``, ``512m``, ``1GiB``, a byte count): binary units."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    match = _RAM.match(str(value).strip())
    if match is None:
        raise ValueError(f"not a size: {value!r} (use e.g. 512m, 1g)")
    power = "kmgtp".index(match.group(2).lower()) + 1 if match.group(2) else 0
    return int(float(match.group(1)) * 1024**power)


def quantity(size: int) -> str:
    """Bytes as the largest whole binary quantity (``1Gi``, ``512Mi``), else plain bytes."""
    for suffix, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def duration_ns(value: Any) -> int:
    """A Go duration string (``10s``, ``1m30s``, ``500ms``) as nanoseconds."""
    text = str(value).strip()
    if text in ("0", ""):
        return 0
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_NS[match.group(2)]
        position = match.end()
    if position != len(text) or isinstance(value, bool | int | float):
        raise ValueError(f"not a duration: {value!r} (use e.g. 10s, 1m30s)")
    return round(total)


def go_duration(nanoseconds: int) -> str:
    if nanoseconds % SECOND_NS == 0:
        return f"{nanoseconds // SECOND_NS}s"
    return f"{nanoseconds}ns"


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def dns_label(name: str) -> str:
    """A compose service name as a Kubernetes name and DNS label (lowercase, ``-``, <= 63).
    A name that already is one is kept as it is: `a--b` is a valid name, and an exported
    deployment must come back under its own name."""
    if DNS_LABEL.fullmatch(name):
        return name
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)[:63].rstrip("-")
    if not label:
        raise StackFileError(f"service name {name!r} has no letters or digits to name it by")
    return label


def clean_path(path: str) -> str:
    return path if path == "/" else path.rstrip("/")


def unescape(value: Any, variables: set[str]) -> Any:
    """Undo compose's ``$$`` escape; collect ``${VAR}`` references, which stay as written.

    stack deploy filled references from the deploying shell; a manifest has no such shell,
    so guessing a value would be worse than leaving them visible for review.
    """
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            variables.add(match.group(0))
            return match.group(0)

        return _INTERPOLATION.sub(replace, value)
    if isinstance(value, list):
        return [unescape(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: unescape(item, variables) for key, item in value.items()}
    return value


def escape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, list):
        return [escape(item) for item in value]
    if isinstance(value, dict):
        return {key: escape(item) for key, item in value.items()}
    return value


def parse_compose(text: str, source: str) -> dict[str, Any]:
    """The YAML of a compose file, or StackFileError saying why it is not one."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise StackFileError(f"{source}: not YAML: {error}") from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise StackFileError(f"{source}: not a compose file (expected one YAML mapping)")
    compose: dict[str, Any] = documents[0]
    if compose.get("kind") == deployment_api.KIND:
        raise StackFileError(f"{source}: already a {deployment_api.KIND}; apply it with kubectl")
    if not isinstance(compose.get("services"), dict) or not compose["services"]:
        raise StackFileError(f"{source}: not a compose file (no `services` mapping)")
    return compose
