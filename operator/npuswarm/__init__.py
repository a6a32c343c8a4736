"""npuswarm: run vLLM model servers on Ascend NPU nodes of a Docker Swarm."""

__version__ = "0.1.0"
