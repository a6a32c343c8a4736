"""A tenant posing as the node check (issue 24's attack): on the node where another tenant's
replica runs, a process that is not npuswarm's agent binds the agent's port and answers the
operator with a forged reading, every NPU Critical with codes graded SeparateNPU, hoping the
operator moves the replica off (and frees its NPUs for the attacker). It serves TLS with a
self-signed certificate for the agents' very name (`node-agent.npuswarm.invalid`), answers
every request, signed or not, and runs from an image with Python and `cryptography` (the
operator's, as a tenant could build). The real agent is off that node for the test (its node
label removed), since its host-mode port would otherwise be taken.

What must hold: the operator's reader refuses the forger's certificate (only npuswarm's CA is
trusted), so the node's health is unknown (agent down), nothing is withheld and the replica
stays on its node and NPUs through many readings; no NPU is held twice. The agent that comes
back is read again."""

from __future__ import annotations

import textwrap
import time
from typing import Any

import pytest

import swarmlab
from npuswarm.nodehealth import agents
from npuswarm.settings import Settings
from tests.helpers import wait_for

from .conftest import agent_settings
from .test_node_agent import Loops, model

pytestmark = pytest.mark.lab

FORGER = "tenant-forged-agent"
# A forged `npu-smi info` table: every NPU Critical, and a code graded SeparateNPU for each.
FORGER_SCRIPT = textwrap.dedent('''
    import datetime, http.server, json, ssl, tempfile
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    name = "node-agent.npuswarm.invalid"
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = tempfile.NamedTemporaryFile(suffix=".pem", delete=False)
    pem.write(key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    pem.write(cert.public_bytes(serialization.Encoding.PEM))
    pem.close()
    rows = []
    for npu in range(8):
        rows.append("| %d     910B4               | Critical      | 86.5        40"
                    "                0    / 0             |" % npu)
        rows.append("| 0                         | 0000:C1:00.0  | 0           0    / 0"
                    "          0 / 32768            |")
    doc = {"validation": {"missing": [], "npus": "0,1,2,3,4,5,6,7",
                          "env": {"ASCEND_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
                                  "ASCEND_DOCKER_RUNTIME": "True"}},
           "npuSmi": {"text": "\\n".join(rows), "error": ""},
           "npuFaults": {str(n): "Health Status : Critical\\nError Code : 80E18402\\n"
                         for n in range(8)},
           "roce": {"present": False}}
    body = json.dumps(doc).encode()
    class Forged(http.server.BaseHTTPRequestHandler):
        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = answer
    server = http.server.ThreadingHTTPServer(("", PORT), Forged)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem.name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("forger serving", flush=True)
    server.serve_forever()
''')


@pytest.fixture
def settings(operator_image: str) -> Settings:
    return agent_settings(operator_image, 3.0)


def set_agent_label(lab: swarmlab.Lab, index: int, value: str | None) -> None:
    api = lab.client(1).api
    found = api.inspect_node(lab.node_id(index))
    spec = found["Spec"]
    node_labels = dict(spec.get("Labels") or {})
    if value is None:
        node_labels.pop(agents.NODE_LABEL, None)
    else:
        node_labels[agents.NODE_LABEL] = value
    spec["Labels"] = node_labels
    api.update_node(found["ID"], found["Version"]["Index"], spec)


def containers_of(lab: swarmlab.Lab, index: int, prefix: str) -> list[dict[str, Any]]:
    return [
        c
        for c in lab.client(index).api.containers(
            filters={"label": "com.docker.swarm.service.name"}
        )
        if c["Labels"]["com.docker.swarm.service.name"].startswith(prefix)
    ]


@pytest.mark.usefixtures("agents_removed")
def test_a_forged_agent_on_the_agents_port_moves_nothing(
    swarm_lab: swarmlab.Lab, settings: Settings, operator_image: str
) -> None:
    index_of = {swarm_lab.node_id(k): k for k in (1, 2, 3)}
    loops = Loops(swarm_lab, settings, model("victim", replicas=1, npus=8))
    api = swarm_lab.client(1).api
    forger_id = None
    k = 0
    try:
        def ready() -> bool:
            result = loops.turn()
            return result.views[loops.md.key].status.readyReplicas == 1

        wait_for(ready, "the victim ready", timeout=120, interval=0.5)
        ((where, npus),) = loops.replicas().values()
        k = index_of[where]
        host = swarm_lab.node(k).hostname

        # The real agent leaves that node: the operator stops managing agents for the test
        # (it would put the label back) and the label that places the agent goes.
        loops.checker.manage = False
        set_agent_label(swarm_lab, k, None)
        wait_for(lambda: not containers_of(swarm_lab, k, agents.NAME_PREFIX),
                 f"no agent on {host}", timeout=60)

        # The forger binds the agent's port on that node (host mode, as the agent does).
        script = FORGER_SCRIPT.replace("PORT", str(settings.agent_port))
        forger_id = api.create_service(
            task_template={
                "ContainerSpec": {"Image": operator_image,
                                  "Command": ["python3", "-c", script], "User": "0"},
                "Placement": {"Constraints": [f"node.id=={where}"]},
                "RestartPolicy": {"Condition": "none"},
            },
            name=FORGER,
            endpoint_spec={"Mode": "dnsrr", "Ports": [
                {"Protocol": "tcp", "TargetPort": settings.agent_port,
                 "PublishedPort": settings.agent_port, "PublishMode": "host"}]},
        )["ID"]
        wait_for(lambda: containers_of(swarm_lab, k, FORGER), "the forger running", timeout=60)
        forger = containers_of(swarm_lab, k, FORGER)[0]
        wait_for(lambda: b"forger serving" in swarm_lab.client(k).api.logs(forger["Id"]),
                 "the forger serving", timeout=60)

        # Many readings, well past the grace: the forger's answer is never taken.
        began = time.monotonic()
        errors: set[str] = set()

        def long_enough() -> bool:
            loops.turn()
            assert loops.replicas() == {"0": (where, npus)}, "the victim must not move"
            limits = loops.checker.unusable(loops.last.plan.snapshot)  # type: ignore[union-attr]
            assert where not in limits.npus and where not in limits.busy, limits
            reading = loops.checker.readings().get(where)
            if reading is not None:
                assert not reading.npus, "no NPU reading taken from the forger"
                errors.add(reading.error)
            return time.monotonic() - began > 4 * settings.npu_unhealthy_grace_seconds

        wait_for(long_enough, "readings past the grace", timeout=60, interval=0.5)
        assert dict(loops.checker.agents_up())[host] is False
        refused = [e for e in errors
                   if "CERTIFICATE_VERIFY_FAILED" in e or "certificate verify failed" in e]
        assert refused, errors
        print(f"forged agent refused: {refused[0][:300]}")
    finally:
        if forger_id is not None:
            api.remove_service(forger_id)
        if k:
            set_agent_label(swarm_lab, k, "0-7")
            loops.checker.manage = True
        loops.close()
