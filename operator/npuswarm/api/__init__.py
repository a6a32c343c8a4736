"""The API: the ModelDeployment and ModelGateway models (the single source of their CRDs), the
metadata and conditions they share, and the label keys npuswarm writes on Swarm objects. Pure:
no I/O, no import of the rest of npuswarm."""
