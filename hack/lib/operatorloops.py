"""The operator's loops in one process, for lab tests and benchmarks that drive a Reconciler
themselves (tests/lab/test_scale_to_zero.py, bench/demand.py): the built-in autoscaler's own
loop (``Autoscaler.run``: rounds every ``interval``, and between them the gateways serving a model
at zero, long-polled, and the task of a replica woken from zero) in its thread, and passes at once when the autoscaler asks for one, else
every second (the task poll's pace while work is under way). ``check`` runs after every pass
(an invariant checker) and what it returns is kept in ``violations``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.gateway import ModelGateway
from npuswarm.core.kube_events import Event
from npuswarm.core.pipeline import Desired
from npuswarm.gateway.push import Gateways
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.runtime.autoscaler import Autoscaler


class OperatorLoops:
    def __init__(
        self,
        reconciler: Reconciler,
        deployments: list[ModelDeployment],
        gateway: ModelGateway,
        gateways: Gateways,
        check: Callable[[], list[str]] | None = None,
        interval: float = 5.0,
        wake: float = 1.0,
    ) -> None:
        self.reconciler, self.deployments, self.gateway = reconciler, deployments, gateway
        self.check_pass = check
        self.interval, self.wake = interval, wake
        self.wanted = threading.Event()
        self.stop = threading.Event()
        swarm = reconciler.swarm
        self.scaler = Autoscaler(
            gateways.read_load,
            lambda key: self.wanted.set(),
            wait_held=gateways.wait_for_held,
            task_states=getattr(swarm, "task_states_of", None),
        )
        self.previous: dict[str, dict[str, Any]] = {}
        self.last: PassResult | None = None
        self.events: list[tuple[float, Event]] = []  # (time.monotonic(), Event)
        self.reasons: dict[str, list[str]] = {}  # each autoscaler reason after each pass
        self.replicas: list[tuple[float, str, int]] = []  # (when, key, status.replicas)
        self.violations: list[str] = []
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._guard, args=(self._passes,), daemon=True),
            threading.Thread(target=self._guard, args=(self._autoscale,), daemon=True),
        ]

    def __enter__(self) -> OperatorLoops:
        self.run_pass()  # the autoscaler decides from what a pass saw
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.wanted.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _guard(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as error:  # the caller looks at self.errors
            self.errors.append(error)

    def _autoscale(self) -> None:
        self.scaler.run(self.stop, self.interval, lambda: True, self.wake)

    def _passes(self) -> None:
        while not self.stop.is_set():
            self.wanted.wait(1.0)
            self.wanted.clear()
            if not self.stop.is_set():
                self.run_pass()

    def run_pass(self) -> PassResult:
        desired = self.scaler.serve(
            Desired(
                deployments=list(self.deployments),
                gateways=[self.gateway],
                previous=self.previous,
            )
        )
        result = self.reconciler.run_pass(desired)
        self.scaler.saw_pass(result.plan)
        self.previous = {k: v.status.model_dump(mode="json") for k, v in result.views.items()}
        now = time.monotonic()
        self.events += [(now, e) for view in result.views.values() for e in view.events]
        for key, view in result.views.items():
            self.replicas.append((now, key, view.status.replicas))
            if view.status.autoscaler is not None:
                self.reasons.setdefault(key, []).append(view.status.autoscaler.reason)
        if self.check_pass is not None:
            self.violations += self.check_pass()
        self.last = result
        return result

    @property
    def url(self) -> str:
        """The gateway's first endpoint, as clients call it."""
        assert self.last is not None
        endpoint = self.last.gateways[self.gateway.key].endpoint
        assert endpoint
        return "http://" + endpoint.split(", ")[0]
