"""Node health: node checks (does a node's Ascend runtime give NPUs to containers,
checks.py), `npu-smi info` readings (npusmi.py), both pure, and the runner that starts their
one-shot services through the Swarm client and keeps their answers (runner.py).

Words: a "node check" is one of these; the Swarm manager's reachability is "ping"; kopf's
liveness probe is the only "probe" in the code (user-facing names such as
NPUSWARM_NODE_PROBE_IMAGE and the services' labels keep the word: they are an interface)."""
