"""Restarting a replica in place: a new task on the same node and NPUs, for a fault graded
RestartRequest or RestartBusiness on an NPU it holds (nodehealth/faults.py; docs/node-health.md,
"Fault grades"). Pure.

Swarm replaces a service's tasks when its spec changes; ``TaskTemplate.ForceUpdate`` is the
counter it offers for a restart with nothing else changed (`docker service update --force`).
The update sends the service's own spec back with the counter one higher, so the placement
(its node constraint, its ASCEND_VISIBLE_DEVICES) is the one it has. The diff compares only
what npuswarm renders (core/render.essential), not the counter, so the restart is not undone.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from npuswarm.core.diff import DeploymentPlan, update_action

FORCE_UPDATE = "ForceUpdate"


def restart_in_place(plan: DeploymentPlan, restart: Mapping[tuple[str, str], str]) -> None:
    """Step 6b: an update of each replica of ``plan`` named in ``restart`` that this pass does
    not write already (any write of the slot starts a new task anyway)."""
    writing = {a.slot for a in plan.actions} | {a.slot for a in plan.deferred}
    for slot, target in plan.slots.items():
        why = restart.get((plan.deployment, slot))
        primary = target.primary
        if why is None or primary is None or slot in writing or target.settled:
            continue
        spec = copy.deepcopy(primary.spec)
        template = spec.setdefault("TaskTemplate", {})
        template[FORCE_UPDATE] = int(template.get(FORCE_UPDATE) or 0) + 1
        plan.actions.append(update_action(primary, spec, f"restarted in place: {why}"))
