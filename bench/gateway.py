#!/usr/bin/env python3
"""The ModelGateway's overhead against calling a replica directly: python bench/gateway.py

In one run, on loopback: two fake vLLM replicas of one model (hack/fakevllm/server.py, a
delay per token), and the gateway as it runs in its container (`npuswarm-gateway`: the front
and vllm-router 0.1.17, round_robin) holding both. At each concurrency (1, 16, 128 streams
at once) the same streamed chat requests go once to a replica directly (the two replicas
alternately, so the load per replica is the gateway's) and once through the gateway; for each
request, time to first token (first SSE data chunk) and latency (through [DONE]). Reported:
p50/p99 of both, and the ratio gateway / direct. A third path, vllm-router's own port inside
the gateway (skipping npuswarm's front), tells the router's share from the front's.

Everything shares this machine's cores with the client: the absolute figures are a floor,
the ratio is the point. Results go to bench/results/gateway-<checkout>-<time>.json;
``--report docs/gateway.md`` rewrites that page's benchmark block.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack" / "lib"))
from localrun import free_port, stop_process  # noqa: E402

RESULTS = REPO / "bench" / "results"
SERVER = REPO / "hack" / "fakevllm" / "server.py"
ROOT_KEY = "bench-gateway-root-key-0123456789"
MODEL = "bench-model"
BEGIN, END = "<!-- bench/gateway.py begin -->", "<!-- bench/gateway.py end -->"


def wait_http(url: str, proc: subprocess.Popen[bytes], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)  # polling a child's port until it listens
    raise SystemExit(f"{url} did not answer within {deadline}s")


def start_replica(tmp: Path, index: int, token_delay: float) -> tuple[subprocess.Popen[bytes], str]:
    dev = tmp / f"dev{index}"
    dev.mkdir()
    (dev / "davinci0").write_text("")
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "FAKE_VLLM_DEV_DIR": str(dev),
        "FAKE_VLLM_TOKEN_DELAY_SECONDS": str(token_delay),
        "ASCEND_VISIBLE_DEVICES": str(index),
    }
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "serve", f"org/{MODEL}", "--served-model-name", MODEL,
         "--port", str(port), "--host", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc)
    return proc, url


def start_gateway(tmp: Path, backends: list[str]) -> tuple[subprocess.Popen[bytes], str, str]:
    """The gateway with its secrets written as Swarm would mount them, and one signed push."""
    from npuswarm.gateway.backends import GatewayReplica
    from npuswarm.gateway.credentials import Credentials, GatewayIdentity, write_secret_files
    from npuswarm.gateway.push import PushTarget, Signer, https_sender

    port, admin, router, metrics = (free_port() for _ in range(4))
    credentials, who = Credentials(ROOT_KEY, "bench"), GatewayIdentity("bench", "gw")
    credential = write_secret_files(tmp / "secrets", credentials, who, datetime.now(UTC))
    binary = Path(sys.executable).with_name("npuswarm-gateway")
    proc = subprocess.Popen(
        [str(binary), "--port", str(port), "--admin-port", str(admin), "--router-port", str(router),
         "--metrics-port", str(metrics), "--policy", "round_robin",
         "--secrets-dir", str(tmp / "secrets")],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc)
    target = PushTarget(GatewayReplica("local", "127.0.0.1", admin, ""), who.hostname, credential)
    https_sender(credentials, Signer())(target, {MODEL: backends})
    return proc, url, f"http://127.0.0.1:{router}"


async def one_stream(session: aiohttp.ClientSession, url: str, tokens: int) -> tuple[float, float]:
    """(time to first token, latency) of one streamed chat completion, in seconds."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": tokens}
    started = time.perf_counter()
    first = None
    async with session.post(f"{url}/v1/chat/completions", json=body) as answer:
        if answer.status != 200:
            raise RuntimeError(f"{url}: {answer.status} {await answer.text()}")
        async for line in answer.content:
            if line.startswith(b"data: "):
                if first is None:
                    first = time.perf_counter() - started
                if line.startswith(b"data: [DONE]"):
                    break
    assert first is not None
    return first, time.perf_counter() - started


async def level(urls: list[str], concurrency: int, requests: int, tokens: int) -> dict[str, Any]:
    """``requests`` streams, ``concurrency`` at a time, spread round-robin over ``urls``."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    queue = list(range(requests))
    samples: list[tuple[float, float]] = []
    failures = 0

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal failures
            while queue:
                index = queue.pop()
                try:
                    samples.append(await one_stream(session, urls[index % len(urls)], tokens))
                except (TimeoutError, aiohttp.ClientError, RuntimeError):
                    failures += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    ttft = sorted(s[0] for s in samples)
    latency = sorted(s[1] for s in samples)
    return {
        "requests": len(samples),
        "failures": failures,
        "wall_seconds": wall,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "latency_p50": percentile(latency, 50),
        "latency_p99": percentile(latency, 99),
    }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if len(values) > 1 else values[0]


def checkout() -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "operator"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def table(result: dict[str, Any]) -> str:
    lines = [
        "| streams | path | requests | TTFT p50 | TTFT p99 | latency p50 | latency p99 |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = ["", "Gateway / direct (router alone / direct in brackets):", "",
              "| streams | TTFT p50 | TTFT p99 | latency p50 | latency p99 |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for row in result["levels"]:
        for path in ("direct", "router", "gateway"):
            r = row[path]
            lines.append(
                f"| {row['concurrency']} | {path} | {r['requests']} ({r['failures']} failed) "
                f"| {r['ttft_p50'] * 1000:.1f} ms | {r['ttft_p99'] * 1000:.1f} ms "
                f"| {r['latency_p50'] * 1000:.1f} ms | {r['latency_p99'] * 1000:.1f} ms |"
            )
        d, g, r = row["direct"], row["gateway"], row["router"]
        cells = [
            f"x{g[k] / d[k]:.2f} (x{r[k] / d[k]:.2f})"
            for k in ("ttft_p50", "ttft_p99", "latency_p50", "latency_p99")
        ]
        ratios.append(f"| {row['concurrency']} | " + " | ".join(cells) + " |")
    head = (
        f"Run {result['time']} on checkout {result['checkout']} ({result['machine']}): "
        f"{result['tokens']} tokens per stream, {result['token_delay'] * 1000:.0f} ms per token, "
        "2 fake vLLM replicas, round_robin; direct: a replica itself (alternately), router: "
        "vllm-router's port in the gateway, gateway: the gateway's port (front + router)."
    )
    return "\n".join([head, "", *lines, *ratios])


def report(path: Path, result: dict[str, Any]) -> None:
    text = path.read_text()
    block = f"{BEGIN}\n{table(result)}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,16,128", help="concurrent streams")
    parser.add_argument("--rounds", type=int, default=4, help="requests per stream slot")
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--report", type=Path, help="rewrite this page's benchmark block")
    args = parser.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            replicas = [start_replica(Path(tmp), i, args.token_delay) for i in range(2)]
            procs += [p for p, _ in replicas]
            direct = [u for _, u in replicas]
            gateway_proc, gateway, router = start_gateway(Path(tmp), direct)
            procs.append(gateway_proc)
            asyncio.run(level([gateway], 4, 8, args.tokens))  # warm both paths up
            asyncio.run(level(direct, 4, 8, args.tokens))
            rows = []
            for concurrency in levels:
                requests = max(20, concurrency * args.rounds)
                row = {"concurrency": concurrency}
                row["direct"] = asyncio.run(level(direct, concurrency, requests, args.tokens))
                row["gateway"] = asyncio.run(level([gateway], concurrency, requests, args.tokens))
                row["router"] = asyncio.run(level([router], concurrency, requests, args.tokens))
                rows.append(row)
                print(f"{concurrency:4d} streams: direct TTFT p50 {row['direct']['ttft_p50'] * 1000:.1f} ms, "
                      f"gateway {row['gateway']['ttft_p50'] * 1000:.1f} ms", file=sys.stderr)
    finally:
        for proc in procs:
            stop_process(proc, grace=30)
    result = {
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "checkout": checkout(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "tokens": args.tokens,
        "token_delay": args.token_delay,
        "levels": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M")
    (RESULTS / f"gateway-{result['checkout']}-{stamp}.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    if args.report:
        report(args.report, result)


if __name__ == "__main__":
    main()
