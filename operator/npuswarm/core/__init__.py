"""The pure core: plain data in, plain data out, no I/O. The Swarm snapshot read from Engine
JSON, nodes and their NPUs, placement, rendering, the diff, statuses, the host policy, the
relocation of failing replicas, and the pipeline that runs them as numbered steps over every
deployment (pipeline.py). Nothing here imports docker, kubernetes, kopf, prometheus_client or
npuswarm's I/O modules; import-linter checks it (pyproject.toml)."""
