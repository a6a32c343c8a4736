#!/usr/bin/env python3
"""The built-in autoscaler against a recorded demand curve, on the real lab: python bench/demand.py

Brings up the Swarm lab (hack/lib/swarmlab.py: 3 dockerds, 8 fake NPUs each), loads the
gateway image (hack/build-gateway-image) into it, and runs npuswarm's loops in this process
as the operator runs them (hack/lib/operatorloops.py: the autoscaler's own loop, passes when
it asks and every second) against the lab's manager: one ModelGateway and one autoscaled
fake vLLM deployment (each replica runs 2 requests at once, 0.5 s each: 4 requests/s; the
autoscaler holds 2 waiting requests per replica; windows 10 s up, 30 s down; 1-4 replicas).

Clients then replay the curve (bench/curves/*.json: [seconds, clients] steps; each client
sends one chat request after another, 60 s timeout) through the gateway. Reported:

  reaction   for each scale decision, the time since the demand step it answers, and the
             time until the gateway held the decided number of backends (the new replicas
             serve, or the removed ones left)
  failures   requests that did not get a 200, per step (0 expected)
  latency    p50 and p99 per step

Not a test and not in CI (about 8 minutes; root for the lab). Results go to
bench/results/demand-<checkout>-<time>.json; ``--report`` rewrites the demand block of
docs/autoscaling.md and bench/README.md; ``--from-results`` only rewrites them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack" / "lib"))

import swarmlab  # noqa: E402
from fleet import RESULTS, checkout, machine, replace_block  # noqa: E402
from npuswarm.api.deployment import ModelDeployment  # noqa: E402
from npuswarm.api.gateway import ModelGateway  # noqa: E402
from npuswarm.gateway.credentials import Credentials  # noqa: E402
from npuswarm.gateway.push import Gateways  # noqa: E402
from npuswarm.reconcile import Reconciler  # noqa: E402
from npuswarm.settings import Settings  # noqa: E402
from npuswarm.swarm import Swarm  # noqa: E402
from operatorloops import OperatorLoops  # noqa: E402

ROOT_KEY = "bench-demand-root-key-0123456789"
NETWORK = "npuswarm-demand-net"
MODEL = "curve-chat"
KEY = "bench/curve"
PORT, ADMIN_PORT = 18200, 18201
UP_WINDOW, DOWN_WINDOW = 10, 30
BLOCK = "bench/demand.py"


def deployment() -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "metadata": {
                "name": "curve",
                "namespace": "bench",
                "uid": "uid-curve",
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {
                "image": swarmlab.IMAGE,
                "model": "/models/curve",
                "servedModelName": MODEL,
                "network": {"name": NETWORK},
                "healthCheck": {
                    "startPeriodSeconds": 20,
                    "intervalSeconds": 1,
                    "timeoutSeconds": 2,
                },
                "restartPolicy": {"delaySeconds": 1},
                "engine": {
                    "port": 8000,
                    "env": {"FAKE_VLLM_MAX_RUNNING": "2", "FAKE_VLLM_LATENCY_SECONDS": "0.5"},
                },
                "autoscaling": {
                    "minReplicas": 1,
                    "maxReplicas": 4,
                    "target": {"metric": "requestsWaitingPerReplica", "value": 2},
                    "scaleUpStabilizationSeconds": UP_WINDOW,
                    "scaleDownStabilizationSeconds": DOWN_WINDOW,
                },
            },
        }
    )


def gateway(image: str) -> ModelGateway:
    return ModelGateway.model_validate(
        {
            "metadata": {
                "name": "gw",
                "namespace": "bench",
                "uid": "uid-bench-gw",
                "generation": 1,
            },
            "spec": {
                "image": image,
                "port": PORT,
                "adminPort": ADMIN_PORT,
                "replicas": 1,
                "policy": "round_robin",
                "network": {"name": NETWORK},
                "healthCheck": {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 1},
            },
        }
    )


def gateway_image(lab: swarmlab.Lab) -> str:
    built = subprocess.run(
        [str(REPO / "hack" / "build-gateway-image"), "--save"],
        capture_output=True,
        text=True,
        check=True,
    )
    tarball = Path(built.stdout.strip())
    tag = "npuswarm-gateway:" + tarball.stem.rsplit("-", 1)[1]
    for node in lab.nodes:
        client = swarmlab.docker_client(node.endpoint, timeout=300)
        if not client.images.list(name=tag):
            with tarball.open("rb") as data:
                client.images.load(data)
    return tag


class Clients:
    """Closed-loop clients: ``resize(n)`` keeps n of them sending."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replies: list[tuple[float, float, int]] = []  # (started, seconds, status)
        self.stops: list[threading.Event] = []
        self.threads: list[threading.Thread] = []

    def resize(self, count: int) -> None:
        while len(self.stops) > count:
            self.stops.pop().set()
        while len(self.stops) < count:
            stop = threading.Event()
            thread = threading.Thread(target=self._run, args=(stop,), daemon=True)
            self.stops.append(stop)
            self.threads.append(thread)
            thread.start()

    def _run(self, stop: threading.Event) -> None:
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        ).encode()
        while not stop.is_set():
            request = urllib.request.Request(
                f"{self.url}/v1/chat/completions", body, {"Content-Type": "application/json"}
            )
            started = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    answer.read()
                    status = answer.status
            except urllib.error.HTTPError as error:
                status = error.code
            except OSError:
                status = 0
            self.replies.append((started, time.monotonic() - started, status))

    def close(self) -> None:
        self.resize(0)
        for thread in self.threads:
            thread.join(timeout=70)


def backends(loops: OperatorLoops) -> int:
    last = loops.last
    if last is None or "bench/gw" not in last.gateways:
        return 0
    return next((len(m.backends) for m in last.gateways["bench/gw"].models if m.model == MODEL), 0)


def replay(loops: OperatorLoops, curve: dict[str, Any]) -> dict[str, Any]:
    clients = Clients(loops.url)
    steps: list[tuple[float, int]] = [(float(at), int(n)) for at, n in curve["steps"]]
    started = time.monotonic()
    served: list[tuple[float, int]] = []  # (seconds into the run, backends)
    try:
        for at, count in steps:
            while time.monotonic() - started < at:
                served.append((time.monotonic() - started, backends(loops)))
                time.sleep(0.25)  # sampling the gateway's backends while the curve runs
            clients.resize(count)
        while time.monotonic() - started < curve["end"]:
            served.append((time.monotonic() - started, backends(loops)))
            time.sleep(0.25)
    finally:
        clients.close()
    decisions = []
    for when, event in loops.events:
        if event.reason not in ("Autoscaled", "ScaledToZero", "ScaledFromZero"):
            continue
        at = when - started
        step_at, step_count = max((s for s in steps if s[0] <= at), default=steps[0])
        tail = event.message.rsplit("-> ", 1)
        count = int(tail[1].split()[0]) if len(tail) == 2 else None
        reached = next((t for t, b in served if t >= at and b == count), None)
        decisions.append(
            {
                "at": round(at, 1),
                "message": event.message,
                "replicas": count,
                "step_at": step_at,
                "clients": step_count,
                "reaction_seconds": round(at - step_at, 1),
                "serving_seconds": None if reached is None else round(reached - at, 1),
            }
        )
    per_step = []
    bounds = [s[0] for s in steps] + [float(curve["end"])]
    for (at, count), until in zip(steps, bounds[1:], strict=True):
        inside = [r for r in clients.replies if at <= r[0] - started < until]
        seconds = sorted(r[1] for r in inside)
        per_step.append(
            {
                "from": at,
                "to": until,
                "clients": count,
                "requests": len(inside),
                "failed": sum(1 for r in inside if r[2] != 200),
                "p50": round(statistics.median(seconds), 3) if seconds else None,
                "p99": round(seconds[int(0.99 * (len(seconds) - 1))], 3) if seconds else None,
            }
        )
    return {
        "decisions": decisions,
        "steps": per_step,
        "requests": len(clients.replies),
        "failed": sum(1 for r in clients.replies if r[2] != 200),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    curve = json.loads(Path(args.curve).read_text())
    with swarmlab.lab_session(nodes=3, npus=8, name=args.lab) as lab:
        image = gateway_image(lab)
        api = lab.client(1).api
        if not api.networks(names=[NETWORK]):
            api.create_network(NETWORK, driver="overlay", attachable=True)
        settings = Settings(shared_networks=f"{NETWORK}=*", gateway_root_key=ROOT_KEY)
        gateways = Gateways(
            settings.instance,
            Credentials(ROOT_KEY, settings.instance),
            policy=settings.tenant_policy(),
        )
        reconciler = Reconciler(Swarm(base_url=lab.endpoint), settings, gateways=gateways)
        md, gw = deployment(), gateway(image)
        loops = OperatorLoops(reconciler, [md], gw, gateways)
        try:
            with loops:
                deadline = time.monotonic() + 300
                while not (
                    backends(loops) == 1
                    and loops.last
                    and loops.last.gateways["bench/gw"].readyReplicas == 1
                ):
                    if loops.errors or time.monotonic() > deadline:
                        raise SystemExit(
                            f"the gateway and a replica never got ready: {loops.errors}"
                        )
                    time.sleep(0.5)  # polling the loops' last pass
                result = replay(loops, curve)
                if loops.errors:
                    raise SystemExit(f"the operator's loops failed: {loops.errors}")
        finally:
            reconciler.finalize("bench", "curve", "uid-curve")
            reconciler.finalize_gateway("bench", "gw")
            reconciler.close()
    return {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "checkout": checkout(),
        "machine": machine(),
        "curve": args.curve,
        "windows": {"up": UP_WINDOW, "down": DOWN_WINDOW},
        **result,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"Run {result['when']} on checkout {result['checkout']} "
        f"({result['machine'].get('cpus')} cores): curve `{Path(result['curve']).name}`, windows "
        f"{result['windows']['up']} s up / {result['windows']['down']} s down, 1-4 replicas of "
        f"4 requests/s each; {result['requests']} requests, **{result['failed']} failed**.",
        "",
        "| decision | at | demand step (clients) | reaction | serving after |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for d in result["decisions"]:
        serving = "not reached" if d["serving_seconds"] is None else f"{d['serving_seconds']} s"
        lines.append(
            f"| {d['message']} | {d['at']} s | {d['step_at']:g} s ({d['clients']}) | "
            f"{d['reaction_seconds']} s | {serving} |"
        )
    lines += [
        "",
        "| step | clients | requests | failed | p50 | p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['from']:g}-{s['to']:g} s | {s['clients']} | {s['requests']} | "
            f"{s['failed']} | {s['p50']} s | {s['p99']} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curve", default=str(REPO / "bench" / "curves" / "chat-day.json"))
    parser.add_argument("--lab", default="npdemand", help="the lab's name (one per session)")
    parser.add_argument(
        "--report",
        action="store_true",
        help="rewrite the demand block of docs/autoscaling.md and bench/README.md",
    )
    parser.add_argument("--from-results", action="store_true", help="report the newest saved run")
    args = parser.parse_args()
    if args.from_results:
        newest = max(RESULTS.glob("demand-*.json"), key=lambda p: p.stat().st_mtime)
        result = json.loads(newest.read_text())
    else:
        result = run(args)
        RESULTS.mkdir(exist_ok=True)
        name = f"demand-{result['checkout']}-{result['when'].replace(':', '')}.json"
        (RESULTS / name).write_text(json.dumps(result, indent=1))
    text = report(result)
    print(text)
    if args.report or args.from_results:
        for page in (REPO / "docs" / "autoscaling.md", REPO / "bench" / "README.md"):
            replace_block(page, BLOCK, text)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
