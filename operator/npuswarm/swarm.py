"""The only module that talks to the Docker Engine API.

Every call is timed and counted (npuswarm_swarm_api_*). Errors that mean "try again later"
(connection refused, timeouts, 5xx) become SwarmUnavailable so callers can back off without
ever concluding that something is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import orjson
import requests.exceptions
from docker.constants import MINIMUM_DOCKER_API_VERSION
from docker.utils import convert_filters, kwargs_from_env

from npuswarm import metrics
from npuswarm.api import labels
from npuswarm.core.snapshot import SwarmSnapshot, is_own, snapshot_from_engine

OUT_OF_SEQUENCE = "update out of sequence"
UPDATE_ATTEMPTS = 4


class SwarmUnavailable(Exception):
    """The manager could not be asked: retry later, and assume nothing about Swarm's state."""


class SwarmRejected(Exception):
    """The manager refused a write (e.g. a name taken by a service npuswarm does not own)."""


class LeaseLapsed(Exception):
    """Not sent: this instance cannot confirm it still leads (runtime/leadership.py)."""


# Every call that changes Swarm: each one passes the fence just before it is sent.
WRITES = frozenset(
    {
        "create_service",
        "update_service",
        "remove_service",
        "create_network",
        "remove_network",
        "create_secret",
        "remove_secret",
        "update_node",
    }
)


def _translate(operation: str, error: Exception) -> Exception:
    if isinstance(error, docker.errors.APIError):
        status = error.status_code or 0
        explanation = str(error.explanation or error)
        if status >= 500 and "out of sequence" not in explanation:
            return SwarmUnavailable(f"{operation}: {explanation}")
        return SwarmRejected(f"{operation}: {explanation}")
    return SwarmUnavailable(f"{operation}: {error}")


_TRANSIENT = (
    docker.errors.APIError,
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    OSError,
)


def _service_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """A rendered ServiceSpec as docker-py's keyword arguments. Networks stay inside the task
    template: docker-py's ``networks=`` writes the deprecated top-level field."""
    return {
        "task_template": spec["TaskTemplate"],
        "name": spec["Name"],
        "labels": spec["Labels"],
        "mode": spec["Mode"],
        "update_config": spec.get("UpdateConfig"),
        "endpoint_spec": spec.get("EndpointSpec"),
    }


# What reading a broken event stream raises (docker-py leaves them untranslated).
stream_errors = _TRANSIENT


def _client(kwargs: dict[str, Any], timeout: int, version: str) -> docker.APIClient:
    client = docker.APIClient(version=version, timeout=timeout, **kwargs)
    if "tls" in kwargs:
        # requests lets REQUESTS_CA_BUNDLE replace a session's own CA (psf/requests#3829), so
        # the CA of DOCKER_CERT_PATH would be ignored wherever that variable is set.
        client.trust_env = False
    return client


def _connect(kwargs: dict[str, Any], timeout: int) -> docker.APIClient:
    """A client speaking the server's API version (docker-py's version="auto", but asked
    through a client that already ignores REQUESTS_CA_BUNDLE)."""
    with _client(kwargs, timeout, MINIMUM_DOCKER_API_VERSION) as probe:
        version = str(probe.version(api_version=False)["ApiVersion"])
    return _client(kwargs, timeout, version)


class Swarm:
    """One Swarm manager; DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH apply."""

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float = 30.0,
        instance: str = labels.DEFAULT_INSTANCE,
    ) -> None:
        # A DOCKER_CERT_PATH without cert.pem/key.pem is reported like an outage, with
        # docker-py's reason, on every call: the operator keeps running and says why.
        self._config_error: str | None = None
        kwargs: dict[str, Any] = {}
        try:
            kwargs = kwargs_from_env()
        except docker.errors.DockerException as error:
            self._config_error = f"DOCKER_HOST/DOCKER_TLS_VERIFY/DOCKER_CERT_PATH: {error}"
        if base_url is not None:
            kwargs["base_url"] = base_url
        self._kwargs = kwargs
        self._timeout = timeout
        self.instance = instance
        self._client: docker.APIClient | None = None
        # The last probe's answer, for readers that must not wait on Docker (liveness).
        self.reachable: bool | None = None
        # Whether this instance may write now (the leadership lease); None: always.
        self.fence: Callable[[], bool] | None = None
        # Node id -> when this client last changed that node's labels (monotonic): the node
        # event Swarm sends for it is this operator's own echo (runtime/swarm_watch.py).
        self.labelled_at: dict[str, float] = {}

    @property
    def api(self) -> docker.APIClient:
        # Connect lazily: the operator must start (and report the outage) while Docker is down.
        if self._client is None:
            if self._config_error is not None:
                raise SwarmUnavailable(self._config_error)
            with metrics.swarm_call("version"):
                try:
                    self._client = _connect(self._kwargs, int(self._timeout))
                except _TRANSIENT as error:
                    raise _translate("connect", error) from error
        return self._client

    def _call(self, operation: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if operation in WRITES and self.fence is not None and not self.fence():
            metrics.swarm_api_calls_total.labels(operation, "fenced").inc()
            raise LeaseLapsed(f"{operation}: not sent, the leadership lease is not held")
        api = self.api
        with metrics.swarm_call(operation):
            try:
                return getattr(api, method)(*args, **kwargs)
            except _TRANSIENT as error:
                raise _translate(operation, error) from error

    def _list(
        self, operation: str, path: str, filters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """GET a whole list through docker-py's session, decoded with orjson: at 2,000
        services the Engine JSON of one observation is about 8 MB, and the standard library's
        decoder was most of a pass's CPU."""
        api = self.api
        params = {"filters": convert_filters(filters)} if filters else None
        with metrics.swarm_call(operation):
            try:
                response = api.get(
                    f"{api.base_url}/v{api.api_version}{path}",
                    params=params,
                    timeout=self._timeout,
                )
                response.raise_for_status()
                found: list[dict[str, Any]] = orjson.loads(response.content)
            except _TRANSIENT as error:
                raise _translate(operation, error) from error
            except orjson.JSONDecodeError as error:
                raise SwarmUnavailable(f"{operation}: not JSON: {error}") from error
        return found

    def ping(self) -> bool:
        try:
            self._call("ping", "ping")
        except (SwarmUnavailable, SwarmRejected):
            self._seen(reachable=False)
            return False
        self._seen(reachable=True)
        return True

    def _seen(self, *, reachable: bool) -> None:
        """The attribute (read by liveness) and the gauge always say the same."""
        self.reachable = reachable
        metrics.swarm_reachable.set(1 if reachable else 0)

    def observe(self) -> SwarmSnapshot:
        """One consistent view with exactly four list calls, however many deployments exist.

        Every service is listed, not only npuswarm's: the others may hold NPUs."""
        nodes = self._list("list_nodes", "/nodes")
        services = self._list("list_services", "/services")
        tasks = self._list("list_tasks", "/tasks")
        networks = self._list("list_networks", "/networks")
        self._seen(reachable=True)
        return snapshot_from_engine(nodes, services, tasks, networks, self.instance)

    def owned_services(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """This installation's services of one deployment: one list call, by label."""
        found = self.services_labelled(
            labels.OWNED_FILTER,
            f"{labels.OWNER_NAMESPACE}={namespace}",
            f"{labels.OWNER_NAME}={name}",
        )
        return [s for s in found if is_own(s.get("Spec", {}).get("Labels") or {}, self.instance)]

    def task_states(self) -> dict[str, tuple[str, str]]:
        """Task id -> (service id, state) of every task Swarm wants running: the cheap poll
        that notices tasks failing or becoming ready (Docker's events have no task events).
        At 3,000 tasks the answer is about 7 MB: decoded with orjson, as observe's lists."""
        tasks = self._list("poll_tasks", "/tasks", {"desired-state": "running"})
        return {
            t.get("ID", ""): (t.get("ServiceID", ""), (t.get("Status") or {}).get("State", ""))
            for t in tasks
        }

    def task_states_of(self, service: str) -> list[str]:
        """The states of the tasks Swarm wants running for one service (by name): after a
        scale from zero the autoscaler watches its new replica this way, rather than waiting
        for the fleet-wide poll (a client is waiting for it)."""
        try:
            tasks = self._call(
                "watch_tasks", "tasks", filters={"service": service, "desired-state": "running"}
            )
        except SwarmRejected as error:
            if isinstance(error.__cause__, docker.errors.NotFound):
                return []  # removed meanwhile (Docker refuses a filter naming no service)
            raise
        return [(t.get("Status") or {}).get("State", "") for t in tasks]

    def event_stream(self) -> Any:
        """Service and node events from the manager, decoded; iterate it, ``close()`` it to
        stop. A broken stream raises while iterating: see ``stream_errors``."""
        api = self.api
        try:
            return api.events(decode=True, filters={"type": ["service", "node"]})
        except _TRANSIENT as error:
            raise _translate("events", error) from error

    def create_service(self, spec: dict[str, Any]) -> str:
        result = self._call("create_service", "create_service", **_service_kwargs(spec))
        return str(result["ID"])

    def update_service(self, service_id: str, version: int, spec: dict[str, Any]) -> None:
        """Send the full spec; on a stale version re-read the service and try again."""
        for _ in range(UPDATE_ATTEMPTS):
            try:
                self._call(
                    "update_service",
                    "update_service",
                    service_id,
                    version,
                    **_service_kwargs(spec),
                )
                return
            except SwarmRejected as error:
                if OUT_OF_SEQUENCE not in str(error):
                    raise
                current = self._call("inspect_service", "inspect_service", service_id)
                version = int(current["Version"]["Index"])
        raise SwarmUnavailable(
            f"update_service {service_id}: still out of sequence after {UPDATE_ATTEMPTS} tries"
        )

    def create_network(self, name: str, network_labels: dict[str, str]) -> None:
        """An attachable overlay network, as the seed's stack file declared ``vllm-net``."""
        self._call(
            "create_network",
            "create_network",
            name,
            driver="overlay",
            attachable=True,
            labels=network_labels,
        )

    def remove_network(self, network_id: str) -> None:
        try:
            self._call("remove_network", "remove_network", network_id)
        except (SwarmRejected, SwarmUnavailable) as error:
            # Swarm answers a network already gone with a 500; gone is what was wanted.
            if "not found" not in str(error):
                raise

    def remove_service(self, service_id: str) -> None:
        try:
            self._call("remove_service", "remove_service", service_id)
        except SwarmRejected as error:
            if "not found" not in str(error):
                raise

    # -- node checks (nodehealth/checks.py builds them, nodehealth/runner.py runs them) -------

    def services_labelled(self, *label: str) -> list[dict[str, Any]]:
        """Services carrying every ``label`` (``key=value``): one list call."""
        found: list[dict[str, Any]] = self._call(
            "list_services", "services", filters={"label": list(label)}
        )
        return found

    def secrets_labelled(self, *label: str) -> list[dict[str, Any]]:
        """Secrets carrying every ``label`` (their metadata: Swarm never returns the data)."""
        found: list[dict[str, Any]] = self._call(
            "list_secrets", "secrets", filters={"label": list(label)}
        )
        return found

    def create_secret(self, name: str, data: bytes, secret_labels: dict[str, str]) -> str:
        result = self._call("create_secret", "create_secret", name, data, labels=secret_labels)
        return str(result["ID"])

    def remove_secret(self, secret_id: str) -> None:
        try:
            self._call("remove_secret", "remove_secret", secret_id)
        except SwarmRejected as error:
            if "not found" not in str(error):
                raise

    def set_node_label(self, node_id: str, key: str, value: str) -> None:
        """Set one label of a node, keeping the rest of its spec (the node agents' NPU-set
        label, nodehealth/agents.py: the only node label npuswarm writes)."""
        for _ in range(UPDATE_ATTEMPTS):
            node = self._call("inspect_node", "inspect_node", node_id)
            spec = dict(node.get("Spec") or {})
            spec["Labels"] = dict(spec.get("Labels") or {}) | {key: value}
            try:
                self._call(
                    "update_node", "update_node", node_id, int(node["Version"]["Index"]), spec
                )
                self.labelled_at[node_id] = time.monotonic()
                return
            except SwarmRejected as error:
                if OUT_OF_SEQUENCE not in str(error):
                    raise
        raise SwarmUnavailable(f"update_node {node_id}: still out of sequence")

    def service_tasks(self, service_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._call(
            "list_tasks", "tasks", filters={"service": service_id}
        )
        return found

    def service_logs(self, service_id: str) -> str:
        """A finished service's stdout and stderr, as text (Swarm fetches it from the node)."""
        api = self.api
        with metrics.swarm_call("service_logs"):
            try:
                chunks = api.service_logs(
                    service_id, stdout=True, stderr=True, follow=False, is_tty=False
                )
                raw = b"".join(chunks) if not isinstance(chunks, bytes) else chunks
            except _TRANSIENT as error:
                raise _translate("service_logs", error) from error
        return raw.decode("utf-8", "replace")
