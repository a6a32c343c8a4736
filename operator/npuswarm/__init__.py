"""npuswarm: run vLLM model servers on Ascend NPU nodes of a Docker Swarm."""

from importlib.metadata import PackageNotFoundError, version

# One version, pyproject.toml's, as installed: `npuswarm --version` and the image tag agree.
try:
    __version__ = version("npuswarm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
