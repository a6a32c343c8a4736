"""What Kubernetes asks for, read from kopf's in-memory indexes (no API call): every
ModelDeployment parsed once per generation and checked against the host policy, and the
ModelGateways. Also the stamps of kopf's events, so a status write asks for no pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from npuswarm.api import deployment as deployment_api
from npuswarm.api import gateway as gateway_api
from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.meta import Indexed, Stamp, stamp, validation_message, walk_index
from npuswarm.core import hostpolicy
from npuswarm.core.pipeline import Desired
from npuswarm.core.quota import ANNOTATION as QUOTA_ANNOTATION
from npuswarm.core.quota import Quotas
from npuswarm.gateway.backends import parse_gateways


def index_event(
    index: MutableMapping[Any, Any], event_type: str | None, key: Any, value: Any | None
) -> None:
    """One kopf event into an index (key -> store of values, as a kopf index holds them):
    a deletion, or no value, drops the key; anything else sets it.

    The indexes are filled by each resource's own event handler (handlers.py) rather than by
    @kopf.index. For an indexed resource kopf makes a toggle per object during its first LIST
    and, as each object is indexed, wakes every object still waiting for all the others:
    quadratic, 14 s of the event loop at every operator start with 2,000 ModelDeployments
    (bench/fleet.py under py-spy), before a single pass could run. IndexGate still says when
    every listed object is in."""
    if event_type == "DELETED" or value is None:
        index.pop(key, None)
    else:
        index[key] = [value]


@dataclass
class Parsed:
    """The index entry of one ModelDeployment, parsed once per generation."""

    stamp: Stamp
    model: ModelDeployment | None
    problem: str | None
    reason: str = "InvalidSpec"


@dataclass
class IndexReader:
    # What the cluster admin lets tenants ask of a node (core/hostpolicy.py).
    policy: hostpolicy.TenantPolicy
    # The namespaces this operator watches; None: all.
    namespaces: frozenset[str] | None
    # The index of ModelDeployments: (namespace, name) -> store of index values.
    index: MutableMapping[Any, Any] = field(default_factory=dict)
    # The index of ModelGateways.
    gateway_index: MutableMapping[Any, Any] = field(default_factory=dict)
    # The index of Namespaces' NPU quota annotations: name -> store of values.
    quota_index: MutableMapping[Any, Any] = field(default_factory=dict)
    # The quota annotation each namespace was last seen with (a change asks for a pass).
    quota_seen: dict[str, str | None] = field(default_factory=dict)
    parsed: dict[str, Parsed] = field(default_factory=dict)
    # The stamp each object was last seen with in kopf's events (gateways: gateway_key).
    seen: dict[str, Stamp] = field(default_factory=dict)

    def desired(
        self, written: Mapping[str, dict[str, Any]], gateways_written: Mapping[str, dict[str, Any]]
    ) -> Desired:
        """Every ModelDeployment the index holds, parsed once per generation; ``written``:
        the statuses this operator wrote last (they count before the index catches up)."""
        deployments: list[ModelDeployment] = []
        invalid: dict[str, tuple[int, str, str]] = {}
        deleting: set[str] = set()
        previous: dict[str, dict[str, Any]] = {}
        seen: set[str] = set()
        for entry in walk_index(self.index, written):
            key, metadata = entry.key, entry.metadata
            seen.add(key)
            previous[key] = entry.previous
            parsed = self._parse(entry)
            if metadata.get("deletionTimestamp"):
                deleting.add(key)
            elif parsed.model is None:
                invalid[key] = (parsed.stamp[1], parsed.reason, parsed.problem or "")
            else:
                deployments.append(parsed.model)
        for gone in set(self.parsed) - seen:
            del self.parsed[gone]
        gateways, gateway_previous = parse_gateways(self.gateway_index, gateways_written)
        return Desired(
            quotas=self.quotas(),
            deployments=deployments,
            invalid=invalid,
            deleting=frozenset(deleting),
            previous=previous,
            namespaces=self.namespaces,
            gateways=gateways,
            gateway_previous=gateway_previous,
        )

    def quotas(self) -> Quotas:
        """Each namespace's NPU quota, from the index of Namespaces."""
        annotations: dict[str, dict[str, str]] = {}
        for namespace, store in list(self.quota_index.items()):
            value = next(iter(store), None)
            if value is not None:
                annotations[str(namespace)] = {QUOTA_ANNOTATION: str(value)}
        return Quotas.from_annotations(annotations)

    def quota_changed(self, namespace: str, value: str | None) -> bool:
        """Whether a Namespace event changed its quota annotation (and remember it)."""
        if self.quota_seen.get(namespace) == value:
            return False
        self.quota_seen[namespace] = value
        return True

    def _parse(self, entry: Indexed) -> Parsed:
        key, seen = entry.key, stamp(entry.metadata)
        cached = self.parsed.get(key)
        if cached is not None and cached.stamp == seen:
            return cached
        try:
            model = ModelDeployment.model_validate(
                {"metadata": dict(entry.metadata), "spec": dict(entry.spec)}
            )
        except ValidationError as error:
            parsed = Parsed(seen, None, validation_message(error))
        else:
            # Host safety: what the API server accepted may still reach past the operator's
            # settings (a hostPath outside the allow-list).
            refused = hostpolicy.violations(model, self.policy)
            parsed = (
                Parsed(seen, None, "; ".join(refused), hostpolicy.REASON)
                if refused
                else Parsed(seen, model, None)
            )
        self.parsed[key] = parsed
        return parsed

    def uids(self, desired: Desired) -> dict[str, str]:
        found = {md.key: md.metadata.uid for md in desired.deployments}
        for key in desired.invalid:
            parsed = self.parsed.get(key)
            if parsed is not None:
                found[key] = parsed.stamp[0]
        return found

    def changed(self, key: str, metadata: Mapping[str, Any]) -> bool:
        """Whether kopf's event shows a new object, generation or deletion (and remember it);
        a status write changes none of them."""
        now = stamp(metadata)
        if self.seen.get(key) == now:
            return False
        self.seen[key] = now
        return True

    def forget(self, key: str) -> None:
        self.seen.pop(key, None)
        self.parsed.pop(key, None)


# (plural) -> the namespace/name of every such object the API server holds, from a complete
# LIST (kube.Kube.listed); None when it could not be read.
Lister = Callable[[str], "set[str] | None"]


QUOTA_NAMESPACES = "namespaces-with-quota"


@dataclass
class IndexGate:
    """Whether the indexes hold every ModelDeployment and ModelGateway yet. kopf fills
    them from its own LIST, object by object, and says nothing when it is done; a pass before
    that pushes gateways only some models (their clients get model_not_found) and may take
    the missing ones' services for orphans. So: a LIST of our own, and the indexes are
    complete once they hold every object it names. An object deleted between the two LISTs
    is never indexed: the next LIST (a second later) no longer names it. Once complete, the
    gate stays open (later objects are events on a filled index)."""

    lister: Lister | None
    # The namespaces with an NPU quota annotation (kube.Kube.quota_namespaces): a pass on a
    # half-filled quota index would place replicas beyond a quota, to stop them next pass.
    quota_lister: Callable[[], set[str] | None] | None = None
    complete: bool = False

    def list_all(self) -> dict[str, set[str]] | None:
        """The API server's side (blocking: run it in a thread); None when a LIST failed."""
        found: dict[str, set[str]] = {}
        for plural in (deployment_api.PLURAL, gateway_api.PLURAL):
            listed = self.lister(plural) if self.lister is not None else set()
            if listed is None:
                return None
            found[plural] = listed
        quotas = self.quota_lister() if self.quota_lister is not None else set()
        if quotas is None:
            return None
        found[QUOTA_NAMESPACES] = quotas
        return found

    def check(self, reader: IndexReader, listed: dict[str, set[str]] | None) -> bool:
        """Compare with the indexes: in the event loop's thread, where kopf's events change them
        (walking them from another thread raced kopf's inserts)."""
        if self.complete or self.lister is None:
            self.complete = True
            return True
        if listed is None:
            return False
        for plural, index in (
            (deployment_api.PLURAL, reader.index),
            (gateway_api.PLURAL, reader.gateway_index),
        ):
            if not listed[plural] <= {entry.key for entry in walk_index(index, {})}:
                return False
        if not listed.get(QUOTA_NAMESPACES, set()) <= {str(k) for k in reader.quota_index}:
            return False
        self.complete = True
        return True
