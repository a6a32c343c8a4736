"""Client access at a ModelGateway: what the operator pushes (key digests, never keys), and how
a replica admits requests (keys, models per key, token-bucket rate limits)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from npuswarm.api.gateway import ClientAccess
from npuswarm.gateway.access import KeySet, access_state
from npuswarm.gateway.admission import ANONYMOUS, Limiter, parse_access, usage_tokens
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways
from npuswarm.reconcile import Desired, Reconciler
from npuswarm.settings import Settings

from .builders import NOW
from .test_gateway import Recorder, gateway, model, overlay_swarm

KEYS = {"team-a": b"sk-team-a-0123456789", "ci": b"sk-ci-abcdef", "blank": b"  "}


def access(**spec: Any) -> ClientAccess:
    return ClientAccess.model_validate({"apiKeysSecret": "keys", **spec})


def test_keys_are_pushed_as_digests_with_their_models_and_limits() -> None:
    keys = KeySet.from_secret_data(KEYS, "42")
    state = access_state(
        access(perKey={"requestsPerMinute": 60}, keys={"ci": {"models": ["m"], "tokensPerMinute": 9}}),
        keys,
    )
    text = json.dumps(state)
    assert all(k.decode().strip() not in text for k in KEYS.values() if k.strip())
    by_name = {entry["name"]: entry for entry in state["keys"].values()}
    assert sorted(by_name) == ["ci", "team-a"]  # an empty entry is no key
    assert by_name["ci"] == {"name": "ci", "models": ["m"], "rpm": 0, "tpm": 9}
    assert by_name["team-a"] == {"name": "team-a", "models": None, "rpm": 60, "tpm": 0}
    assert state["anonymous"]["allowed"] is False
    assert access_state(ClientAccess(), None)["anonymous"]["allowed"] is True  # no keys asked
    assert access_state(access(), None)["keys"] == {}  # unreadable Secret: no key opens it


def test_a_replica_admits_only_valid_keys_and_each_key_only_its_models() -> None:
    state = access_state(access(keys={"ci": {"models": ["m"]}}), KeySet.from_secret_data(KEYS, "1"))
    admitted = parse_access(state)
    team = admitted.client("Bearer sk-team-a-0123456789")
    assert not isinstance(team, str) and team.name == "team-a" and team.models is None
    ci = admitted.client("Bearer sk-ci-abcdef")
    assert not isinstance(ci, str) and ci.models == frozenset({"m"})
    assert admitted.client("Bearer sk-wrong") == "the API key is not valid"
    assert isinstance(admitted.client(None), str)  # anonymous not allowed
    assert isinstance(admitted.client("Basic abc"), str)
    guest = parse_access(access_state(access(allowAnonymous=True), KeySet()))
    assert not isinstance(guest.client(None), str) and guest.client(None).name == ANONYMOUS  # type: ignore[union-attr]
    assert parse_access(None).client(None) is not None  # an older operator: open, as before


@pytest.mark.parametrize(
    "bad",
    [{"keys": {"notadigest": {}}}, {"keys": {"a" * 64: {"rpm": -1}}}, {"keys": []}, "x",
     {"keys": {"b" * 64: {"models": "m"}}}],
)
def test_malformed_access_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_access(bad)


def test_requests_per_minute_refill_continuously_and_say_when_to_retry() -> None:
    now = [0.0]
    limiter = Limiter(lambda: now[0])
    client = parse_access(
        {"anonymous": {"allowed": True, "rpm": 2, "tpm": 0}, "keys": {}}
    ).client(None)
    assert not isinstance(client, str)
    assert limiter.admit(client) is None and limiter.admit(client) is None
    assert limiter.admit(client) == 30  # one request refills in 60 / 2 seconds
    now[0] = 29.0
    assert limiter.admit(client) == 1
    now[0] = 30.0
    assert limiter.admit(client) is None


def test_tokens_are_debited_after_the_response_and_a_debt_is_waited_out() -> None:
    now = [0.0]
    limiter = Limiter(lambda: now[0])
    client = parse_access({"anonymous": {"allowed": True, "tpm": 600}, "keys": {}}).client(None)
    assert not isinstance(client, str)
    assert limiter.admit(client) is None
    limiter.spent(client, 900)  # one long answer: 300 tokens in debt
    assert limiter.admit(client) == 30  # 300 tokens at 10 a second
    now[0] = 30.0
    assert limiter.admit(client) is None


def test_usage_is_read_from_a_body_or_a_streams_last_chunks() -> None:
    body = b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}'
    assert usage_tokens(body) == 8
    stream = b'data: {"choices": []}\n\ndata: {"usage": {"total_tokens": 12}}\n\ndata: [DONE]\n\n'
    assert usage_tokens(stream) == 12
    assert usage_tokens(b"data: [DONE]") == 0


class Keys:
    def __init__(self) -> None:
        self.data: dict[tuple[str, str], KeySet | None] = {}

    def keys(self, namespace: str, name: str) -> KeySet | None:
        return self.data.get((namespace, name))


def test_a_pass_pushes_rotated_keys_and_reports_them_without_the_keys() -> None:
    swarm = overlay_swarm(nodes=1)
    recorder, source = Recorder(), Keys()
    r = Reconciler(swarm, Settings(), clock=lambda: NOW,
                   gateways=Gateways("default", Credentials("unit-root-key-0123456789", "default"),
                                     recorder.send, keys=source))
    gw = gateway(clientAccess={"apiKeysSecret": "keys"})
    missing = r.run_pass(Desired(deployments=[model("a")], gateways=[gw])).gateways["default/gw"]
    reasons = {c.type: c.reason for c in missing.conditions}
    assert reasons["Degraded"] == "ApiKeysUnavailable"
    source.data[("default", "keys")] = KeySet.from_secret_data({"old": b"sk-old"}, "7")
    status = r.run_pass(Desired(deployments=[model("a")], gateways=[gw])).gateways["default/gw"]
    assert status.clientAccess is not None and status.clientAccess.keys == 1
    assert status.clientAccess.secretVersion == "7"
    assert "sk-old" not in json.dumps(status.model_dump(mode="json"))
    spec = json.dumps(list(swarm.services.values()))
    assert "sk-old" not in spec and hashlib.sha256(b"sk-old").hexdigest() not in spec
