"""Label keys: on Swarm services they are the source of truth for NPU allocations, on Swarm
nodes they describe NPUs that generic resources do not."""

PREFIX = "npuswarm.io"

# Service labels.
MANAGED_BY = f"{PREFIX}/managed-by"
MANAGED_BY_VALUE = "npuswarm"
OWNER_NAMESPACE = f"{PREFIX}/owner-namespace"
OWNER_NAME = f"{PREFIX}/owner-name"
OWNER_UID = f"{PREFIX}/owner-uid"
REPLICA = f"{PREFIX}/replica"
NODE = f"{PREFIX}/node"
NPUS = f"{PREFIX}/npus"
SPEC_HASH = f"{PREFIX}/spec-hash"
MODEL = f"{PREFIX}/model"
# A member of a multi-node replica: the block of host ports its group uses (core/gang.py), the
# source of truth for them after a restart, as NPUS is for NPUs.
PORT_BLOCK = f"{PREFIX}/port-block"
# A member of a multi-node replica: its group's generation (core/groups.py). npuswarm raises it
# on every member at once to restart the whole group (a member failed or moved); a changed
# label is a changed task template, so Swarm replaces every member's task.
GROUP_GENERATION = f"{PREFIX}/group-generation"
# A ModelGateway's services carry these instead of the owner labels: they are not replicas.
GATEWAY_NAMESPACE = f"{PREFIX}/gateway-namespace"
GATEWAY_NAME = f"{PREFIX}/gateway-name"
# The namespace a network npuswarm created belongs to (docs/security.md, "Networks").
NETWORK_NAMESPACE = f"{PREFIX}/namespace"
# A gateway's Swarm secrets (gateway/credentials.py): which kind, for which credential, and
# until when a TLS certificate is valid (Unix seconds).
SECRET_KIND = f"{PREFIX}/secret-kind"
CREDENTIAL_ID = f"{PREFIX}/credential-id"
NOT_AFTER = f"{PREFIX}/not-after"
# Which npuswarm installation owns the service, when several share one Swarm (absent: the
# default one). Another installation's services are foreign: read for their NPUs, never touched.
INSTANCE = f"{PREFIX}/instance"
DEFAULT_INSTANCE = "default"

# An npu-smi reading's service (nodehealth/npusmi.py; value: the installation). It only reads:
# it asks for every NPU of its node, those replicas hold included, so a pass does not read
# it as a claim (core/snapshot.py skips services with this label).
NPU_SMI_READING = f"{PREFIX}/npu-health-probe"

# A node agent's service and secrets (nodehealth/agents.py; value: the installation). The agent
# only reads: it asks for every NPU of its nodes, those replicas hold included, so a pass does
# not read it as a claim (core/snapshot.py skips services with this label), and it never
# carries MANAGED_BY: it is no replica, no orphan and no gateway.
NODE_AGENT = f"{PREFIX}/node-agent"
NODE_AGENT_SET = f"{PREFIX}/node-agent-npus"

# Node labels.
# The NPU set a node's agent asks for, written by npuswarm (the only node label it writes):
# each agent service is constrained to the nodes of one NPU set (nodehealth/agents.py).
# Reverse-DNS without a slash: Swarm refuses a "/" in a constraint's label key.
NODE_AGENT_NPUS = "io.npuswarm.agent-npus"
NODE_NPUS = f"{PREFIX}/npus"
NODE_NPUS_RESERVED = f"{PREFIX}/npus-reserved"
NODE_TOPOLOGY = f"{PREFIX}/topology"
# The host interface carrying the node's address, for HCCL/Gloo/TP sockets of a multi-node
# replica (e.g. enp189s0f0); unset: the operator's NPUSWARM_HCCL_INTERFACE.
NODE_HCCL_INTERFACE = f"{PREFIX}/hccl-interface"

OWNED_FILTER = f"{MANAGED_BY}={MANAGED_BY_VALUE}"
