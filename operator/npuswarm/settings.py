"""Operator settings, read once from the environment (12-factor: the Deployment sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise SystemExit(f"{name}={raw!r} must not be negative")
    return value


@dataclass(frozen=True)
class Settings:
    # How often every ModelDeployment is compared with Swarm, to catch drift (hand edits,
    # removed services, failing tasks, lost nodes) that raises no Kubernetes event.
    resync_seconds: float = 30.0
    # How long a node may be down before its replicas are placed elsewhere. Moving a large
    # model costs minutes of loading, so a short network blip should not trigger it.
    lost_node_grace_seconds: float = 120.0
    metrics_port: int = 8081
    docker_timeout_seconds: float = 30.0
    swarm_probe_seconds: float = 15.0
    # How often the cheap task poll looks for task state changes (Docker's event stream has
    # none), and how often while a rollout or a start is under way.
    task_poll_seconds: float = 5.0
    task_poll_busy_seconds: float = 1.0
    # Swarm writes of one pass in flight at once.
    write_concurrency: int = 8
    # Which npuswarm installation this is, when several share one Swarm: each owns only the
    # services carrying its name, and treats the others' as foreign.
    instance: str = "default"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            resync_seconds=_number("NPUSWARM_RESYNC_SECONDS", cls.resync_seconds),
            lost_node_grace_seconds=_number(
                "NPUSWARM_LOST_NODE_GRACE_SECONDS", cls.lost_node_grace_seconds
            ),
            metrics_port=int(_number("NPUSWARM_METRICS_PORT", cls.metrics_port)),
            docker_timeout_seconds=_number(
                "NPUSWARM_DOCKER_TIMEOUT_SECONDS", cls.docker_timeout_seconds
            ),
            swarm_probe_seconds=_number("NPUSWARM_SWARM_PROBE_SECONDS", cls.swarm_probe_seconds),
            task_poll_seconds=_number("NPUSWARM_TASK_POLL_SECONDS", cls.task_poll_seconds),
            task_poll_busy_seconds=_number(
                "NPUSWARM_TASK_POLL_BUSY_SECONDS", cls.task_poll_busy_seconds
            ),
            write_concurrency=int(_number("NPUSWARM_WRITE_CONCURRENCY", cls.write_concurrency)),
            instance=os.environ.get("NPUSWARM_INSTANCE") or cls.instance,
        )
