#!/usr/bin/python3
"""Run the operator image against a local control plane the way a pod of the Deployment runs.

As in the pod (manifests/base/deployment.yaml): uid/gid 10001, a read-only root filesystem
with a writable /tmp, no capabilities, no privilege escalation, the ServiceAccount's token
and the cluster CA at /var/run/secrets/kubernetes.io/serviceaccount/ and
KUBERNETES_SERVICE_HOST/PORT set, so kopf logs in with in-cluster config and the shipped RBAC
is what authorises it. The container shares the host's network: the control plane listens on
127.0.0.1, and the liveness and metrics ports are the host's.

Used by the e2e tests (tests/e2e/conftest.py) and hack/demo:

  hack/operator-image run --image IMG --name NAME --server https://127.0.0.1:PORT \
      --ca CA.crt --token-file TOKEN --state DIR [--docker-socket PATH] [-e K=V ...] -- ARGS...

`run` stays in the foreground like `docker run` (a signal to it stops the container).
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from pathlib import Path
from urllib.parse import urlsplit

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
UID = 10001
NAMESPACE = "npuswarm-system"


def service_account_dir(where: Path, token: str, ca_file: Path, namespace: str = NAMESPACE) -> Path:
    """The files the kubelet projects into a pod: token, ca.crt, namespace. Readable by the
    container's user (the folder is bind-mounted itself, so its parents' modes do not matter)."""
    where.mkdir(parents=True, exist_ok=True)
    where.chmod(0o755)
    (where / "token").write_text(token)
    shutil.copyfile(ca_file, where / "ca.crt")
    (where / "namespace").write_text(namespace)
    for name in ("token", "ca.crt", "namespace"):
        (where / name).chmod(0o444)
    return where


def docker_run_args(
    image: str,
    name: str,
    server: str,
    sa_dir: Path,
    env: dict[str, str],
    args: list[str],
    docker_socket: Path | None = None,
) -> list[str]:
    """`docker run` arguments (after `docker`) for the operator as the Deployment runs it."""
    url = urlsplit(server)
    assert url.hostname and url.port, f"expected https://HOST:PORT, got {server}"
    argv = [
        "run", "--rm", "--name", name,
        "--network", "host",
        "--user", f"{UID}:{UID}",
        "--read-only", "--tmpfs", "/tmp:size=64m",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--volume", f"{sa_dir}:{SA_MOUNT}:ro",
        "--env", f"KUBERNETES_SERVICE_HOST={url.hostname}",
        "--env", f"KUBERNETES_SERVICE_PORT={url.port}",
        "--env", "HOME=/tmp",
        "--env", f"POD_ID={name}",
    ]
    if docker_socket is not None:
        # The socket's group, as a Docker socket is usually shared: the user stays 10001.
        gid = os.stat(docker_socket).st_gid
        argv += ["--volume", f"{docker_socket}:/var/run/docker.sock",
                 "--group-add", str(gid), "--env", "DOCKER_HOST=unix:///var/run/docker.sock"]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    return [*argv, image, *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--image", required=True)
    run.add_argument("--name", required=True)
    run.add_argument("--server", required=True)
    run.add_argument("--ca", required=True, type=Path)
    run.add_argument("--token-file", required=True, type=Path)
    run.add_argument("--state", required=True, type=Path, help="folder for the token files")
    run.add_argument("--docker-socket", type=Path)
    run.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    run.add_argument("args", nargs="*")
    options = parser.parse_args()
    if options.docker_socket is not None and not stat.S_ISSOCK(os.stat(options.docker_socket).st_mode):
        sys.exit(f"operatorimage: {options.docker_socket} is not a socket")
    sa_dir = service_account_dir(
        options.state / "serviceaccount", options.token_file.read_text().strip(), options.ca
    )
    env = dict(item.split("=", 1) for item in options.env)
    argv = docker_run_args(options.image, options.name, options.server, sa_dir, env,
                           options.args, options.docker_socket)
    docker = os.environ.get("DOCKER", "docker")
    os.execvp(docker, [docker, *argv])


if __name__ == "__main__":
    main()
