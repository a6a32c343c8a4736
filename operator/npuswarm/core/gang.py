"""Gang placement: the nodes of one multi-node replica (a data-parallel group), all or none.

Pure. placement.place calls choose() once per group that lacks members, with the free NPUs
every earlier claim of the pass left; it commits the answer only when every member has a
node, so a group never holds NPUs while it waits for the rest. Members go on distinct nodes,
each a whole NPU set under its node's topology rule; nodes the node checks block, drained or
down nodes, and nodes whose RoCE links are down get none. ``topology_key`` (the spec's
groupTopologyKey) is a preference: members go on nodes sharing that label's value when enough
of them have room, and the answer says when they could not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from npuswarm.core import topology
from npuswarm.core.nodes import NodeInfo

# Nodes named in a message about a group that cannot be placed; the rest are counted.
MAX_NAMED = 3

# Host ports of groups: a group on the host network binds its API port and the data-parallel
# RPC port on its leader's node, and HCCL's 16 host ports (HCCL_IF_BASE_PORT..+15) on every
# member's node. Each group takes one block of PORT_BLOCK_SIZE ports, the same block on all
# its nodes (the RPC port must be the same value everywhere), so no two groups sharing a node
# share a port. Blocks start at GROUP_PORT_BASE, well apart from vLLM's and HCCL's defaults
# (8000, 29500, 29550, 60000-60015), so a single-node replica on its defaults never meets one.
GROUP_PORT_BASE = 30000
PORT_BLOCK_SIZE = 32
PORT_BLOCKS = 64
HCCL_PORTS = 16


@dataclass(frozen=True)
class PortRange:
    """The host ports groups take blocks from (NPUSWARM_GROUP_PORT_RANGE): ``blocks`` blocks
    of PORT_BLOCK_SIZE from ``first``. A service records its block's index, so changing the
    range moves (and restarts) every group."""

    first: int = GROUP_PORT_BASE
    blocks: int = PORT_BLOCKS

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """``first-last``, both inclusive, holding at least one block."""
        low, dash, high = text.strip().partition("-")
        if not (dash and low.isdigit() and high.isdigit()):
            raise ValueError(f"{text!r} is not first-last (e.g. 30000-32047)")
        first, last = int(low), int(high)
        if not 1024 <= first <= last <= 65535:
            raise ValueError(f"{text!r}: ports must be within 1024-65535, first <= last")
        blocks = (last - first + 1) // PORT_BLOCK_SIZE
        if blocks < 1:
            raise ValueError(f"{text!r} holds no block of {PORT_BLOCK_SIZE} ports")
        return cls(first, blocks)

    @property
    def last(self) -> int:
        return self.first + self.blocks * PORT_BLOCK_SIZE - 1


@dataclass(frozen=True)
class GroupPorts:
    block: int
    api: int
    rpc: int
    hccl_base: int

    @classmethod
    def of_block(cls, block: int, ports: PortRange = PortRange()) -> GroupPorts:
        first = ports.first + block * PORT_BLOCK_SIZE
        return cls(
            block=block, api=first, rpc=first + 1, hccl_base=first + PORT_BLOCK_SIZE - HCCL_PORTS
        )


def free_block(
    taken: Mapping[str, Set[int]], node_ids: Sequence[str], ports: PortRange = PortRange()
) -> int | None:
    """The lowest port block no other group uses on any of these nodes."""
    for block in range(ports.blocks):
        if all(block not in taken.get(node_id, ()) for node_id in node_ids):
            return block
    return None


@dataclass(frozen=True)
class Seat:
    node: NodeInfo
    npus: frozenset[int]


@dataclass(frozen=True)
class GangChoice:
    seats: tuple[Seat, ...]  # one per missing member, in the order asked
    # Why groupTopologyKey could not be honoured ("" when it was, or none was asked).
    preference_unmet: str = ""


@dataclass(frozen=True)
class GangShortfall:
    message: str  # which nodes came closest and what each lacked


@dataclass(frozen=True)
class GangAsk:
    """What the missing members of one group need."""

    members: int  # the group's size (for the message)
    missing: int  # members without a node
    npus: int  # NPUs on each node
    npu_ids: frozenset[int] | None = None  # spec.npuIds: these NPUs on every member
    topology_key: str | None = None
    # The topology_key value of the nodes kept members run on: the new ones join them there.
    domain: str | None = None
    avoid: frozenset[str] = frozenset()  # nodes a failing group should not go back to


def choose(
    ask: GangAsk,
    candidates: Sequence[NodeInfo],
    free: Mapping[str, Set[int]],
    excluded: Mapping[str, str],
) -> GangChoice | GangShortfall:
    """Nodes for the missing members of one group, or why there are not enough.

    ``candidates``: nodes matching the selector, by hostname; ``free``: each node's NPUs
    nobody claims; ``excluded``: nodes that may not take a member of this group (-> why: a
    member already runs there, another group of the deployment holds the pinned NPUs).
    """
    fits: list[tuple[int, NodeInfo, frozenset[int]]] = []
    lacks: list[tuple[tuple[int, int], str]] = []
    for node in candidates:
        npus, why = _seat(ask, node, free.get(node.id, frozenset()), excluded)
        if npus is not None:
            fits.append((len(free[node.id]) - ask.npus, node, npus))
        else:
            # Closest first: nodes that take replicas and have the most free NPUs.
            closeness = (0 if node.accepts_new_replicas else 1, -len(free.get(node.id, ())))
            lacks.append((closeness, why))
    fits.sort(key=lambda fit: (fit[0], fit[1].hostname, fit[1].id))
    if len(fits) < ask.missing:
        return GangShortfall(_shortfall(ask, fits, lacks))
    preferred = [fit for fit in fits if fit[1].id not in ask.avoid]
    pool = preferred if len(preferred) >= ask.missing else fits
    if ask.topology_key is None:
        return GangChoice(_seats(pool[: ask.missing]))
    return _within_domain(ask, pool)


def _seat(
    ask: GangAsk, node: NodeInfo, free: Set[int], excluded: Mapping[str, str]
) -> tuple[frozenset[int] | None, str]:
    """The NPUs this node would give a member, or what it lacks."""
    name = node.hostname or node.id
    if node.id in excluded:
        return None, f"{name}: {excluded[node.id]}"
    if node.blocked:
        return None, node.blocked
    if not node.accepts_new_replicas:
        return None, f"{name} is {node.state}/{node.availability}"
    if node.roce_problem:
        return None, f"{name}: RoCE links down ({node.roce_problem})"
    if ask.npu_ids is not None:
        if not ask.npu_ids <= free:
            return None, f"{name}: pinned NPUs {sorted(ask.npu_ids - free)} are not free"
        if not topology.is_valid_set(ask.npu_ids, node.topology):
            return None, f"{name}: pinned NPUs break the node's {node.topology} rule"
        return ask.npu_ids, ""
    if len(free) < ask.npus:
        return None, f"{name}: {len(free)} of {ask.npus} NPUs free"
    chosen = topology.choose(frozenset(free), ask.npus, node.topology)
    if chosen is None:
        return None, f"{name}: {len(free)} NPUs free, not {ask.npus} under its {node.topology} rule"
    return chosen, ""


def _within_domain(ask: GangAsk, pool: list[tuple[int, NodeInfo, frozenset[int]]]) -> GangChoice:
    """The best-fitting label value with room for every missing member; else best fit over
    all nodes, saying so."""
    key = ask.topology_key or ""
    by_value: dict[str, list[tuple[int, NodeInfo, frozenset[int]]]] = {}
    for fit in pool:
        value = fit[1].labels.get(key)
        if value is not None:
            by_value.setdefault(value, []).append(fit)
    if ask.domain is not None:
        joined = by_value.get(ask.domain, [])
        if len(joined) >= ask.missing:
            return GangChoice(_seats(joined[: ask.missing]))
    else:
        roomy = [
            (sum(fit[0] for fit in fits[: ask.missing]), value, fits)
            for value, fits in by_value.items()
            if len(fits) >= ask.missing
        ]
        if roomy:
            _, _, fits = min(roomy, key=lambda item: (item[0], item[1]))
            return GangChoice(_seats(fits[: ask.missing]))
    chosen = pool[: ask.missing]
    where = f"{key}={ask.domain}" if ask.domain is not None else f"one value of {key}"
    return GangChoice(
        _seats(chosen),
        preference_unmet=f"groupTopologyKey not met: no {ask.missing} node(s) with room under "
        f"{where}; placed on " + ", ".join(f"{fit[1].hostname}" for fit in chosen),
    )


def _seats(fits: list[tuple[int, NodeInfo, frozenset[int]]]) -> tuple[Seat, ...]:
    return tuple(Seat(node, npus) for _, node, npus in fits)


def _shortfall(
    ask: GangAsk,
    fits: list[tuple[int, NodeInfo, frozenset[int]]],
    lacks: list[tuple[tuple[int, int], str]],
) -> str:
    need = f"{ask.npus} free NPUs" if ask.npu_ids is None else f"NPUs {sorted(ask.npu_ids)} free"
    text = f"needs {ask.missing} of {ask.members} node(s) with {need} each; {len(fits)} fit"
    if fits:
        text += " (" + ", ".join(fit[1].hostname for fit in fits[:MAX_NAMED]) + ")"
    lacks.sort(key=lambda item: item[0])
    if lacks:
        text += "; closest: " + "; ".join(why for _, why in lacks[:MAX_NAMED])
        if len(lacks) > MAX_NAMED:
            text += f"; and {len(lacks) - MAX_NAMED} more node(s)"
    return text
