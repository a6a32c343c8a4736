"""Every name Kubernetes allows gives a Swarm name Swarm accepts, and two different objects
never share one (issue 25, item 5: `qwen2.5-7b` stayed Degraded with Swarm's "name must be
valid as a DNS name component")."""

from __future__ import annotations

import hashlib
import re

from hypothesis import given, strategies as st

from npuswarm.api.gateway import ModelGateway
from npuswarm.core.render import MAX_SERVICE_NAME, free_service_name, service_name, swarm_name
from npuswarm.gateway import service as gateway_service

from .builders import deployment

# Swarm's rule for service names (checked against dockerd 20.10 in tests/swarm): letters,
# digits, '-' and '_', starting and ending with a letter or digit, at most 63 characters.
SWARM_NAME = re.compile(r"^[A-Za-z0-9](?:[-_]*[A-Za-z0-9]+)*$")

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
# Kubernetes' grammar: a DNS-1123 label (namespaces: at most 63) and a DNS-1123 subdomain
# (ModelDeployment and ModelGateway names: dot-separated labels, at most 253).
labels_ = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
namespaces = labels_
names = st.lists(labels_, min_size=1, max_size=4).map(".".join).filter(lambda n: len(n) <= 253)
slots = st.one_of(st.integers(0, 999).map(str), st.text(ALNUM, min_size=25, max_size=25))


def valid(name: str) -> bool:
    return len(name) <= MAX_SERVICE_NAME and SWARM_NAME.match(name) is not None


def gateway(namespace: str, name: str) -> ModelGateway:
    return ModelGateway.model_validate(
        {"metadata": {"name": name, "namespace": namespace}, "spec": {"network": {"name": "n"}}}
    )


def test_a_dotted_model_name_gives_a_name_swarm_accepts() -> None:
    md = deployment("qwen2.5-7b", namespace="team-a")
    assert service_name(md, "0") == "team-a-qwen2_5-7b-0"
    assert gateway_service.service_name(gateway("team-a", "gw.v2")) == "team-a-gw_v2-gateway"


@given(namespaces, names, slots)
def test_every_kubernetes_name_gives_a_valid_swarm_name(namespace: str, name: str, slot: str) -> None:
    md = deployment(name, namespace=namespace)
    assert valid(service_name(md, slot)), service_name(md, slot)
    assert valid(free_service_name(md, slot, {service_name(md, slot)}))
    assert valid(gateway_service.service_name(gateway(namespace, name)))
    # A surge copy's name (core/diff.py) too, even when the replica's name is 63 long.
    assert valid(swarm_name(service_name(md, slot), "surge"))


@given(st.tuples(namespaces, names, slots), st.tuples(namespaces, names, slots))
def test_different_objects_get_different_names(
    one: tuple[str, str, str], other: tuple[str, str, str]
) -> None:
    # '.' cannot map to '-': `qwen2.5-7b` and `qwen2-5-7b` are both valid Kubernetes names.
    if "-".join(one) != "-".join(other):
        assert swarm_name(*one) != swarm_name(*other)


def test_names_without_dots_keep_the_names_running_services_have() -> None:
    """An upgrade renames no running replica: names Swarm accepted before map to themselves."""
    md = deployment("qwen3-30b", namespace="default")
    assert service_name(md, "0") == "default-qwen3-30b-0"
    long = deployment("m" * 80, namespace="default")
    digest = hashlib.sha256(f"default-{'m' * 80}-0".encode()).hexdigest()[:8]
    assert service_name(long, "0") == f"default-{'m' * 46}-{digest}"
