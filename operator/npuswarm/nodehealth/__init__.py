"""Node health: node validation (does a node's Ascend runtime give NPUs to containers,
checks.py) and `npu-smi info` readings (npusmi.py), both pure; the node agents' services, secrets
and answers (agents.py, pure); the agent itself (agent.py, `npuswarm agent`, runs on the nodes);
and the runner that keeps the agents and reads them for the node-check loop (runner.py).

Words: a "node check" is one of these; the Swarm manager's reachability is "ping"; kopf's
liveness probe is the only "probe" in the code (the labels of earlier versions' probe services
keep the word: the operator looks for them at startup to remove them)."""
