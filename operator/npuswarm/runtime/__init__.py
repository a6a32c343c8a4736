"""The operator's running state, kept in kopf's memo: one Runtime composing

- the pass loop (passes.py), which serves every trigger with one pass at a time,
- the status publisher (publisher.py): statuses and Events, only what changed, with retries,
- the index reader (index.py): what Kubernetes asks for, from the indexes kopf's events fill,
- the Swarm watch (swarm_watch.py): event stream, task poll, reachability ping,
- the leadership watch (leadership.py): kopf's peering rule, the gate of every pass,
- the node-check loop (node_checks.py), when node validation is on,
- the autoscaler loop (autoscaler.py): engine load from the gateways, replica counts,

all holding one Triggers object (triggers.py) to ask for a pass. Triggers only mark
deployments as wanting a pass; triggers that arrive together are served by one pass, and the
periodic resync is the safety net. Every background loop survives any exception and counts
it in npuswarm_background_errors_total{loop}.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from npuswarm.gateway.credentials import Credentials
from npuswarm.kube import Kube
from npuswarm.nodehealth.runner import NodeChecker, publish_verdicts
from npuswarm.reconcile import Reconciler
from npuswarm.runtime.autoscaler import Autoscaler
from npuswarm.runtime.index import IndexGate, IndexReader
from npuswarm.runtime.leadership import Leadership, LeadershipWatch
from npuswarm.runtime.node_checks import NodeCheckLoop
from npuswarm.runtime.passes import PassLoop
from npuswarm.runtime.publisher import StatusPublisher
from npuswarm.runtime.swarm_watch import SwarmWatch
from npuswarm.runtime.triggers import Triggers, survive
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm

__all__ = ["Leadership", "Runtime"]


@dataclass
class Runtime:
    settings: Settings
    reconciler: Reconciler
    kube: Kube
    leadership: Leadership
    # The indexes of ModelDeployments and ModelGateways: (namespace, name) -> values, and of
    # the Namespaces' NPU quota annotations, filled by kopf's event handlers (handlers.py).
    index: MutableMapping[Any, Any] = field(default_factory=dict)
    gateway_index: MutableMapping[Any, Any] = field(default_factory=dict)
    quota_index: MutableMapping[Any, Any] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    triggers: Triggers = field(init=False)
    reader: IndexReader = field(init=False)
    publisher: StatusPublisher = field(init=False)
    leader: LeadershipWatch = field(init=False)
    passes: PassLoop = field(init=False)
    # Made by start(): the Swarm watch, and the node checks when NPUSWARM_NODE_VALIDATION is on.
    swarm_watch: SwarmWatch | None = field(init=False, default=None)
    node_checks: NodeCheckLoop | None = field(init=False, default=None)
    autoscaler: Autoscaler = field(init=False)
    tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    threads: list[threading.Thread] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.triggers = Triggers(loop=self.loop)
        self.reader = IndexReader(
            self.settings.tenant_policy(),
            self.leadership.namespaces,
            self.index,
            self.gateway_index,
            self.quota_index,
        )
        self.publisher = StatusPublisher(self.kube)
        self.leader = LeadershipWatch(self.leadership, self.kube, self.settings, self.triggers)
        swarm = self.reconciler.swarm
        if isinstance(swarm, Swarm):
            # Every write passes the leadership lease just before it is sent.
            swarm.fence = lambda: self.leader.leader
        lister = None if self.kube is None else partial(self.kube.listed, operation="index_list")
        self.passes = PassLoop(
            self.settings,
            self.reconciler,
            self.triggers,
            self.reader,
            self.publisher,
            self.leader,
            IndexGate(lister, self.kube.quota_namespaces if self.kube is not None else None),
        )
        gateways = self.reconciler.gateways
        if gateways is not None and gateways.pusher is not None:
            # Pushes are writes too; and a push that ends a hold (gateway/push.py) asks for
            # the pass that makes the held writes.
            gateways.pusher.fence = lambda: self.leader.leader
            gateways.pusher.on_settled = self.triggers.request_threadsafe
        swarm = self.reconciler.swarm
        self.autoscaler = Autoscaler(
            gateways.read_load if gateways is not None else None,
            self.triggers.request_threadsafe,
            # Scale from zero: a held request wakes its model at once (a long poll), and the
            # woken replica's own task is watched until it runs.
            wait_held=gateways.wait_for_held if gateways is not None else None,
            task_states=swarm.task_states_of if isinstance(swarm, Swarm) else None,
        )
        self.passes.autoscaler = self.autoscaler

    # -- what kopf's handlers call --------------------------------------------------------

    def request(self, key: str | None = None) -> None:
        """Ask for a pass (in the event loop's thread); ``key``: the deployment that wants it."""
        self.triggers.request(key)

    def request_threadsafe(self, key: str | None = None) -> None:
        self.triggers.request_threadsafe(key)

    def changed(self, key: str, metadata: Mapping[str, Any]) -> bool:
        """Whether kopf's event for ``key`` shows a new object, generation or deletion."""
        return self.reader.changed(key, metadata)

    def deleted(self, key: str) -> None:
        """A deployment's finalizer ran (from any thread): forget it in the event loop."""
        assert self.triggers.loop is not None
        self.triggers.loop.call_soon_threadsafe(self.forget, key)

    def forget(self, key: str) -> None:
        self.publisher.forget(key)
        self.reader.forget(key)

    @property
    def swarm_reachable(self) -> bool | None:
        """The last ping's answer, without waiting on Docker (kopf's liveness probe)."""
        reachable: bool | None = getattr(self.reconciler.swarm, "reachable", None)
        return reachable

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        """The background threads, then the pass loop (in the running event loop)."""
        self.start_threads()
        self.tasks.append(asyncio.create_task(self.passes.run(), name="npuswarm passes"))

    def start_threads(self) -> None:
        loops: list[tuple[str, Callable[[], None]]] = []
        swarm = self.reconciler.swarm
        if isinstance(swarm, Swarm):
            self.swarm_watch = SwarmWatch(swarm, self.settings, self.triggers, self.leader)
            self.passes.swarm_watch = self.swarm_watch
            loops += [
                ("events", self.swarm_watch.follow_events),
                ("task-poll", self.swarm_watch.poll_tasks),
                ("swarm-probe", self.swarm_watch.ping),
            ]
        loops.append(("leadership", self.leader.run))
        scaler, stop = self.autoscaler, self.triggers.stop
        interval, wake = self.settings.autoscaler_seconds, self.settings.autoscaler_wake_seconds
        loops.append(
            ("autoscaler", lambda: scaler.run(stop, interval, lambda: self.leader.leader, wake))
        )
        if self.settings.node_validation and isinstance(swarm, Swarm):
            root = self.settings.root_key.get_secret_value()
            credentials = Credentials(root, self.settings.instance) if root else None
            checker = NodeChecker(
                swarm, self.settings, lambda: self.reconciler.last_plan, credentials
            )
            publish_verdicts(checker)
            self.node_checks = NodeCheckLoop(checker, self.settings, self.triggers, self.leader)
            self.passes.node_checks = self.node_checks
            loops.append(("node-check", self.node_checks.run))
        for name, target in loops:
            thread = threading.Thread(target=survive(name, target, self.triggers.stop), name=name)
            thread.daemon = True
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        """Every loop ends at its next wait; the event stream's thread at once."""
        self.triggers.stop.set()
        if self.swarm_watch is not None:
            self.swarm_watch.close()

    async def close(self) -> None:
        """Stop, wait for the pass loop, close the agent reader and the clients."""
        self.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.publisher.close()
        if self.node_checks is not None:
            await asyncio.to_thread(self.node_checks.checker.close)
        await asyncio.to_thread(self.reconciler.close)
