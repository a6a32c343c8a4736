#!/usr/bin/python3
"""The Debian base of every image the project builds: the fake vLLM image and the operator.

There is no registry here, so no base image can be pulled. This makes one instead: Debian
bookworm `--variant=essential` plus Python (python3, its venv module, and passwd for the
operator's user), made by mmdebstrap from the host's apt sources, so nothing outside the
configured package registries is contacted.

Cached under ${NPUSWARM_CACHE:-$HOME/.cache/npuswarm}/base/, keyed by the recipe below (suite,
packages, excludes; mmdebstrap takes minutes and must not rerun when only a payload changes):
- base-<key>.tar: the root filesystem (the fake vLLM image appends its files to a copy);
- the Docker image npuswarm/debian-python:<key>, `docker import`ed from it (the operator's
  Dockerfile builds on it: `BASE_IMAGE`).

Usage: hack/build-base-image [--tarball | --image | --print-key]
  --tarball    print the rootfs tarball's path (built if missing)
  --image      print the Docker image's name (built and imported if missing; the default)
  --print-key  print the cache key
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SUITE = "bookworm"
# python3 (not python3-minimal): http.server, json and urllib live in libpython3.11-stdlib.
# python3-venv: the operator's Dockerfile installs into a venv; passwd: its useradd.
PACKAGES = ["python3", "python3-venv", "passwd"]
IMAGE = "npuswarm/debian-python"
EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*"]
# Without a merged /usr, apt satisfies init-system-helpers with usrmerge, which drags in 50 MB
# of perl that every image would carry; this hook merges /usr up front.
HOOK_DIR = "/usr/share/mmdebstrap/hooks/merged-usr"
# Debian's apt sources files on the host; the image uses the same mirrors.
HOST_SOURCES = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]


def cache_dir() -> Path:
    root = os.environ.get("NPUSWARM_CACHE") or os.path.join(Path.home(), ".cache", "npuswarm")
    return Path(root) / "base"


def digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def key() -> str:
    return digest([repr((SUITE, PACKAGES, EXCLUDES, HOOK_DIR)).encode()])


def log(msg: str) -> None:
    print(f"baseimage: {msg}", file=sys.stderr, flush=True)


def host_sources() -> Path:
    for path in HOST_SOURCES:
        if path.is_file() and path.stat().st_size > 0:
            return path
    sys.exit("baseimage: no Debian apt sources file found in " + ", ".join(map(str, HOST_SOURCES)))


def _mmdebstrap(dest: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        sys.exit("baseimage: mmdebstrap is missing: apt-get install -y mmdebstrap")
    tmp = dest.with_suffix(".tmp.tar")
    cmd = [
        "mmdebstrap",
        "--variant=essential",
        "--include=" + ",".join(PACKAGES),
        f"--hook-dir={HOOK_DIR}",
        *[f"--dpkgopt=path-exclude={p}" for p in EXCLUDES],
        "--quiet",
        SUITE,
        str(tmp),
        str(host_sources()),
    ]
    log("running " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    tmp.rename(dest)


def _locked(directory: Path) -> int:
    """An exclusive lock on the cache: concurrent builds (test sessions, lab bring-ups)
    wait for one another instead of running mmdebstrap twice."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_CREAT | os.O_WRONLY, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_stale(directory: Path, prefix: str, keep: Path) -> None:
    for old in directory.glob(prefix + "*.tar"):
        if old != keep:
            old.unlink(missing_ok=True)


def tarball() -> Path:
    """The base root filesystem as a tarball, built once per key."""
    directory = cache_dir()
    fd = _locked(directory)
    try:
        path = directory / f"base-{key()}.tar"
        if not path.exists():
            _mmdebstrap(path)
            remove_stale(directory, "base-", path)
        return path
    finally:
        os.close(fd)


def image(docker: str = "docker") -> str:
    """The base as a local Docker image, imported once per key."""
    name = f"{IMAGE}:{key()}"
    present = subprocess.run([docker, "image", "inspect", name], capture_output=True, check=False)
    if present.returncode == 0:
        return name
    path = tarball()
    fd = _locked(cache_dir())
    try:
        again = subprocess.run([docker, "image", "inspect", name], capture_output=True, check=False)
        if again.returncode != 0:
            log(f"importing {path} as {name}")
            subprocess.run(
                [docker, "import", "--change", "CMD [\"/bin/bash\"]", str(path), name],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        return name
    finally:
        os.close(fd)


def main() -> None:
    args = sys.argv[1:] or ["--image"]
    if args == ["--print-key"]:
        print(key())
    elif args == ["--tarball"]:
        print(tarball())
    elif args == ["--image"]:
        print(image(os.environ.get("DOCKER", "docker")))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
