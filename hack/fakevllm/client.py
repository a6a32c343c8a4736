#!/usr/bin/python3
"""A tiny HTTP client for a "client container" on a lab overlay network (stdlib only).

Sends COUNT successful GETs to URL (retrying connection errors and non-2xx answers until
TIMEOUT, since a freshly started replica may not answer yet) and prints one JSON line per
attempt: the addresses the host name resolved to, the status, the X-Fake-Vllm-Npus header
and the body. The last line is a summary: {"summary": {...}}. Exit code 0 when COUNT
requests succeeded, 1 otherwise.

Usage: fakevllm-client [--count N] [--timeout SECONDS] URL
"""

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

RETRY_PAUSE = 0.2


def resolve(url: str) -> list[str]:
    parts = urllib.parse.urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return [f"unresolved: {exc}"]
    return sorted({info[4][0] for info in infos})


def attempt(url: str) -> dict:
    result = {"addresses": resolve(url)}
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode(errors="replace")
            result.update(status=resp.status, npus=resp.headers.get("X-Fake-Vllm-Npus"))
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        result.update(status=exc.code, npus=exc.headers.get("X-Fake-Vllm-Npus"))
    except OSError as exc:
        return {**result, "error": str(exc)}
    try:
        result["body"] = json.loads(body)
    except ValueError:
        result["body"] = body
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="fakevllm-client")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("url")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    ok = attempts = 0
    hostnames: set[str] = set()
    while ok < args.count and time.monotonic() < deadline:
        result = attempt(args.url)
        attempts += 1
        print(json.dumps(result), flush=True)
        if 200 <= result.get("status", 0) < 300:
            ok += 1
            hostnames.add(json.loads(result["npus"] or "{}").get("hostname", ""))
        else:
            time.sleep(RETRY_PAUSE)  # back-off between polls of a server that is not up yet
    summary = {"ok": ok, "attempts": attempts, "hostnames": sorted(hostnames)}
    print(json.dumps({"summary": summary}), flush=True)
    return 0 if ok >= args.count else 1


if __name__ == "__main__":
    sys.exit(main())
