"""Host paths as the node sees them, checked by the node agent (docs/node-health.md, "Model
weights and host paths"; docs/security.md, "Host paths").

The agent sees the node's filesystem read-only below a prefix (``/host``). For each path the
operator asks about it resolves symbolic links component by component as the node's kernel
does when Docker mounts the path: a relative target continues from the link's directory, an
absolute target is a *host* path (never the agent's own filesystem), and ``..`` goes up from
the directory reached so far. The moment the resolution would leave the path's allowed root
it stops and reports where it went: nothing outside the allowed roots is ever read. Then a
bounded listing sums the sizes of the regular files below the path (no hashing).
"""

from __future__ import annotations

import os
import posixpath
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from npuswarm.core.hostpolicy import HostRoot, TenantPolicy, is_within, normalise_host_path

# Linux gives up after 40 links in one resolution (ELOOP); so does this.
MAX_LINKS = 40
# A listing stops after this many entries or this long (then ``truncated``): a model of a
# few hundred files is listed whole, a 700 GB tree is not walked for minutes.
MAX_ENTRIES = 20_000
LIST_SECONDS = 1.0


@dataclass(frozen=True)
class Resolution:
    """Where a host path leads: ``path`` (resolved, when it stays in its root), whether it
    exists, and ``escapes``: where the resolution went when it left the root."""

    path: str
    exists: bool
    escapes: str = ""
    error: str = ""


class HostView:
    """The node's filesystem as mounted into the agent below ``prefix`` (host paths in, host
    paths out)."""

    def __init__(self, prefix: str = "/host") -> None:
        self.prefix = prefix.rstrip("/")

    def real(self, host_path: str) -> str:
        return self.prefix + host_path

    def lstat(self, host_path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.real(host_path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def readlink(self, host_path: str) -> str:
        return os.readlink(self.real(host_path))


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def resolve(path: str, root: str, view: HostView) -> Resolution:
    """Resolve ``path`` (normalised, within ``root``) as the host would, never leaving
    ``root``. The root itself is the admin's and taken as it is."""
    current = root
    pending = _parts(posixpath.relpath(path, root)) if path != root else []
    links = 0
    if view.lstat(root) is None:
        return Resolution(path, exists=False)
    while pending:
        part = pending.pop(0)
        if part == "..":
            parent = posixpath.dirname(current)
            if not is_within(parent, root):
                return Resolution(path, False, escapes=_shown(parent, pending))
            current = parent
            continue
        candidate = posixpath.join(current, part)
        found = view.lstat(candidate)
        if found is None:
            return Resolution(posixpath.join(candidate, *pending), exists=False)
        if stat.S_ISLNK(found.st_mode):
            links += 1
            if links > MAX_LINKS:
                return Resolution(path, False, error="too many levels of symbolic links")
            target = view.readlink(candidate)
            if target.startswith("/"):
                # An absolute target is a host path: it stays only if it names the root's
                # own components first (the root is taken as the admin wrote it).
                target_parts = _parts(target)
                root_parts = _parts(root)
                if target_parts[: len(root_parts)] != root_parts:
                    return Resolution(path, False, escapes=_shown("/", target_parts + pending))
                current = root
                pending = target_parts[len(root_parts) :] + pending
            else:
                pending = _parts(target) + pending
            continue
        if pending and not stat.S_ISDIR(found.st_mode):
            return Resolution(posixpath.join(candidate, *pending), exists=False)
        current = candidate
    return Resolution(current, exists=True)


def _shown(at: str, rest: Iterable[str]) -> str:
    """Where an escaping resolution leads, lexically (it is not followed further)."""
    return normalise_host_path(posixpath.join(at, *rest)) if at.startswith("/") else at


@dataclass(frozen=True)
class Listing:
    size: int
    files: int
    truncated: bool


def list_size(
    resolved: str,
    root: str,
    view: HostView,
    max_entries: int = MAX_ENTRIES,
    seconds: float = LIST_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Listing:
    """The regular files below ``resolved`` (or it, if a file): count and bytes. A link in the
    tree counts when it resolves to a file inside ``root`` (a Hugging Face cache's snapshot
    links point into its blobs)."""
    deadline = clock() + seconds
    found = view.lstat(resolved)
    if found is None:
        return Listing(0, 0, False)
    if stat.S_ISREG(found.st_mode):
        return Listing(found.st_size, 1, False)
    size = files = entries = 0
    stack = [resolved]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(view.real(directory)) as listing:
                for entry in listing:
                    entries += 1
                    if entries > max_entries or clock() > deadline:
                        return Listing(size, files, True)
                    host_path = posixpath.join(directory, entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(host_path)
                    elif entry.is_file(follow_symlinks=False):
                        size += entry.stat(follow_symlinks=False).st_size
                        files += 1
                    elif entry.is_symlink():
                        target = resolve(host_path, root, view)
                        linked = view.lstat(target.path) if target.exists else None
                        if linked is not None and stat.S_ISREG(linked.st_mode):
                            size += linked.st_size
                            files += 1
        except OSError:
            continue  # unreadable directory: its files are not counted
    return Listing(size, files, False)


def root_of(path: str, roots: Iterable[str]) -> str | None:
    """The most specific of ``roots`` holding ``path`` (both normalised), as the host policy
    picks it."""
    found = TenantPolicy(host_roots=tuple(HostRoot(r) for r in roots)).root_of(path)
    return found.path if found is not None else None


def check(
    asked: str, roots: Iterable[str], view: HostView, listing: Listing | None = None
) -> dict[str, Any]:
    """One path's answer (core/hostfiles.PathCheck reads it). ``listing``: a size counted
    earlier, to reuse (listing is the slow part; resolution is redone on every request)."""
    path = normalise_host_path(asked)
    root = root_of(path, roots) if path.startswith("/") else None
    if root is None:
        return {"exists": False, "error": "outside the agent's allowed roots"}
    try:
        found = resolve(path, root, view)
    except OSError as error:
        return {"exists": False, "root": root, "error": str(error)}
    answer: dict[str, Any] = {"exists": found.exists, "root": root}
    if found.escapes:
        answer["escapes"] = found.escapes
    if found.error:
        answer["error"] = found.error
    if found.exists and not found.escapes:
        counted = listing or list_size(found.path, root, view)
        answer.update(size=counted.size, files=counted.files, truncated=counted.truncated)
    return answer


class PathChecker:
    """The agent's answers about host paths: resolution on every request (a few lstat calls,
    so a link made since is seen at the next read), listings kept for ``ttl`` seconds."""

    def __init__(
        self,
        roots: Iterable[str],
        view: HostView,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roots = tuple(normalise_host_path(r) for r in roots)
        self.view = view
        self.ttl = ttl
        self.clock = clock
        self._listings: dict[str, tuple[float, Listing]] = {}

    def answer(self, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
        now = self.clock()
        self._listings = {p: v for p, v in self._listings.items() if now - v[0] < self.ttl}
        answers = {}
        for asked in paths:
            kept = self._listings.get(asked)
            found = check(asked, self.roots, self.view, kept[1] if kept else None)
            if kept is None and "size" in found:
                listing = Listing(found["size"], found["files"], found["truncated"])
                self._listings[asked] = (now, listing)
            answers[asked] = found
        return answers
