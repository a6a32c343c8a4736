"""npuswarm reaches a manager that demands TLS client certificates the Docker way
(DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH), and such a manager refuses it without."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest
import requests
from docker.tls import TLSConfig

import swarmlab
from npuswarm.swarm import Swarm, SwarmRejected, SwarmUnavailable

pytestmark = pytest.mark.lab


def docker_env(monkeypatch: pytest.MonkeyPatch, host: str, cert_path: Path | None) -> None:
    monkeypatch.setenv("DOCKER_HOST", host)
    if cert_path is None:
        monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
        monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
    else:
        monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
        monkeypatch.setenv("DOCKER_CERT_PATH", str(cert_path))


def test_swarm_is_observed_over_tls_with_client_certificates(
    swarm_lab: swarmlab.Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    docker_env(monkeypatch, swarm_lab.tls_endpoint, swarm_lab.tls_client_dir)
    swarm = Swarm(timeout=10)
    snapshot = swarm.observe()
    assert sorted(n.hostname for n in snapshot.nodes) == sorted(n.hostname for n in swarm_lab.nodes)
    assert all(len(n.npus) == 8 for n in snapshot.nodes)
    assert swarm.api.base_url == swarm_lab.tls_endpoint.replace("tcp://", "https://")
    assert swarm.ping() is True


def test_manager_refuses_clients_without_a_certificate_of_its_ca(
    swarm_lab: swarmlab.Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The server's refusal itself: the lab's CA (the server is trusted), no client certificate.
    ca = str(swarm_lab.tls_client_dir / "ca.pem")
    bare = docker.APIClient(base_url=swarm_lab.tls_endpoint.replace("tcp://", "https://"),
                            version="1.41", timeout=10, tls=TLSConfig(ca_cert=ca, verify=True))
    bare.trust_env = False
    with pytest.raises(requests.exceptions.RequestException) as caught:
        bare.version(api_version=False)
    assert "SSL" in str(caught.value)

    # Through npuswarm: a client certificate of another CA is refused by the server...
    swarmlab.make_certificates(tmp_path / "other", "127.0.0.1", "elsewhere")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "ca.pem").write_bytes((swarm_lab.tls_client_dir / "ca.pem").read_bytes())
    for name in ("cert.pem", "key.pem"):
        (mixed / name).write_bytes((tmp_path / "other" / "client" / name).read_bytes())
    docker_env(monkeypatch, swarm_lab.tls_endpoint, mixed)
    swarm = Swarm(timeout=10)
    with pytest.raises(SwarmUnavailable) as refused:
        swarm.observe()
    # Go's TLS 1.3 server drops the connection after the handshake: an SSL error, of any wording.
    assert "SSL" in str(refused.value)
    assert swarm.ping() is False

    # ...a cert path with only the CA is a clear error on every call, not a crash...
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca.pem").write_bytes((swarm_lab.tls_client_dir / "ca.pem").read_bytes())
    docker_env(monkeypatch, swarm_lab.tls_endpoint, only_ca)
    swarm = Swarm(timeout=10)
    with pytest.raises(SwarmUnavailable, match="DOCKER_CERT_PATH: .*certificate and key"):
        swarm.observe()
    assert swarm.ping() is False

    # ...and plain HTTP gets the manager's refusal, and nothing is observed.
    docker_env(monkeypatch, swarm_lab.tls_endpoint, None)
    with pytest.raises((SwarmUnavailable, SwarmRejected)) as plain:
        Swarm(timeout=10).observe()
    assert "HTTPS" in str(plain.value) or "https" in str(plain.value)


def test_the_ca_of_docker_cert_path_wins_over_requests_ca_bundle(
    swarm_lab: swarmlab.Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests lets REQUESTS_CA_BUNDLE (set on many machines, this one included) replace a
    session's CA; npuswarm must still verify the manager with DOCKER_CERT_PATH/ca.pem."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    docker_env(monkeypatch, swarm_lab.tls_endpoint, swarm_lab.tls_client_dir)
    assert Swarm(timeout=10).ping() is True
