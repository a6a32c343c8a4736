"""The node agent's channel on loopback: the real agent server (nodehealth/agent.py) with the
lab's stand-in npu-smi, read by the operator's reader over TLS with signed requests."""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from npuswarm.gateway import protocol
from npuswarm.gateway.credentials import Credentials, write_secret_files
from npuswarm.nodehealth import agent, agents
from npuswarm.nodehealth import roce as agents_roce
from npuswarm.nodehealth.runner import AgentReader

from .builders import NOW, node

FAKE_NPU_SMI = Path(__file__).resolve().parents[2] / "hack" / "fake-npu-smi"
FAKE_HCCN_TOOL = Path(__file__).resolve().parents[2] / "hack" / "fake-hccn-tool"
ROOT = "unit-root-key-0123456789"
CREDENTIALS = Credentials(ROOT, "default")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    secrets = tmp_path / "secrets"
    credential = write_secret_files(
        secrets, CREDENTIALS, agents.IDENTITY, NOW, (agents.CREDENTIAL_FILE, agents.TLS_FILE)
    )
    stop = threading.Event()
    server = agent.serve(
        0,  # any free port
        protocol.parse_credential((secrets / agents.CREDENTIAL_FILE).read_text()),
        str(secrets / agents.TLS_FILE),
        "0,1",
        3600.0,
        str(FAKE_NPU_SMI),
        host="127.0.0.1",
        stop=stop,
        hccn_tool=str(FAKE_HCCN_TOOL),
        node="atlas-7",
    )
    yield server.server_address[1], credential
    stop.set()
    server.shutdown()


def test_the_reader_gets_the_agents_answer_then_a_cheap_unchanged(
    served: tuple[int, bytes],
) -> None:
    port, _ = served
    reader = AgentReader(CREDENTIALS, port)
    target = node("n1").model_copy(update={"addr": "127.0.0.1"})
    try:
        answer = reader.read([target])["n1"]
        assert answer.document is not None, answer.error
        validation = answer.document["validation"]
        assert validation["npus"] == "0,1"
        # No runtime here: the container got none of the devices it asked for.
        assert "/dev/davinci0" in validation["missing"]
        reading = agents.health(target, answer.document, NOW)
        assert not reading.error and reading.npus, "the stand-in npu-smi's table was read"
        assert all(r.healthy for r in reading.npus.values())
        links = agents_roce.links(answer.document)
        assert links is not None and sorted(links) == [0, 1]
        assert all(link.ok for link in links.values()), links
        again = reader.read([target])["n1"]
        assert again.document == answer.document
    finally:
        reader.close()


def request(port: int, headers: dict[str, str], context: ssl.SSLContext,
            path: str = agents.STATE_PATH) -> http.client.HTTPResponse:
    connection = protocol.PinnedHTTPS(
        "127.0.0.1", port, agents.IDENTITY.hostname, context, timeout=5
    )
    connection.request("GET", path, headers=headers)
    return connection.getresponse()


def test_the_agent_serves_its_npus_metrics_unsigned_and_its_state_only_signed(
    served: tuple[int, bytes],
) -> None:
    """Prometheus scrapes each node's agent as it scrapes npu-exporter (no signature), and
    gets the NPU metrics of that node, named after it: nothing of the signed answer."""
    port, _ = served
    context = CREDENTIALS.client_context()
    assert request(port, {}, context).status == 401, "the state stays the operator's"
    scraped = request(port, {}, context, agents.METRICS_PATH)
    assert scraped.status == 200
    assert (scraped.getheader("Content-Type") or "").startswith("text/plain; version=")
    text = scraped.read().decode()
    samples = {(s.name, s.labels["id"]): (s.labels["node"], s.value)
               for family in text_string_to_metric_families(text) for s in family.samples}
    # The stand-in npu-smi lists the node's 8 NPUs; the container asked for 0 and 1 (what a
    # real runtime's npu-smi in the agent's container sees is its visible NPUs).
    assert samples[("npu_chip_info_health_status", "0")] == ("atlas-7", 1.0)
    assert samples[("npu_chip_info_hbm_total_memory", "1")] == ("atlas-7", 32768.0)
    assert samples[("npu_chip_info_link_status", "1")] == ("atlas-7", 1.0), "fake hccn_tool: UP"
    assert "validation" not in text and "npuSmi" not in text


def test_unsigned_or_wrongly_signed_requests_are_refused_and_etags_answer_304(
    served: tuple[int, bytes],
) -> None:
    port, credential = served
    context = CREDENTIALS.client_context()
    signer = protocol.Signer()
    assert request(port, {}, context).status == 401
    wrong = Credentials(ROOT + "x", "default").credential(agents.IDENTITY)
    assert request(port, signer.headers(wrong, "GET", agents.STATE_PATH, b""), context).status == 401
    first = request(port, signer.headers(credential, "GET", agents.STATE_PATH, b""), context)
    assert first.status == 200
    etag = first.getheader("ETag") or ""
    first.read()
    headers = signer.headers(credential, "GET", agents.STATE_PATH, b"") | {"If-None-Match": etag}
    unchanged = request(port, headers, context)
    assert unchanged.status == 304 and unchanged.read() == b""


def test_an_agent_certificate_from_another_root_is_not_trusted(
    served: tuple[int, bytes],
) -> None:
    port, credential = served
    other = Credentials(ROOT + "x", "default").client_context()
    with pytest.raises(ssl.SSLError):
        request(port, protocol.Signer().headers(credential, "GET", agents.STATE_PATH, b""), other)


def test_inspect_names_what_the_runtime_did_not_deliver(monkeypatch: pytest.MonkeyPatch) -> None:
    present = {"/dev/davinci0", *agent.checks.CONTROL_DEVICES, *agent.checks.DRIVER_FILES}
    monkeypatch.setenv("ASCEND_VISIBLE_DEVICES", "0-7")  # rewritten by something on the way
    found = agent.inspect("0,1", exists=present.__contains__)
    assert found["missing"] == ["/dev/davinci1"] and found["npus"] == "0,1"
    verdict = agents.verdict(node("n1", hostname="atlas-7"), {"validation": found}, NOW)
    failed = {c.name: c.message for c in verdict.failures}
    assert "ASCEND_VISIBLE_DEVICES in the container is '0-7', expected '0,1'" in failed["env"]


def test_an_agent_whose_container_failed_validation_stops_for_a_new_container(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    write_secret_files(
        secrets, CREDENTIALS, agents.IDENTITY, NOW, (agents.CREDENTIAL_FILE, agents.TLS_FILE)
    )
    stop = threading.Event()
    # No runtime here: "0,1" gets no /dev/davinci0 or 1, so validation fails.
    server = agent.serve(
        0,
        protocol.parse_credential((secrets / agents.CREDENTIAL_FILE).read_text()),
        str(secrets / agents.TLS_FILE),
        "0,1",
        0.05,
        str(FAKE_NPU_SMI),
        host="127.0.0.1",
        stop=stop,
        recheck_failed=0.2,
    )
    try:
        assert stop.wait(10), "the agent asked for a new container"
    finally:
        server.shutdown()
    assert agent.lacking(agent.inspect("0,1"))
    passing = {"missing": [], "env": {"ASCEND_VISIBLE_DEVICES": "0,1"}, "npus": "0,1"}
    assert not agent.lacking(passing)


def test_the_agent_answers_about_the_host_paths_asked_in_the_signed_body(tmp_path: Path) -> None:
    """The operator's reader sends each node's paths in the signed POST; the agent resolves
    them in its view of the node (here a directory) and the answer changes its ETag when a
    link appears."""
    host = tmp_path / "host"
    (host / "models" / "qwen").mkdir(parents=True)
    (host / "models" / "qwen" / "w.bin").write_bytes(b"w" * 64)
    secrets = tmp_path / "secrets"
    write_secret_files(
        secrets, CREDENTIALS, agents.IDENTITY, NOW, (agents.CREDENTIAL_FILE, agents.TLS_FILE)
    )
    stop = threading.Event()
    server = agent.serve(
        0,
        protocol.parse_credential((secrets / agents.CREDENTIAL_FILE).read_text()),
        str(secrets / agents.TLS_FILE),
        "0",
        3600.0,
        str(FAKE_NPU_SMI),
        host="127.0.0.1",
        stop=stop,
        hccn_tool=str(FAKE_HCCN_TOOL),
        host_roots=("/models",),
        host_view=str(host),
    )
    reader = AgentReader(CREDENTIALS, server.server_address[1])
    target = node("n1").model_copy(update={"addr": "127.0.0.1"})
    asked = {"n1": ("/models/qwen", "/models/x", "/etc")}
    try:
        found = reader.read([target], asked)["n1"].document
        assert found is not None
        assert found["paths"]["/models/qwen"] == {
            "exists": True, "root": "/models", "size": 64, "files": 1, "truncated": False}
        assert found["paths"]["/models/x"]["exists"] is False
        assert found["paths"]["/etc"]["error"] == "outside the agent's allowed roots"
        (host / "models" / "x").symlink_to("/")
        again = reader.read([target], asked)["n1"].document
        assert again is not None and again["paths"]["/models/x"]["escapes"] == "/"
        plain = reader.read([target])["n1"].document
        assert plain is not None and "paths" not in plain and "validation" in plain
    finally:
        reader.close()
        stop.set()
        server.shutdown()
