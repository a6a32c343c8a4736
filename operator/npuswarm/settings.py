"""Operator settings, read once from the environment (12-factor: the Deployment sets them).

Every variable is ``NPUSWARM_<FIELD>``; unset or empty means the default. A bad value stops
the operator at startup with one line naming the variable, instead of a crash loop of
tracebacks or a silently clamped value.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from npuswarm.core.gang import PortRange
from npuswarm.core.groups import GroupRules
from npuswarm.core.hostpolicy import (
    DEFAULT_ALLOWED_HOST_PATHS,
    PLACEMENT_ENV,
    HostRoot,
    TenantPolicy,
    denied_root,
    normalise_host_path,
    reserved_env,
)
from npuswarm.core.relocation import RelocationRules
from npuswarm.core.render import DEFAULT_STOP_GRACE_SECONDS
from npuswarm.nodehealth import faults

ENV_PREFIX = "NPUSWARM_"
# NPUSWARM_ALLOWED_HOST_PATHS=none: no hostPath volume at all.
NO_HOST_PATHS = "none"
# NPUSWARM_ALLOWED_HOST_PATHS=/models,/data:rw: writes are allowed under /data only.
WRITABLE_SUFFIX = ":rw"
MIN_ROOT_KEY_LENGTH = 16
# Settings whose values never appear in a message.
SECRET_FIELDS = frozenset({"root_key"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        frozen=True,
        # A misspelt keyword in Settings(...) is an error, not a silently ignored value.
        extra="forbid",
    )

    # How often every ModelDeployment is compared with Swarm, to catch drift (hand edits,
    # removed services, failing tasks, lost nodes) that raises no Kubernetes event.
    resync_seconds: float = Field(30.0, gt=0, le=86400, allow_inf_nan=False)
    # How long a node may be down before its replicas are placed elsewhere. Moving a large
    # model costs minutes of loading, so a short network blip should not trigger it.
    lost_node_grace_seconds: float = Field(120.0, ge=0, le=7 * 86400, allow_inf_nan=False)
    metrics_port: int = Field(8081, ge=1, le=65535)
    docker_timeout_seconds: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)
    swarm_probe_seconds: float = Field(15.0, gt=0, le=3600, allow_inf_nan=False)
    # How often the cheap task poll looks for task state changes (Docker's event stream has
    # none), and how often while a rollout or a start is under way.
    task_poll_seconds: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False)
    task_poll_busy_seconds: float = Field(1.0, gt=0, le=3600, allow_inf_nan=False)
    # With peering: how long a crashed instance's record counts as alive (kopf's lifetime). A
    # standby takes over this long after the active one died; the active one renews its record
    # every lifetime minus 5-10 s, so below 15 s a slow API server could make leadership flap.
    peering_lifetime_seconds: int = Field(60, ge=15, le=3600)
    # Swarm writes of one pass in flight at once.
    write_concurrency: int = Field(8, ge=1, le=64)
    # Which npuswarm installation this is, when several share one Swarm: each owns only the
    # services carrying its name, and treats the others' as foreign. It is a label value.
    instance: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    # The host interface multi-node replicas' HCCL/Gloo/TP sockets use on a node without an
    # npuswarm.io/hccl-interface label (docs/multi-node.md); empty: left to HCCL and Gloo.
    hccl_interface: str = Field("", pattern=r"^[A-Za-z0-9_.:-]{0,15}$")
    # The root of every credential npuswarm hands out: gateways' and node agents', and of
    # their TLS CA (gateway/credentials.py); it never leaves the operator. Empty: gateways are
    # reported NotConfigured and node agents are not run. Its earlier names,
    # NPUSWARM_GATEWAY_ROOT_KEY and NPUSWARM_GATEWAY_TOKEN, still work.
    root_key: SecretStr = Field(
        SecretStr(""),
        validation_alias=AliasChoices(
            "root_key",
            f"{ENV_PREFIX}ROOT_KEY",
            "gateway_root_key",
            f"{ENV_PREFIX}GATEWAY_ROOT_KEY",
            f"{ENV_PREFIX}GATEWAY_TOKEN",
        ),
    )
    # How long a stopping replica (scale-down, removal, update) may finish its requests before
    # Swarm kills it; set on each replica's service at its next update (docs/autoscaling.md).
    stop_grace_seconds: float = Field(
        DEFAULT_STOP_GRACE_SECONDS, ge=0, le=3600, allow_inf_nan=False
    )
    # How often the built-in autoscaler reads the gateways' engine load and decides counts
    # (docs/autoscaling.md); the gateways read their backends every 2 s on their own.
    autoscaler_seconds: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False)
    # Between those rounds it long-polls the gateways serving a deployment scaled to zero
    # (answered once a request is held there); this is how often it reads them when they
    # answer at once (a front from before the long poll, a held request with no NPUs).
    autoscaler_wake_seconds: float = Field(1.0, gt=0, le=60, allow_inf_nan=False)
    # Node checks (docs/node-health.md): a node agent on each NPU node checks that Ascend
    # Docker Runtime really gives its NPUs to containers before replicas go there, and reads
    # npu-smi; the operator reads it over TLS on the agent port (host mode, on the node's
    # address). The agent's image is the operator's own (the admin pins it, by digest).
    node_validation: bool = True
    agent_image: str = ""
    agent_port: int = Field(9109, ge=1, le=65535)
    # The agent checks its container on every reading; one that failed validation exits this
    # long after its start, so that Swarm gives it a new container that sees a fixed node.
    node_recheck_failed_seconds: float = Field(60.0, gt=0, le=86400, allow_inf_nan=False)
    # NPU health: how often each node's agent reads `npu-smi info` (and the operator reads
    # the agent), and how long a replica may stay on an unhealthy NPU before it moves (a blip
    # of a few seconds should not cost minutes of model loading).
    npu_health: bool = True
    npu_health_seconds: float = Field(30.0, gt=0, le=86400, allow_inf_nan=False)
    npu_unhealthy_grace_seconds: float = Field(120.0, ge=0, le=7 * 86400, allow_inf_nan=False)
    # Fault grades (docs/node-health.md, "Fault grades"): npu-smi error codes -> MindCluster's
    # levels. A faultCode.json of MindCluster replaces the built-in table; then CODE=Level
    # pairs ("80C98008=RestartRequest,8C03A000=SeparateNode") override single codes.
    fault_codes_file: str = ""
    fault_codes: str = ""
    # A replica whose tasks of the current spec fail this many times in a row where it is
    # moves (0: never); each further move waits twice the backoff; the node it left is
    # avoided by it for the cool-down; after max moves it stays, reported as failing.
    # Swarm keeps 5 tasks of history per service by default: a threshold above 5 never fires.
    failing_replica_threshold: int = Field(3, ge=0, le=5)
    failing_replica_backoff_seconds: float = Field(60.0, ge=0, le=86400, allow_inf_nan=False)
    failing_replica_cooldown_seconds: float = Field(600.0, ge=0, le=7 * 86400, allow_inf_nan=False)
    failing_replica_max_moves: int = Field(3, ge=1, le=100)
    # Host directories a ModelDeployment's volumes may bind (each with everything below it),
    # read-only unless a root ends in ":rw".
    allowed_host_paths: Annotated[tuple[str, ...], NoDecode] = DEFAULT_ALLOWED_HOST_PATHS
    # Reserved container env (read by Ascend Docker Runtime, or the dynamic loader's) that
    # tenants may set anyway; the placement's ASCEND_VISIBLE_DEVICES never.
    allowed_reserved_env: Annotated[tuple[str, ...], NoDecode] = ()
    # Images ModelDeployments and ModelGateways may run (fnmatch patterns); empty: any.
    allowed_images: Annotated[tuple[str, ...], NoDecode] = ()
    # Networks namespaces other than their owner's may join: "net=ns1|ns2,public=*".
    shared_networks: Annotated[tuple[str, ...], NoDecode] = ()
    # Namespaces whose ModelDeployments may run multi-node replicas, which use the host
    # network (docs/multi-node.md): "ns1,ns2" or "*"; empty: none.
    host_network_namespaces: Annotated[tuple[str, ...], NoDecode] = ()
    # Host ports multi-node replicas take blocks of 32 from ("first-last", docs/multi-node.md):
    # the API, data-parallel RPC and HCCL ports of each group. Changing it restarts groups.
    group_port_range: str = "30000-32047"

    @field_validator(
        "allowed_reserved_env",
        "allowed_images",
        "shared_networks",
        "host_network_namespaces",
        mode="before",
    )
    @classmethod
    def _list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("group_port_range", mode="after")
    @classmethod
    def _port_range(cls, value: str) -> str:
        PortRange.parse(value)
        return value

    @field_validator("allowed_reserved_env", mode="after")
    @classmethod
    def _reserved_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name in PLACEMENT_ENV:
                raise ValueError(f"{name} is set from the placement and may never be allowed")
            if reserved_env(name) is None:
                raise ValueError(f"{name} is not reserved: tenants may set it already")
        return value

    @field_validator("shared_networks", mode="after")
    @classmethod
    def _grants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for grant in value:
            network, equals, namespaces = grant.partition("=")
            if not equals or not network or not namespaces:
                raise ValueError(f"{grant!r} is not network=namespace|namespace or network=*")
        return value

    @field_validator("allowed_host_paths", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip() == NO_HOST_PATHS:
                return ()
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("allowed_host_paths", mode="after")
    @classmethod
    def _safe_roots(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        roots = []
        for raw in value:
            path = raw.removesuffix(WRITABLE_SUFFIX)
            if not path.startswith("/"):
                raise ValueError(f"{raw!r} is not an absolute path")
            root = normalise_host_path(path)
            denied = denied_root(root)
            if root == "/" or denied is not None:
                # Fail at startup rather than allow what the policy refuses anyway.
                raise ValueError(f"{raw!r} may not be allowed: {denied or '/'} is always refused")
            roots.append(root + (WRITABLE_SUFFIX if raw.endswith(WRITABLE_SUFFIX) else ""))
        return tuple(roots)

    @field_validator("fault_codes", mode="after")
    @classmethod
    def _fault_codes_read(cls, value: str, info: ValidationInfo) -> str:
        """A table or override that cannot be read stops the start with its reason."""
        faults.load_table(str(info.data.get("fault_codes_file") or ""), value)
        return value

    def fault_table(self) -> faults.FaultTable:
        return faults.load_table(self.fault_codes_file, self.fault_codes)

    @field_validator("root_key", mode="after")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < MIN_ROOT_KEY_LENGTH:
            # Shown as "**********" in the error: never echoed.
            raise ValueError(
                f"at least {MIN_ROOT_KEY_LENGTH} characters (e.g. `openssl rand -hex 32`)"
            )
        return value

    def tenant_policy(self) -> TenantPolicy:
        """What tenants may ask of a node, as the pure core takes it."""
        return TenantPolicy(
            host_roots=tuple(
                HostRoot(r.removesuffix(WRITABLE_SUFFIX), r.endswith(WRITABLE_SUFFIX))
                for r in self.allowed_host_paths
            ),
            allowed_env=frozenset(self.allowed_reserved_env),
            images=self.allowed_images,
            host_network_namespaces=frozenset(self.host_network_namespaces),
            shared_networks={
                network: frozenset(n for n in namespaces.split("|") if n)
                for network, _, namespaces in (g.partition("=") for g in self.shared_networks)
            },
        )

    def relocation_rules(self) -> RelocationRules:
        """The failing-replica settings, as the pure core takes them."""
        return RelocationRules(
            threshold=self.failing_replica_threshold,
            backoff_seconds=self.failing_replica_backoff_seconds,
            cooldown_seconds=self.failing_replica_cooldown_seconds,
            max_moves=self.failing_replica_max_moves,
        )

    def port_range(self) -> PortRange:
        return PortRange.parse(self.group_port_range)

    def group_rules(self) -> GroupRules:
        """Multi-node replicas that keep failing back off as failing replicas move: the
        same back-off, doubled up to the cool-down (core/groups.py)."""
        return GroupRules(
            backoff_seconds=self.failing_replica_backoff_seconds,
            max_backoff_seconds=max(
                self.failing_replica_cooldown_seconds, self.failing_replica_backoff_seconds
            ),
        )

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment; a bad value exits with one line that names it."""
        try:
            return cls()
        except ValidationError as error:
            raise SystemExit(f"npuswarm: invalid settings: {settings_message(error)}") from None


def settings_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        shown = "<hidden>" if field in SECRET_FIELDS else repr(item.get("input"))
        parts.append(f"{name}={shown}: {item['msg']}")
    return "; ".join(parts)
