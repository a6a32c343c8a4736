"""Each ModelGateway's own credential and certificate, the signed admin requests, and the
Swarm secrets that carry them (docs/security.md)."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from npuswarm.gateway import protocol
from npuswarm.api import labels
from npuswarm.api.gateway import ModelGateway
from npuswarm.gateway.service import identity, plan_secrets
from npuswarm.gateway.credentials import (
    ROTATE_ANNOTATION,
    TLS_RENEW_BEFORE,
    TLS_VALIDITY,
    Credentials,
    GatewayIdentity,
    write_secret_files,
)
from npuswarm.gateway.protocol import Verifier, authorization
from npuswarm.core.snapshot import secrets_from_engine
from npuswarm.reconcile import Reconciler
from npuswarm.core.pipeline import Desired
from npuswarm.settings import Settings

from .builders import NOW
from .memswarm import MemorySwarm

ROOT = "unit-test-root-key-0123456789"
A = GatewayIdentity("team-a", "gw", "uid-a")
B = GatewayIdentity("team-b", "gw", "uid-b")


def gateway(namespace: str = "team-a", uid: str = "uid-a", **annotations: str) -> ModelGateway:
    return ModelGateway.model_validate(
        {
            "metadata": {"name": "gw", "namespace": namespace, "uid": uid, "annotations": annotations},
            "spec": {"network": {"name": "vllm-net"}},
        }
    )


# --- the signed admin request ---------------------------------------------------------------


def test_a_signed_request_is_accepted_once_and_only_with_its_own_credential() -> None:
    key = Credentials(ROOT, "default").credential(A)
    body = b'{"models": {}}'
    header = authorization(key, "PUT", "/backends", 1_000_000, body)
    assert Verifier(key).refusal(header, "PUT", "/backends", body, 1_000_000) is None
    verifier = Verifier(key)
    assert verifier.refusal(header, "PUT", "/backends", body, 1_000_500) is None
    assert verifier.refusal(header, "PUT", "/backends", body, 1_000_600) == (
        "replayed or out-of-order request"
    )
    older = authorization(key, "PUT", "/backends", 999_999, body)
    assert verifier.refusal(older, "PUT", "/backends", body, 1_000_600) == (
        "replayed or out-of-order request"
    )
    other = Credentials(ROOT, "default").credential(B)
    assert Verifier(other).refusal(header, "PUT", "/backends", body, 1_000_000) == "bad signature"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"body": b'{"models": {"m": ["http://evil:1"]}}'}, "bad signature"),
        ({"method": "GET"}, "bad signature"),
        ({"path": "/backends/x"}, "bad signature"),
        ({"now": 1_000_000 + 301_000}, "timestamp too far from this node's clock"),
        ({"header": "Bearer something"}, "missing or malformed signature"),
        ({"header": None}, "missing or malformed signature"),
    ],
)
def test_a_changed_or_stale_request_is_refused(change: dict[str, Any], reason: str) -> None:
    key = Credentials(ROOT, "default").credential(A)
    body = b'{"models": {}}'
    header = authorization(key, "PUT", "/backends", 1_000_000, body)
    request = {"header": header, "method": "PUT", "path": "/backends", "body": body, "now": 1_000_000}
    request.update(change)
    verifier = Verifier(key)
    found = verifier.refusal(
        request["header"], request["method"], request["path"], request["body"], request["now"]
    )
    assert found == reason
    assert verifier.last_accepted_ms == 0  # a refused request moves nothing


def test_a_gateway_without_a_credential_accepts_nothing() -> None:
    header = authorization(b"x" * 32, "PUT", "/backends", 5, b"")
    assert Verifier(None).refusal(header, "PUT", "/backends", b"", 5) is not None


# --- derivation ---------------------------------------------------------------------------


def test_each_gateway_has_its_own_credential_that_the_root_and_rotation_change() -> None:
    base = Credentials(ROOT, "default")
    found = {
        base.credential(A),
        base.credential(B),
        base.credential(GatewayIdentity("team-a", "gw", "uid-a2")),  # re-created
        base.credential(GatewayIdentity("team-a", "gw", "uid-a", rotation="1")),
        Credentials(ROOT + "x", "default").credential(A),
        Credentials(ROOT, "other-instance").credential(A),
    }
    assert len(found) == 6
    assert Credentials(ROOT, "default").credential(A) == base.credential(A)  # HA standby agrees
    assert base.credential_id(A) not in base.credential(A).hex()


def _serve_once(pem: Path) -> tuple[int, threading.Thread]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pem)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        with listener:
            connection, _ = listener.accept()
            try:
                with server.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return port, thread


def _handshake(client: ssl.SSLContext, pem: Path, hostname: str) -> bytes:
    port, thread = _serve_once(pem)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client.wrap_socket(raw, server_hostname=hostname) as tls:
                return tls.recv(2)
    finally:
        thread.join(timeout=5)


def test_tls_trusts_only_the_gateway_named_and_only_npuswarms_ca(tmp_path: Path) -> None:
    issuer = Credentials(ROOT, "default")
    write_secret_files(tmp_path / "a", issuer, A, NOW)
    pem = tmp_path / "a" / protocol.TLS_FILE
    # Another operator process derives the same CA from the same root: it trusts the cert.
    standby = Credentials(ROOT, "default").client_context()
    assert _handshake(standby, pem, A.hostname) == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        _handshake(standby, pem, B.hostname)  # gateway A's certificate cannot pose as B
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(Credentials(ROOT + "x", "default").client_context(), pem, A.hostname)


def test_secret_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    credential = write_secret_files(tmp_path, Credentials(ROOT, "default"), A, NOW)
    path = tmp_path / protocol.CREDENTIAL_FILE
    assert path.stat().st_mode & 0o777 == 0o400
    assert protocol.parse_credential(path.read_text()) == credential


# --- the secrets of a pass --------------------------------------------------------------------


def team_swarm() -> MemorySwarm:
    """vllm-net as npuswarm made it for team-a, the gateways' namespace here."""
    swarm = MemorySwarm()
    swarm.networks[0].update(Scope="swarm", Labels={labels.MANAGED_BY: labels.MANAGED_BY_VALUE,
                                                    labels.NETWORK_NAMESPACE: "team-a"})
    return swarm


def observed(swarm: MemorySwarm) -> list[Any]:
    return secrets_from_engine(swarm.secrets_labelled(labels.OWNED_FILTER), "default")


def test_secrets_are_made_once_then_reused_and_renewed_before_they_expire() -> None:
    credentials = Credentials(ROOT, "default")
    first = plan_secrets([gateway()], [], credentials, "default", NOW)
    assert [s.labels[labels.SECRET_KIND] for s in first.create] == ["gateway-credential", "gateway-tls"]
    swarm = team_swarm()
    for new in first.create:
        swarm.create_secret(new.name, new.data, new.labels)
    again = plan_secrets([gateway()], observed(swarm), credentials, "default", NOW)
    assert again.create == [] and again.stale == []
    assert again.mounts == first.mounts
    later = NOW + TLS_VALIDITY - TLS_RENEW_BEFORE + timedelta(hours=1)
    renewed = plan_secrets([gateway()], observed(swarm), credentials, "default", later)
    assert [s.labels[labels.SECRET_KIND] for s in renewed.create] == ["gateway-tls"]
    assert [s.labels[labels.SECRET_KIND] for s in renewed.stale] == ["gateway-tls"]


def test_the_rotation_annotation_makes_a_new_credential_and_retires_the_old() -> None:
    credentials = Credentials(ROOT, "default")
    swarm = team_swarm()
    for new in plan_secrets([gateway()], [], credentials, "default", NOW).create:
        swarm.create_secret(new.name, new.data, new.labels)
    rotated = gateway(**{ROTATE_ANNOTATION: "2026-12-05"})
    plan = plan_secrets([rotated], observed(swarm), credentials, "default", NOW)
    assert {s.labels[labels.SECRET_KIND] for s in plan.create} == {"gateway-credential", "gateway-tls"}
    assert len(plan.stale) == 2
    key = next(s for s in plan.create if s.labels[labels.SECRET_KIND] == "gateway-credential")
    assert key.data == credentials.credential_file(identity(rotated))


def test_a_pass_mounts_the_secrets_and_removes_them_once_unused() -> None:
    swarm = team_swarm()
    credentials = Credentials(ROOT, "default")
    from npuswarm.gateway.push import Gateways

    r = Reconciler(swarm, Settings(), clock=lambda: NOW, gateways=Gateways("default", credentials, send=lambda *a: None))
    r.run_pass(Desired(gateways=[gateway()]))
    (service,) = swarm.services.values()
    mounted = service["Spec"]["TaskTemplate"]["ContainerSpec"]["Secrets"]
    assert {m["SecretID"] for m in mounted} == set(swarm.secrets)
    assert "Env" not in service["Spec"]["TaskTemplate"]["ContainerSpec"]
    key_name = next(m["SecretName"] for m in mounted if m["File"]["Name"] == protocol.CREDENTIAL_FILE)
    assert swarm.secret_data[key_name] == credentials.credential_file(A)
    r.run_pass(Desired(gateways=[gateway()]))
    assert swarm.calls["create_secret"] == 2 and swarm.calls["update_service"] == 0

    r.run_pass(Desired(gateways=[gateway(**{ROTATE_ANNOTATION: "1"})]))
    assert swarm.calls["create_secret"] == 4 and swarm.calls["update_service"] == 1
    (service,) = swarm.services.values()
    assert {m["SecretID"] for m in service["Spec"]["TaskTemplate"]["ContainerSpec"]["Secrets"]} == set(
        swarm.secrets
    ), "the old secrets were removed once the service no longer named them"
    assert r.finalize_gateway("team-a", "gw") == 1
    assert swarm.services == {} and swarm.secrets == {}


def test_secrets_of_another_installation_or_gateway_are_never_touched() -> None:
    swarm = team_swarm()
    other_labels = {labels.MANAGED_BY: labels.MANAGED_BY_VALUE, labels.INSTANCE: "other",
                    labels.GATEWAY_NAMESPACE: "team-a", labels.GATEWAY_NAME: "gw",
                    labels.SECRET_KIND: "gateway-credential"}
    swarm.create_secret("theirs", b"x", other_labels)
    swarm.create_secret("hand-made", b"x", {})
    from npuswarm.gateway.push import Gateways

    r = Reconciler(swarm, Settings(), clock=lambda: NOW,
                   gateways=Gateways("default", Credentials(ROOT, "default"), send=lambda *a: None))
    r.run_pass(Desired(gateways=[gateway()]))
    r.finalize_gateway("team-a", "gw")
    assert sorted(s["Spec"]["Name"] for s in swarm.secrets.values()) == ["hand-made", "theirs"]
