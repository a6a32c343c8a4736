"""Compose stack files, for the CLI only: parsing them (compose.py, vllm_args.py), importing
their vLLM services as ModelDeployments (importer.py, `npuswarm import-stack`) and exporting the
services npuswarm would run as one (exporter.py, `npuswarm export-stack`). The operator never
imports this package (import-linter checks it)."""
