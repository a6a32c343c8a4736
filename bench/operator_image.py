"""The operator image: its size, and how long it takes from `docker run` to an answering
liveness endpoint, run as the Deployment runs it (hack/lib/operatorimage.py) against a local
control plane with the ServiceAccount's token.

    python bench/operator_image.py [--image npuswarm:<key>] [--runs 3]

Without --image it builds (or reuses) the image of this checkout with hack/build-image.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack" / "lib"))

import controlplane  # noqa: E402
import operatorimage  # noqa: E402
from localrun import free_port, stop_process  # noqa: E402


def seconds_to_live(image: str, plane: controlplane.ControlPlane, sa_dir: Path) -> float:
    health = f"http://127.0.0.1:{free_port()}/healthz"
    name = f"npuswarm-bench-{uuid.uuid4().hex[:6]}"
    env = {"DOCKER_HOST": "tcp://127.0.0.1:9", "NPUSWARM_METRICS_PORT": str(free_port())}
    argv = operatorimage.docker_run_args(
        image, name, plane.server, sa_dir, env, ["run", "--standalone", f"--liveness={health}"]
    )
    began = time.monotonic()
    proc = subprocess.Popen(["docker", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(health, timeout=1):
                    return time.monotonic() - began
            except OSError:
                if proc.poll() is not None or time.monotonic() - began > 120:
                    raise SystemExit(f"{image} did not answer on {health}") from None
                time.sleep(0.05)  # poll interval; the 120 s deadline bounds the wait
    finally:
        stop_process(proc, grace=60)
        subprocess.run(["docker", "rm", "--force", name], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    image = args.image or subprocess.run(
        [str(REPO / "hack" / "build-image")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    size = int(subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", image],
                              capture_output=True, text=True, check=True).stdout)
    print(f"{platform.machine()}, {platform.python_version()}; {image}: {size / 1e6:.0f} MB")
    with tempfile.TemporaryDirectory() as tmp, controlplane.running(Path(tmp) / "cp") as plane:
        def kubectl(*argv: str) -> str:
            command = [str(plane.kubectl), "--kubeconfig", str(plane.kubeconfig), *argv]
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout

        kubectl("apply", "-k", str(REPO / "manifests"))
        token = kubectl("-n", operatorimage.NAMESPACE, "create", "token", "npuswarm").strip()
        sa_dir = operatorimage.service_account_dir(Path(tmp) / "sa", token, plane.ca_file)
        for run in range(args.runs):
            print(f"run {run}: /healthz answered {seconds_to_live(image, plane, sa_dir):.2f} s "
                  "after docker run")


if __name__ == "__main__":
    main()
