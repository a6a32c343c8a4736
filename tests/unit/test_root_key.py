"""The root key Secret (kube.root_key, handlers.with_root_key) against a Secret store that
answers as the API server does: 404 for a missing Secret, 409 for a second create, 403 when
RBAC refuses. tests/e2e/test_root_key.py runs it on the real kube-apiserver."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest

from npuswarm.handlers import with_root_key
from npuswarm.kube import ROOT_KEY_ENTRY, ROOT_KEY_SECRET, root_key
from npuswarm.settings import Settings


class Secrets:
    """What kube.Kube's read_secret and core.create_namespaced_secret see."""

    def __init__(self, refuse: int = 0, race: str = "") -> None:
        self.stored: dict[tuple[str, str], dict[str, bytes]] = {}
        self.creates = 0
        self.refuse = refuse
        self.race = race  # another instance creates this key just before ours
        self.core = self

    def read_secret(self, namespace: str, name: str) -> tuple[dict[str, bytes], str] | None:
        if self.refuse:
            raise kubernetes.client.ApiException(status=self.refuse)
        found = self.stored.get((namespace, name))
        return (found, "1") if found is not None else None

    def create_namespaced_secret(self, namespace: str, body: dict[str, Any]) -> None:
        self.creates += 1
        key = (namespace, body["metadata"]["name"])
        if self.race:
            self.stored[key] = {ROOT_KEY_ENTRY: self.race.encode()}
        if key in self.stored:
            raise kubernetes.client.ApiException(status=409)
        self.stored[key] = {k: v.encode() for k, v in body["stringData"].items()}


def test_made_once_then_read() -> None:
    store = Secrets()
    first = root_key(store, "npuswarm-system")  # type: ignore[arg-type]
    assert len(first) == 64 and store.creates == 1
    assert root_key(store, "npuswarm-system") == first  # type: ignore[arg-type]
    assert store.creates == 1


def test_an_instance_losing_the_race_takes_the_winners_key() -> None:
    store = Secrets(race="the-winners-key-0123456789abcdef")
    assert root_key(store, "ns") == "the-winners-key-0123456789abcdef"  # type: ignore[arg-type]


def test_a_secret_without_the_entry_is_an_error_not_a_new_key() -> None:
    store = Secrets()
    store.stored[("ns", ROOT_KEY_SECRET)] = {"other": b"x"}
    with pytest.raises(ValueError, match="has no 'root-key' entry"):
        root_key(store, "ns")  # type: ignore[arg-type]
    assert store.creates == 0


def test_the_admins_key_wins_and_failures_leave_the_settings_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "npuswarm-system")
    given = Settings(root_key="an-admin-key-0123456789")
    store = Secrets()
    assert with_root_key(given, store) is given  # type: ignore[arg-type]
    assert store.creates == 0
    made = with_root_key(Settings(), store)  # type: ignore[arg-type]
    assert made.root_key.get_secret_value() == store.stored[
        ("npuswarm-system", ROOT_KEY_SECRET)][ROOT_KEY_ENTRY].decode()
    refused = Settings()
    assert with_root_key(refused, Secrets(refuse=403)) is refused  # type: ignore[arg-type]
    monkeypatch.delenv("POD_NAMESPACE")
    monkeypatch.setattr("npuswarm.handlers.own_namespace", lambda: None)
    assert with_root_key(refused, Secrets()) is refused  # type: ignore[arg-type]
