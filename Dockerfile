# syntax=docker/dockerfile:1
# The npuswarm operator image: `hack/build-image`. The wheel build and the install below are
# the ones hack/check-image-install runs in CI without Docker; keep the two in step
# (tests/packaging/test_image.py compares them).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# Only what the wheel is made of, so an edit to tests or docs does not rebuild it.
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="npuswarm" \
      org.opencontainers.image.description="Runs vLLM on Ascend NPU nodes of a Docker Swarm from ModelDeployment resources" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# The root filesystem is read-only in the cluster: no .pyc files to write, and logs must not
# sit in a buffer when the pod is killed.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/npuswarm/bin:$PATH

# A fixed uid/gid, the one manifests/base/deployment.yaml runs as (runAsNonRoot can only
# check a numeric user).
RUN groupadd --system --gid 10001 npuswarm \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin npuswarm

# Only the wheel enters this stage; its dependencies come from the index, as in
# hack/check-image-install.
COPY --from=builder /dist/ /dist/
RUN python -m venv /opt/npuswarm \
 && /opt/npuswarm/bin/python -m pip install /dist/*.whl \
 && rm -rf /dist \
 && npuswarm --version

USER 10001:10001
ENTRYPOINT ["npuswarm"]
CMD ["--help"]
