"""A stand-in for `vllm serve` on Ascend NPUs, for the lab and tests (stdlib only).

It speaks enough of vLLM's OpenAI-compatible API and metrics for npuswarm to be tested
without NPUs, and it checks the thing npuswarm is responsible for: that the task really got
the NPUs it needs (/dev/davinciN inside the container, put there by the Ascend Docker
Runtime from ASCEND_VISIBLE_DEVICES). Like the real server, it refuses to start without them.

Usage: vllm serve MODEL [--served-model-name NAME] [--tensor-parallel-size N] [--port P]
                        [--host H] [--enable-expert-parallel] [--max-model-len L] [...]
Unknown options are ignored, as in specs written for the real vllm-ascend image.

Environment that tests use to steer it:
  FAKE_VLLM_DEV_DIR              where to look for davinciN devices (default /dev)
  FAKE_VLLM_LOAD_SECONDS         simulated model load time before /health is 200 (default 0)
  FAKE_VLLM_CRASH_AFTER_SECONDS  exit with code 1 this long after start
  FAKE_VLLM_LATENCY_SECONDS      time each completion takes, so requests are seen running
  FAKE_VLLM_TOKEN_DELAY_SECONDS  time between two generated tokens (a stream's chunks arrive
                                 this far apart; default 0)
  FAKE_VLLM_DRAIN_SECONDS        on SIGTERM, stop accepting and let requests under way finish
                                 for at most this long, as vLLM's server does (default 30)
"""

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.9.2+fake"
CANNED_TEXT = "This is a canned answer from the fake vLLM server."
CONTROL_DEVICES = ("davinci_manager", "devmm_svm", "hisi_hdc")
# vLLM's own bucket bounds for vllm:e2e_request_latency_seconds.
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
# vLLM's bucket bounds for vllm:time_to_first_token_seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
DEVICE_RE = re.compile(r"^davinci(\d+)$")


class StartupError(Exception):
    """The server cannot run on what it was given; the message says why."""


def log(msg: str) -> None:
    print(f"fake-vllm: {msg}", file=sys.stderr, flush=True)


def normalize_option(arg: str) -> str:
    """vLLM accepts --foo_bar as --foo-bar; so does the fake."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm", description="fake vLLM for npuswarm tests")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--served-model-name", nargs="+")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--enable-expert-parallel", action="store_true")
    serve.add_argument("--max-model-len", type=int)
    args, ignored = parser.parse_known_args([normalize_option(a) for a in argv])
    args.ignored = ignored
    return args


def find_devices(dev_dir: str) -> list[int]:
    try:
        names = os.listdir(dev_dir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(DEVICE_RE.match, names) if m)


def parse_id_list(text: str) -> list[int]:
    """ASCEND_*_VISIBLE_DEVICES forms: `0`, `1,3`, `0-2,4`."""
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


def check_npus(devices: list[int], tensor_parallel_size: int, dev_dir: str, env) -> None:
    """Fail like vllm-ascend does when the NPUs it was promised are not there."""
    if not devices:
        raise StartupError(
            f"no Ascend NPU found: no davinciN device in {dev_dir}; the container must be started "
            "by the Ascend Docker Runtime with ASCEND_VISIBLE_DEVICES set "
            f"(ASCEND_VISIBLE_DEVICES={env.get('ASCEND_VISIBLE_DEVICES', '<unset>')})"
        )
    usable = len(devices)
    rt_visible = env.get("ASCEND_RT_VISIBLE_DEVICES")
    if rt_visible:
        try:
            ordinals = parse_id_list(rt_visible)
        except ValueError:
            raise StartupError(f"cannot parse ASCEND_RT_VISIBLE_DEVICES={rt_visible!r}") from None
        bad = [i for i in ordinals if i >= len(devices)]
        if bad:
            raise StartupError(
                f"invalid device ordinal {bad[0]} in ASCEND_RT_VISIBLE_DEVICES={rt_visible}: "
                f"the container sees {len(devices)} NPU(s), numbered 0..{len(devices) - 1}, "
                "not by their host ids"
            )
        usable = len(ordinals)
    if usable < tensor_parallel_size:
        names = ",".join(f"davinci{d}" for d in devices)
        raise StartupError(
            f"--tensor-parallel-size {tensor_parallel_size} needs {tensor_parallel_size} NPUs "
            f"but only {usable} usable: {names} in {dev_dir}"
            + (f" (ASCEND_RT_VISIBLE_DEVICES={rt_visible})" if rt_visible else "")
        )


class Metrics:
    """vLLM's metric names, so dashboards and scrapers can be tested against the fake."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = 0
        self.bucket_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_counts[i] += 1

    def start(self) -> None:
        with self.lock:
            self.running += 1

    def finish(self, prompt_tokens: int, generation_tokens: int, seconds: float) -> None:
        with self.lock:
            self.running -= 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            self.success += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.bucket_counts[i] += 1

    def render(self, model_name: str) -> str:
        label = 'model_name="{}"'.format(model_name.replace("\\", "\\\\").replace('"', '\\"'))
        with self.lock:
            lines = [
                "# HELP vllm:num_requests_running Number of requests currently running.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{label}}} {self.running}",
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{label}}} 0",
                "# HELP vllm:gpu_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:gpu_cache_usage_perc gauge",
                f"vllm:gpu_cache_usage_perc{{{label}}} {min(1.0, self.running / 10):.2f}",
                "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
                "# TYPE vllm:prompt_tokens_total counter",
                f"vllm:prompt_tokens_total{{{label}}} {self.prompt_tokens}",
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total{{{label}}} {self.generation_tokens}",
                "# HELP vllm:request_success_total Count of successfully processed requests.",
                "# TYPE vllm:request_success_total counter",
                f'vllm:request_success_total{{finished_reason="stop",{label}}} {self.success}',
                "# HELP vllm:e2e_request_latency_seconds Histogram of end to end request latency "
                "in seconds.",
                "# TYPE vllm:e2e_request_latency_seconds histogram",
            ]
            lines += histogram_lines(
                "vllm:e2e_request_latency_seconds",
                LATENCY_BUCKETS,
                self.bucket_counts,
                self.latency_count,
                self.latency_sum,
                label,
            )
            lines += [
                "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in "
                "seconds.",
                "# TYPE vllm:time_to_first_token_seconds histogram",
            ]
            lines += histogram_lines(
                "vllm:time_to_first_token_seconds",
                TTFT_BUCKETS,
                self.ttft_counts,
                self.ttft_count,
                self.ttft_sum,
                label,
            )
        return "\n".join(lines) + "\n"


def histogram_lines(
    name: str,
    bounds: tuple[float, ...],
    counts: list[int],
    count: int,
    total: float,
    label: str,
) -> list[str]:
    """A histogram's samples in Prometheus' text format, as vLLM exposes them."""
    lines = [
        f'{name}_bucket{{le="{bound}",{label}}} {n}'
        for bound, n in zip(bounds, counts, strict=False)
    ]
    return lines + [
        f'{name}_bucket{{le="+Inf",{label}}} {count}',
        f"{name}_count{{{label}}} {count}",
        f"{name}_sum{{{label}}} {total}",
    ]


class FakeVllm:
    """State shared by the request handlers of one server."""

    def __init__(self, args: argparse.Namespace, env, devices: list[int], dev_dir: str) -> None:
        self.model = args.model
        self.served_name = (args.served_model_name or [args.model])[0]
        self.served_names = args.served_model_name or [args.model]
        self.args = args
        self.env = env
        self.devices = devices
        self.dev_dir = dev_dir
        self.started = time.time()
        self.ready_at = self.started + float(env.get("FAKE_VLLM_LOAD_SECONDS") or 0)
        self.latency = float(env.get("FAKE_VLLM_LATENCY_SECONDS") or 0)
        self.token_delay = float(env.get("FAKE_VLLM_TOKEN_DELAY_SECONDS") or 0)
        self.drain_seconds = float(env.get("FAKE_VLLM_DRAIN_SECONDS") or 30)
        self.metrics = Metrics()
        # Connections being served (the server speaks HTTP/1.0: one request each).
        self.connections = 0
        self.idle = threading.Condition()

    def serving(self, delta: int) -> None:
        with self.idle:
            self.connections += delta
            self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once no connection is being served, False if ``timeout`` passed first."""
        with self.idle:
            return self.idle.wait_for(lambda: self.connections == 0, timeout=timeout)

    def ready(self) -> bool:
        return time.time() >= self.ready_at

    def npus(self) -> dict:
        return {
            "hostname": socket.gethostname(),
            "devices": [f"davinci{d}" for d in self.devices],
            "control_devices": [
                n for n in CONTROL_DEVICES if os.path.exists(os.path.join(self.dev_dir, n))
            ],
            "ASCEND_VISIBLE_DEVICES": self.env.get("ASCEND_VISIBLE_DEVICES"),
            "ASCEND_RT_VISIBLE_DEVICES": self.env.get("ASCEND_RT_VISIBLE_DEVICES"),
            "ASCEND_DOCKER_RUNTIME": self.env.get("ASCEND_DOCKER_RUNTIME"),
            "DOCKER_RESOURCE_NPU": self.env.get("DOCKER_RESOURCE_NPU"),
            "tensor_parallel_size": self.args.tensor_parallel_size,
            "enable_expert_parallel": self.args.enable_expert_parallel,
            "served_model_name": self.served_name,
            "model": self.model,
            "pid": os.getpid(),
        }

    def npus_header(self) -> str:
        info = self.npus()
        keys = ("hostname", "devices", "ASCEND_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES")
        return json.dumps({k: info[k] for k in keys}, separators=(",", ":"))

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": int(self.started),
                    "owned_by": "vllm",
                    "root": self.model,
                    "parent": None,
                    "max_model_len": self.args.max_model_len,
                }
                for name in self.served_names
            ],
        }


def count_tokens(value) -> int:
    if isinstance(value, list):
        return sum(count_tokens(v) for v in value)
    if isinstance(value, dict):
        return count_tokens(value.get("content", ""))
    return len(str(value).split())


def canned_tokens(max_tokens) -> list[str]:
    words = CANNED_TEXT.split()
    if isinstance(max_tokens, int) and max_tokens > 0:
        words = words[:max_tokens]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-vllm/" + VERSION
    app: FakeVllm  # set on the subclass made by make_handler

    def log_message(self, format, *args):
        pass  # tests poll often; an access log line per poll would drown the useful output

    def handle(self):
        self.app.serving(+1)
        try:
            super().handle()
        finally:
            self.app.serving(-1)

    # --- plumbing -------------------------------------------------------------------------
    def send_json(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Fake-Vllm-Npus", self.app.npus_header())
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, kind: str) -> None:
        self.send_json(
            status,
            {"object": "error", "message": message, "type": kind, "param": None, "code": status},
        )

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as exc:
            self.send_error_json(400, f"invalid JSON body: {exc}", "BadRequestError")
            return None

    def not_ready(self) -> bool:
        if self.app.ready():
            return False
        self.send_error_json(503, "model is still loading", "ServiceUnavailableError")
        return True

    # --- routes ---------------------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if not self.not_ready():
                self.send_json(200, {})
        elif path == "/npus":
            self.send_json(200, self.app.npus())
        elif path == "/version":
            self.send_json(200, {"version": VERSION})
        elif path == "/metrics":
            self.send_metrics()
        elif path == "/v1/models":
            if not self.not_ready():
                self.send_json(200, self.app.models())
        else:
            self.send_error_json(404, f"no route {path}", "NotFoundError")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path == "/fake/crash":
            self.crash()
        elif path in ("/v1/completions", "/v1/chat/completions"):
            if not self.not_ready():
                self.complete(chat=path.endswith("chat/completions"))
        else:
            self.send_error_json(404, f"no route {path}", "NotFoundError")

    def send_metrics(self) -> None:
        data = self.app.metrics.render(self.app.served_name).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Fake-Vllm-Npus", self.app.npus_header())
        self.end_headers()
        self.wfile.write(data)

    def crash(self) -> None:
        body = self.read_json()
        code = int((body or {}).get("exit_code", 1))
        self.send_json(200, {"crashing": True, "exit_code": code})
        self.wfile.flush()
        log(f"crashing on request (POST /fake/crash), exit code {code}")
        os._exit(code)

    def complete(self, chat: bool) -> None:
        request = self.read_json()
        if request is None:
            return
        model = request.get("model", self.app.served_name)
        if model not in self.app.served_names:
            self.send_error_json(404, f"The model `{model}` does not exist.", "NotFoundError")
            return
        prompt_tokens = count_tokens(request.get("messages" if chat else "prompt", ""))
        tokens = canned_tokens(request.get("max_tokens"))
        self.app.metrics.start()
        began = time.time()
        try:
            if self.app.latency:
                time.sleep(self.app.latency)  # simulated inference time, not synchronisation
            if request.get("stream"):
                self.stream(chat, model, tokens, began)
            else:
                self.app.metrics.first_token(time.time() - began)
                # simulated decoding time, not synchronisation
                time.sleep(self.app.token_delay * max(0, len(tokens) - 1))
                self.send_json(200, self.completion_body(chat, model, tokens, prompt_tokens))
        finally:
            self.app.metrics.finish(prompt_tokens, len(tokens), time.time() - began)

    def completion_body(
        self, chat: bool, model: str, tokens: list[str], prompt_tokens: int
    ) -> dict:
        text = "".join(tokens)
        choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
        choice.update(
            {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        )
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }

    def stream(self, chat: bool, model: str, tokens: list[str], began: float) -> None:
        """Server-sent events as vLLM sends them: one chunk per token, each written and
        flushed as it is made (FAKE_VLLM_TOKEN_DELAY_SECONDS apart), then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Fake-Vllm-Npus", self.app.npus_header())
        self.end_headers()
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        for i, token in enumerate(tokens):
            if i == 0:
                self.app.metrics.first_token(time.time() - began)
            elif self.app.token_delay:
                time.sleep(self.app.token_delay)  # simulated decoding time per token
            last = i == len(tokens) - 1
            choice = {"index": 0, "finish_reason": "stop" if last else None, "logprobs": None}
            choice.update(
                {"delta": {"role": "assistant", "content": token}} if chat else {"text": token}
            )
            chunk = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
            }
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def make_handler(app: FakeVllm) -> type[Handler]:
    return type("BoundHandler", (Handler,), {"app": app})


def arm_crash_timer(env) -> None:
    seconds = env.get("FAKE_VLLM_CRASH_AFTER_SECONDS")
    if not seconds:
        return

    def crash() -> None:
        log(f"crashing as asked by FAKE_VLLM_CRASH_AFTER_SECONDS={seconds}")
        os._exit(1)

    timer = threading.Timer(float(seconds), crash)
    timer.daemon = True
    timer.start()


def drain_and_exit(server: ThreadingHTTPServer, app: FakeVllm) -> None:
    """Stop accepting, let the connections under way finish, exit 0. serve_forever must be
    stopped from another thread than the one running it (the signal arrives on that one)."""

    def drain() -> None:
        server.shutdown()
        server.server_close()  # new connections are refused from now on
        finished = app.wait_idle(app.drain_seconds)
        log("stopping" + ("" if finished else f": requests still running after {app.drain_seconds}s"))
        os._exit(0)

    threading.Thread(target=drain, daemon=True).start()


def serve(args: argparse.Namespace, env) -> None:
    dev_dir = env.get("FAKE_VLLM_DEV_DIR") or "/dev"
    devices = find_devices(dev_dir)
    check_npus(devices, args.tensor_parallel_size, dev_dir, env)
    app = FakeVllm(args, env, devices, dev_dir)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(app))
    server.daemon_threads = True
    # As PID 1 in a container, SIGTERM is ignored unless handled: handle it so that
    # `docker service rm` and updates do not wait for the kill timeout, and, like vLLM's
    # server, let requests under way finish first (a rolling update must fail none).
    signal.signal(signal.SIGTERM, lambda *_: drain_and_exit(server, app))
    arm_crash_timer(env)
    log(
        f"serving {app.served_name} (model {app.model}) on {args.host}:{args.port}, "
        f"tensor parallel {args.tensor_parallel_size}, NPUs {app.npus()['devices']}"
        + (f", ignoring {' '.join(args.ignored)}" if args.ignored else "")
    )
    server.serve_forever()
    threading.Event().wait()  # the drain thread ends the process


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        serve(args, os.environ)
    except StartupError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
