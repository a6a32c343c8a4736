"""Each ModelGateway's own credential and TLS certificate, and the node agents'
(docs/security.md).

Everything derives from one root key that only the operator holds (NPUSWARM_ROOT_KEY):

- a gateway's credential is HMAC-SHA256(root, installation, namespace, name, uid, rotation):
  one gateway's credential opens no other, a re-created gateway of the same name gets a new
  one, and the ``npuswarm.io/rotate-credential`` annotation or a new root key rotates it;
- the certificate authority's key is derived from the root too, so every operator instance
  (HA standbys, restarts) trusts the same CA without storing anything;
- each gateway's TLS key and certificate (signed by that CA, named for that gateway only) are
  made once and kept only in a Swarm secret, with the credential in another. Swarm stores
  secrets encrypted in its raft log and mounts them only into that gateway's tasks, on tmpfs.

Pure apart from the cryptography: no Docker, no Kubernetes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from npuswarm.gateway import protocol

# A certificate is replaced this long before it expires (a rolling restart of the gateway).
TLS_VALIDITY = dt.timedelta(days=397)
TLS_RENEW_BEFORE = dt.timedelta(days=30)
ROTATE_ANNOTATION = "npuswarm.io/rotate-credential"
_CA_NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_CA_NOT_AFTER = dt.datetime(2120, 1, 1, tzinfo=dt.UTC)
_CURVE_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)


@dataclass(frozen=True)
class GatewayIdentity:
    """Who a gateway is, for its credential and certificate."""

    namespace: str
    name: str
    uid: str = ""
    rotation: str = ""  # the rotate-credential annotation's value

    @property
    def hostname(self) -> str:
        """The name its certificate is issued for; the operator checks it on every push, so
        one gateway's certificate cannot pose as another's."""
        return f"{self.name}.{self.namespace}.gateway.npuswarm.invalid"


@dataclass(frozen=True)
class AgentIdentity:
    """The node agents of an installation (nodehealth/agents.py): one credential and one
    certificate for all of them, since every agent answers the same operator the same way
    and a node's agent can only speak for that node's address."""

    rotation: str = ""

    @property
    def hostname(self) -> str:
        return "node-agent.npuswarm.invalid"


Identity = GatewayIdentity | AgentIdentity


@dataclass(frozen=True)
class TLSBundle:
    pem: bytes  # the private key and the certificate, as the front loads them from one file
    not_after: dt.datetime


def _derive(root: bytes, *parts: str) -> bytes:
    return hmac.new(root, "\0".join(parts).encode(), hashlib.sha256).digest()


class Credentials:
    """The operator's side: derive credentials, issue certificates, verify gateways."""

    def __init__(self, root_key: str, instance: str) -> None:
        if not root_key:
            raise ValueError("no root key")
        self._root = root_key.encode()
        self.instance = instance
        scalar = int.from_bytes(_derive(self._root, "npuswarm/gateway-ca/v1", instance), "big")
        self._ca_key = ec.derive_private_key(scalar % (_CURVE_ORDER - 1) + 1, ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"npuswarm gateway CA ({instance})")]
        )
        public = self._ca_key.public_key()
        self.ca_certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(1)
            .not_valid_before(_CA_NOT_BEFORE)
            .not_valid_after(_CA_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_pem = self.ca_certificate.public_bytes(serialization.Encoding.PEM)
        self._context: ssl.SSLContext | None = None

    def credential(self, gateway: Identity) -> bytes:
        if isinstance(gateway, AgentIdentity):
            return _derive(
                self._root, "npuswarm/agent-credential/v1", self.instance, gateway.rotation
            )
        return _derive(
            self._root,
            "npuswarm/gateway-credential/v1",
            self.instance,
            gateway.namespace,
            gateway.name,
            gateway.uid,
            gateway.rotation,
        )

    def credential_file(self, gateway: Identity) -> bytes:
        """The credential as its secret holds it (protocol.parse_credential reads it)."""
        return self.credential(gateway).hex().encode() + b"\n"

    def credential_id(self, gateway: Identity) -> str:
        """A public name for a credential (secret names, labels); reveals nothing of it."""
        return hmac.new(self.credential(gateway), b"id", hashlib.sha256).hexdigest()[:16]

    def issue_tls(self, gateway: Identity, now: dt.datetime) -> TLSBundle:
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = now + TLS_VALIDITY
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway.hostname)]))
            .issuer_name(self.ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(gateway.hostname)]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ) + certificate.public_bytes(serialization.Encoding.PEM)
        return TLSBundle(pem=pem, not_after=not_after.replace(microsecond=0))

    def client_context(self) -> ssl.SSLContext:
        """TLS 1.2+ trusting only npuswarm's gateway CA; made once, shared by push threads."""
        if self._context is None:
            # cadata given: the system's CAs are not loaded, only npuswarm's is trusted.
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem.decode()
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._context = context
        return self._context


def write_secret_files(
    directory: Path,
    credentials: Credentials,
    gateway: Identity,
    now: dt.datetime,
    names: tuple[str, str] = (protocol.CREDENTIAL_FILE, protocol.TLS_FILE),
) -> bytes:
    """The two files Swarm mounts into a gateway's or an agent's tasks (``names``: the
    credential's and the TLS key's), written into ``directory`` (0400): for running the front
    or the agent outside Swarm (tests, the benchmark). Returns the credential."""
    directory.mkdir(parents=True, exist_ok=True)
    credential = credentials.credential(gateway)
    files = {
        names[0]: credentials.credential_file(gateway),
        names[1]: credentials.issue_tls(gateway, now).pem,
    }
    for name, data in files.items():
        path = directory / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
    return credential
