# The npuswarm operator image: `hack/build-image`. Its build context holds only wheels/:
# npuswarm's wheel and every dependency's, which hack/build-image makes on the build machine
# with `pip wheel .`, so the build itself needs no network and no package index.
# BASE_IMAGE is any Debian-like image with python3.11 and its venv module; CI uses the one
# hack/lib/baseimage.py makes (no registry here to pull python:3.11-slim from).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY wheels/ /wheels/
# pip compiles every module to .pyc here: at run time the root filesystem is read-only, and
# without them each start would compile the kubernetes client anew. pip and setuptools go
# once they have installed: nothing installs anything at run time.
RUN python3 -m venv /opt/npuswarm \
 && /opt/npuswarm/bin/python -m pip install --no-index --find-links /wheels npuswarm \
 && /opt/npuswarm/bin/python -m pip check \
 && /opt/npuswarm/bin/python -m pip uninstall --quiet --yes pip setuptools

FROM ${BASE_IMAGE}
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
    PATH=/opt/npuswarm/bin:$PATH

# A fixed uid/gid, the one manifests/base/deployment.yaml runs as (runAsNonRoot can only
# check a numeric user).
RUN groupadd --system --gid 10001 npuswarm \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin npuswarm

# Only the installed venv enters the final image, not the wheels it came from.
COPY --from=install /opt/npuswarm /opt/npuswarm
RUN npuswarm --version

USER 10001:10001
ENTRYPOINT ["npuswarm"]
CMD ["--help"]
