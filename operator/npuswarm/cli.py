"""The `npuswarm` command: run the operator, or look at placement without writing anything."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from npuswarm import __version__, logs
from npuswarm.api import crd, meta
from npuswarm.api import deployment as deployment_api
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.meta import validation_message
from npuswarm.core import hostpolicy
from npuswarm.core.clock import utcnow
from npuswarm.core.hostfiles import PathCheck
from npuswarm.core.nodes import NodeInfo
from npuswarm.core.npus import device_name, format_npu_ids
from npuswarm.core.pipeline import plan_pass
from npuswarm.core.snapshot import SwarmSnapshot
from npuswarm.gateway.credentials import Credentials
from npuswarm.nodehealth import agent as node_agent
from npuswarm.nodehealth.checks import Verdict
from npuswarm.nodehealth.npusmi import NodeHealth
from npuswarm.nodehealth.runner import NodeChecker
from npuswarm.settings import Settings
from npuswarm.stackfiles.compose import StackFileError, parse_compose
from npuswarm.stackfiles.exporter import export_stack, planned_services
from npuswarm.stackfiles.importer import import_report, import_stack, manifest_yaml, manifests_yaml
from npuswarm.swarm import Swarm, SwarmUnavailable

CRD_PATH = Path("crds") / f"{deployment_api.PLURAL}.{meta.GROUP}.yaml"
_DNS_LABEL = re.compile(deployment_api.DNS_LABEL_PATTERN)


class UsageError(Exception):
    """Bad input from the command line or a file: printed, exit code 2."""


def load_deployments(paths: Sequence[str]) -> list[ModelDeployment]:
    """Every ModelDeployment document in the files, validated; other kinds are an error."""
    found: list[ModelDeployment] = []
    for path in paths:
        try:
            documents = list(yaml.safe_load_all(Path(path).read_text()))
        except (OSError, yaml.YAMLError) as error:
            raise UsageError(f"{path}: {error}") from error
        for number, document in enumerate(d for d in documents if d is not None):
            where = f"{path} (document {number + 1})"
            if not isinstance(document, dict) or document.get("kind") != deployment_api.KIND:
                raise UsageError(f"{where}: not a {deployment_api.KIND}")
            try:
                found.append(ModelDeployment.model_validate(document))
            except ValidationError as error:
                raise UsageError(f"{where}: {validation_message(error)}") from error
    if not found:
        raise UsageError("no ModelDeployment found in the given files")
    return found


def cmd_plan(args: argparse.Namespace) -> int:
    deployments = load_deployments(args.file)
    settings = Settings.from_env()
    # The operator would refuse these with a PolicyViolation condition: say so before any
    # Swarm call, with the same messages.
    refused = [
        f"{md.key}: {v}"
        for md in deployments
        for v in hostpolicy.violations(md, settings.tenant_policy())
    ]
    if refused:
        raise UsageError(f"{hostpolicy.REASON}: " + "; ".join(refused))
    snapshot = Swarm().observe()
    whole = plan_pass(
        deployments,
        snapshot,
        now=utcnow(),
        lost_node_grace_seconds=settings.lost_node_grace_seconds,
        policy=settings.tenant_policy(),
    )
    if whole.refused:
        refused = [f"{key}: {why}" for key, why in sorted(whole.refused.items())]
        raise UsageError(f"{hostpolicy.REASON}: " + "; ".join(refused))
    placement = whole.placement
    report: list[dict[str, Any]] = []
    for md in deployments:
        plan = whole.plans[md.key]
        requests = plan.requests
        replicas = []
        for request in requests:
            assignment = placement.assignments.get(request.key)
            unplaced = placement.unplaced.get(request.key)
            node = snapshot.node(assignment.node_id) if assignment else None
            replicas.append(
                {
                    "replica": request.slot,
                    "node": node.hostname if node else None,
                    "nodeId": assignment.node_id if assignment else None,
                    "npus": sorted(assignment.npus) if assignment else [],
                    "kept": assignment.kept if assignment else False,
                    "unplaced": f"{unplaced.reason}: {unplaced.message}" if unplaced else None,
                }
            )
        report.append(
            {
                "deployment": md.key,
                "replicas": replicas,
                "actions": [
                    {"action": a.kind, "service": a.service_name, "reason": a.reason}
                    for a in plan.actions
                ],
                "deferred": [
                    {"action": a.kind, "service": a.service_name, "reason": a.reason}
                    for a in plan.deferred
                ],
            }
        )
    if args.output == "json":
        print(json.dumps(report, indent=2))
        return 0
    for item in report:
        print(f"ModelDeployment {item['deployment']}")
        for replica in item["replicas"]:
            if replica["unplaced"]:
                print(f"  replica {replica['replica']}: UNPLACED {replica['unplaced']}")
            else:
                how = "keeps" if replica["kept"] else "gets"
                npus = ", ".join(device_name(i) for i in replica["npus"])
                print(f"  replica {replica['replica']}: {how} node {replica['node']} [{npus}]")
        if not item["actions"] and not item["deferred"]:
            print("  no changes")
        for action in item["actions"]:
            print(f"  {action['action']:<7} {action['service']}  ({action['reason']})")
        for action in item["deferred"]:
            print(f"  later   {action['action']} {action['service']}  ({action['reason']})")
    return 0


def nodes_map(
    snapshot: SwarmSnapshot,
    verdicts: Mapping[str, Verdict] | None = None,
    health: Mapping[str, NodeHealth] | None = None,
    roce_problems: Mapping[str, str] | None = None,
    files: Mapping[str, Mapping[str, PathCheck]] | None = None,
) -> str:
    """One block per node: every davinciN with the replica that holds it; with ``verdicts``
    and ``health`` (``--validate``), what node validation and `npu-smi info` found."""
    holders: dict[tuple[str, int], str] = {}
    for allocation in snapshot.allocations():
        who = (
            f"foreign: {allocation.service}"
            if allocation.foreign
            else f"{allocation.deployment}[{allocation.slot}] {allocation.service}"
        )
        for npu in allocation.npus:
            previous = holders.get((allocation.node_id, npu))
            holders[(allocation.node_id, npu)] = (
                f"{previous} AND {who} (CONFLICT)" if previous else who
            )
    lines = []
    for node in snapshot.nodes:
        lines.append(
            f"{node.hostname} ({node.id[:12]})  {node.state}/{node.availability}  "
            f"topology={node.topology}  npus={format_npu_ids(node.npus) or '-'}"
        )
        lines.extend(f"  ! {problem}" for problem in node.problems)
        if verdicts is not None:
            lines.append(_validation_line(node, verdicts.get(node.id)))
        if node.id in (roce_problems or {}):
            lines.append(f"  ! {(roce_problems or {})[node.id]}: no multi-node group member")
        lines.extend(_files_lines(node.hostname or node.id, (files or {}).get(node.id, {})))
        if not node.npus:
            lines.append("  (no NPUs)")
        for npu in sorted(node.npus):
            holder = "reserved" if npu in node.reserved else holders.get((node.id, npu), "free")
            lines.append(f"  {device_name(npu):<10} {holder}{_health_note(health, node.id, npu)}")
        strays = sorted(
            npu for (node_id, npu) in holders if node_id == node.id and npu not in node.npus
        )
        for npu in strays:
            lines.append(f"  {device_name(npu):<10} {holders[(node.id, npu)]} (NPU not on node)")
    return "\n".join(lines)


def _health_note(health: Mapping[str, NodeHealth] | None, node_id: str, npu: int) -> str:
    reading = (health or {}).get(node_id)
    npu_reading = reading.npus.get(npu) if reading is not None else None
    if npu_reading is None:
        return ""
    note = f"  [{npu_reading.health}, HBM {npu_reading.hbm_used_mb}/{npu_reading.hbm_total_mb} MB"
    if npu_reading.processes:
        note += ", pids " + ",".join(str(p.pid) for p in npu_reading.processes)
    return note + "]"


def _validation_line(node: NodeInfo, verdict: Verdict | None) -> str:
    if verdict is None:
        return "  validation: no answer from the node's agent (not ready, no NPUs, or unreachable)"
    if verdict.ok:
        return f"  validation: passed (NPUs {format_npu_ids(verdict.npus)})"
    return "  ! " + verdict.summary()


@dataclass
class AgentReadout:
    """Every node's agent read once (`npuswarm nodes --validate`), by node id: what its
    container got from the runtime, its last `npu-smi info`, why its RoCE links keep
    multi-node groups away, and what it found at the host paths asked (``--path``)."""

    verdicts: dict[str, Verdict] = field(default_factory=dict)
    health: dict[str, NodeHealth] = field(default_factory=dict)
    roce: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, PathCheck]] = field(default_factory=dict)


def read_agents(swarm: Any, settings: Settings, paths: Sequence[str] = ()) -> AgentReadout:
    """Read every node's agent once, now. Needs the operator's root key to sign."""
    root = settings.root_key.get_secret_value()
    if not root:
        raise UsageError(
            "--validate reads the node agents: set NPUSWARM_ROOT_KEY as the operator has it"
        )
    snapshot = swarm.observe()
    checker = NodeChecker(
        swarm, settings, lambda: None, Credentials(root, settings.instance), manage=False
    )
    asked = tuple(sorted(set(paths)))
    try:
        checker.read_now(snapshot.nodes, {n.id: asked for n in snapshot.nodes} if asked else {})
        return AgentReadout(
            checker.verdicts(),
            checker.readings(),
            dict(checker.unusable(snapshot).roce),
            checker.host_files(),
        )
    finally:
        checker.close()


def cmd_nodes(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    swarm = Swarm(timeout=settings.docker_timeout_seconds, instance=settings.instance)
    verdicts: dict[str, Verdict] | None = None
    readout = AgentReadout()
    if args.path and not args.validate:
        raise UsageError("--path asks the node agents: use it with --validate")
    if args.validate:
        readout = read_agents(swarm, settings, args.path)
        verdicts = readout.verdicts
    health, roce_problems, files = readout.health, readout.roce, readout.files
    snapshot = swarm.observe()
    if args.output == "json":
        data = [
            {
                "id": n.id,
                "hostname": n.hostname,
                "state": n.state,
                "availability": n.availability,
                "topology": n.topology,
                "npus": sorted(n.npus),
                "reserved": sorted(n.reserved),
            }
            | ({"validation": _verdict_json(verdicts.get(n.id))} if verdicts is not None else {})
            | ({"npuHealth": _health_json(health[n.id])} if n.id in health else {})
            | ({"roce": roce_problems[n.id]} if n.id in roce_problems else {})
            | ({"hostPaths": _files_json(files[n.id])} if files.get(n.id) else {})
            for n in snapshot.nodes
        ]
        print(json.dumps(data, indent=2))
    else:
        print(nodes_map(snapshot, verdicts, health, roce_problems, files))
    if verdicts is not None and any(not v.ok for v in verdicts.values()):
        return 1
    return 0


def _files_json(found: Mapping[str, PathCheck]) -> dict[str, Any]:
    return {
        path: {
            k: v
            for k, v in {
                "exists": check.exists,
                "sizeBytes": check.size,
                "files": check.files,
                "truncated": check.truncated,
                "root": check.root,
                "escapes": check.escapes,
                "error": check.error,
            }.items()
            if v or k == "exists"
        }
        for path, check in sorted(found.items())
    }


def _files_lines(hostname: str, found: Mapping[str, PathCheck]) -> list[str]:
    """What the node's agent found at each host path asked (core/hostfiles.py)."""
    lines = []
    for path, check in sorted(found.items()):
        if problem := check.problem(path, hostname):
            lines.append(f"  ! {problem}")
        else:
            more = "+" if check.truncated else ""
            lines.append(
                f"  files: {path}  {check.files}{more} files, {check.size / 2**30:.1f}{more} GiB"
            )
    return lines


def _verdict_json(verdict: Verdict | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {
        "ok": verdict.ok,
        "npus": sorted(verdict.npus),
        "checks": {c.name: {"ok": c.ok, "message": c.message} for c in verdict.checks},
    }


def _health_json(reading: NodeHealth) -> dict[str, Any]:
    if reading.error:
        return {"error": reading.error}
    return {
        str(npu): {
            "health": r.health,
            "hbmUsedMB": r.hbm_used_mb,
            "hbmTotalMB": r.hbm_total_mb,
            "processes": [
                {"pid": p.pid, "name": p.name, "memoryMB": p.memory_mb} for p in r.processes
            ],
        }
        for npu, r in sorted(reading.npus.items())
    }


def cmd_crd(args: argparse.Namespace) -> int:
    text = crd.render_yaml(args.kind)
    if args.check:
        path = Path(args.check)
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run `npuswarm crd > {path}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


def _print_memory(signum: int, frame: Any) -> None:
    import tracemalloc

    if not tracemalloc.is_tracing():
        print("npuswarm: start with PYTHONTRACEMALLOC=1 to see allocations", file=sys.stderr)
        return
    current, peak = tracemalloc.get_traced_memory()
    print(f"npuswarm: traced {current >> 20} MiB, peak {peak >> 20} MiB", file=sys.stderr)
    for stat in tracemalloc.take_snapshot().statistics("lineno")[:25]:
        print(f"  {stat}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    import kopf

    import npuswarm.handlers  # registers the handlers with kopf

    # A bad setting stops here with one line, before kopf logs in or starts anything.
    Settings.from_env()
    # `kill -USR1 <pid>` prints every thread's stack: what a stuck operator is waiting on;
    # `kill -USR2 <pid>` the biggest allocation sites, when started with PYTHONTRACEMALLOC=1.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGUSR2, _print_memory)
    if args.namespace:
        # The pass judges orphans and leadership only in the namespaces kopf watches.
        os.environ[npuswarm.handlers.NAMESPACES_ENV] = ",".join(args.namespace)
    kopf.configure(verbose=args.verbose)
    logs.configure(level=logging.DEBUG if args.verbose else logging.INFO, fmt=args.log_format)
    if args.peering_name and not args.standalone:
        from npuswarm.peering import PeeringUnavailableError, ensure_peering_object

        try:
            if ensure_peering_object(args.peering_name):
                logging.getLogger(__name__).info("created peering object %s", args.peering_name)
        except PeeringUnavailableError as error:
            print(f"npuswarm: peering: {error}", file=sys.stderr)
            return 1
    kopf.run(
        standalone=args.standalone,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
        priority=args.priority,
        # kopf types this as its own NewType of str, which it does not export.
        identity=npuswarm.handlers.IDENTITY,  # type: ignore[arg-type]
        # kopf makes peering mandatory whenever a name is given, even with standalone.
        peering_name=None if args.standalone else args.peering_name,
    )
    return 0


# --- import-stack and export-stack ---------------------------------------------------------


def add_stack_commands(sub: Any) -> None:
    """Register import-stack and export-stack on the `npuswarm` subparsers."""
    importer = sub.add_parser(
        "import-stack", help="convert a docker stack file into ModelDeployment manifests"
    )
    importer.add_argument("file", help="compose v3 stack file (- for stdin)")
    importer.add_argument("-n", "--namespace", help="metadata.namespace of the manifests")
    importer.add_argument("-o", "--output-dir", metavar="DIR", help="one file per model in DIR")
    importer.add_argument("--overwrite", action="store_true", help="replace files in DIR")
    importer.add_argument(
        "--pin-npus",
        action="store_true",
        help="keep the stack's NPU ids as spec.npuIds instead of letting npuswarm choose",
    )
    importer.set_defaults(func=cmd_import_stack)

    exporter = sub.add_parser(
        "export-stack", help="print the services npuswarm would create as a compose file"
    )
    exporter.add_argument(
        "-f", "--file", action="append", required=True, help="ModelDeployment YAML"
    )
    exporter.set_defaults(func=cmd_export_stack)


def cmd_import_stack(args: argparse.Namespace) -> int:
    try:
        _import_command(args, sys.stdout.write, sys.stderr.write)
    except StackFileError as error:
        print(f"npuswarm import-stack: {error}", file=sys.stderr)
        return 2
    return 0


def _import_command(
    args: argparse.Namespace, out: Callable[[str], Any], err: Callable[[str], Any]
) -> None:
    if args.namespace is not None and not _DNS_LABEL.match(args.namespace):
        raise StackFileError(f"--namespace {args.namespace!r} is not a DNS label")
    path = args.file
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as error:
        raise StackFileError(f"{path}: {error.strerror or error}") from None
    base_dir = os.getcwd() if path == "-" else str(Path(path).resolve().parent)
    result = import_stack(
        parse_compose(text, path),
        source=Path(path).name if path != "-" else "stdin",
        base_dir=base_dir,
        namespace=args.namespace,
        pin_npus=args.pin_npus,
    )
    err(import_report(result))
    if args.output_dir is None:
        out(manifests_yaml(result))
        return
    files = {f"{s.name}.yaml": manifest_yaml(s) for s in result.services}
    written = write_files(Path(args.output_dir), files, overwrite=args.overwrite)
    err("".join(f"wrote {p}\n" for p in written))


def write_files(directory: Path, files: Mapping[str, str], *, overwrite: bool) -> list[Path]:
    """All files or none: everything goes to temp files first, then each is renamed in place."""
    targets = [directory / name for name in files]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise StackFileError(f"{', '.join(existing)} exist: pass --overwrite or choose another -o")
    # Checked before writing: a rename that fails half-way would leave part of the output.
    blocked = [str(t) for t in targets if t.exists() and not t.is_file()]
    if blocked:
        raise StackFileError(f"{', '.join(blocked)}: not a regular file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StackFileError(f"{directory}: {error.strerror or error}") from None
    temps: list[tuple[str, Path]] = []
    try:
        for target, text in zip(targets, files.values(), strict=True):
            handle, temp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
            temps.append((temp, target))
            with os.fdopen(handle, "w") as stream:
                stream.write(text)
        for temp, target in temps:
            os.replace(temp, target)
    except OSError as error:
        for temp, _ in temps:
            Path(temp).unlink(missing_ok=True)
        raise StackFileError(f"{directory}: {error.strerror or error}") from None
    return targets


def cmd_export_stack(args: argparse.Namespace) -> int:
    deployments = load_deployments(args.file)
    grace = Settings.from_env().lost_node_grace_seconds
    rendered, unplaced = planned_services(deployments, Swarm().observe(), utcnow(), grace)
    sys.stdout.write(export_stack(deployments, rendered, unplaced))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npuswarm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"npuswarm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator (kopf)")
    run.add_argument("-n", "--namespace", action="append", help="watch only these namespaces")
    run.add_argument("--standalone", action="store_true", help="no peering (single instance)")
    run.add_argument("--liveness", default="http://0.0.0.0:8080/healthz")
    run.add_argument("--priority", type=int, default=100, help="kopf peering priority")
    run.add_argument(
        "--peering-name",
        help="kopf peering object, created if missing; makes peering mandatory "
        "(default: auto, standalone if absent)",
    )
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="show placement and the Swarm diff; writes nothing")
    plan.add_argument("-f", "--file", action="append", required=True, help="ModelDeployment YAML")
    plan.add_argument("-o", "--output", choices=["text", "json"], default="text")
    plan.set_defaults(func=cmd_plan)

    nodes = sub.add_parser("nodes", help="map of every node's NPUs and who holds them")
    nodes.add_argument("-o", "--output", choices=["text", "json"], default="text")
    nodes.add_argument(
        "--validate",
        action="store_true",
        help="read every node's agent now and show its verdict (exit 1 if one fails)",
    )
    nodes.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="HOST_PATH",
        help="with --validate: ask every agent about this host path (exists, size, and whether "
        "its symbolic links lead out of its allowed root); repeatable",
    )
    nodes.set_defaults(func=cmd_nodes)

    agent = sub.add_parser(
        "agent", help="run the node agent (in the agent service npuswarm creates on each node)"
    )
    node_agent.add_arguments(agent)
    agent.set_defaults(func=node_agent.run)

    crd_cmd = sub.add_parser("crd", help="print the CRD generated from the API models")
    crd_cmd.add_argument("--check", metavar="PATH", help="fail if PATH differs from the output")
    crd_cmd.add_argument(
        "--kind", choices=sorted(crd.CRD_FILES), default="ModelDeployment", help="which CRD"
    )
    crd_cmd.set_defaults(func=cmd_crd)

    add_stack_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as error:
        print(f"npuswarm: {error}", file=sys.stderr)
        return 2
    except SwarmUnavailable as error:
        print(f"npuswarm: cannot reach the Swarm manager: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
