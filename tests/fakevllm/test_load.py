"""Load as vLLM shows it, for autoscaling: a bounded number of running requests per engine,
a FIFO queue for the others, and the gauges and counters under vLLM's names.

Requests are held by the server (FAKE_VLLM_HOLD) and let go by the test (POST
/fake/release), so "while they run" is a state the test controls, not a race with a timer.
"""

import json
import socket
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for

SERVE = ["org/model-7b", "--served-model-name", "model-7b"]
ASK = {"model": "model-7b", "prompt": "one two", "max_tokens": 2}
HOLD = {"FAKE_VLLM_HOLD": "1"}
# Held requests wait for the test; the client waits longer than any test holds them.
CLIENT_TIMEOUT = 60


def samples(server) -> dict[tuple[str, str], float]:
    """{(sample name, engine): value} of the model's samples without buckets, parsed by the
    Prometheus client's own parser."""
    text = server.request("/metrics").body.decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "le" not in sample.labels and sample.labels["model_name"] == "model-7b":
                found[sample.name, sample.labels["engine"]] = sample.value
    return found


def load(server, engine: str = "0") -> tuple[float, float]:
    """(running, waiting) of one engine."""
    found = samples(server)
    return (
        found["vllm:num_requests_running", engine],
        found["vllm:num_requests_waiting", engine],
    )


class Clients:
    """Requests sent from threads; answers recorded in the order they came."""

    def __init__(self, server) -> None:
        self.server = server
        self.lock = threading.Lock()
        self.answers: dict = {}
        self.order: list = []
        self.threads: list[threading.Thread] = []

    def send(self, name, body=ASK) -> None:
        def run() -> None:
            answer = self.server.request("/v1/completions", body, timeout=CLIENT_TIMEOUT)
            with self.lock:
                self.answers[name] = answer
                self.order.append(name)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def answered(self) -> list:
        with self.lock:
            return list(self.order)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=CLIENT_TIMEOUT)


def send_raw(port: int, body=ASK) -> socket.socket:
    """A completion request on a socket the test can close before the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def test_requests_beyond_max_num_seqs_wait_and_are_all_answered(start_server):
    server = start_server([*SERVE, "--max-num-seqs", "2"], env=HOLD)
    clients = Clients(server)
    for i in range(5):
        clients.send(i)
    wait_for(lambda: load(server) == (2, 3), "2 requests running and 3 waiting")
    found = samples(server)
    # Two requests of at most two fill the KV cache (1/max-num-seqs each by default).
    assert found["vllm:kv_cache_usage_perc", "0"] == 1.0
    assert found["vllm:gpu_cache_usage_perc", "0"] == 1.0
    assert clients.answered() == []

    assert server.request("/fake/release", {}).json()["holding"] is False
    clients.join()
    assert sorted(clients.answered()) == [0, 1, 2, 3, 4]
    assert {a.status for a in clients.answers.values()} == {200}
    queued = [json.loads(a.headers["X-Fake-Vllm-Request"]) for a in clients.answers.values()]
    assert sorted(q["start"] for q in queued) == [0, 1, 2, 3, 4]

    # A request leaves the gauges just after its answer is written.
    wait_for(lambda: load(server) == (0, 0), "no request running or waiting")
    found = samples(server)
    assert found["vllm:kv_cache_usage_perc", "0"] == 0
    assert found["vllm:request_success_total", "0"] == 5
    assert found["vllm:request_queue_time_seconds_count", "0"] == 5


def test_waiting_requests_run_in_arrival_order(start_server):
    # FAKE_VLLM_MAX_RUNNING overrides --max-num-seqs (and vLLM's default of 256).
    server = start_server(SERVE, env={**HOLD, "FAKE_VLLM_MAX_RUNNING": "2"})
    clients = Clients(server)
    for i in range(5):
        clients.send(i)  # one at a time, so that the arrival order is the test's

        def arrived(count=i + 1) -> bool:
            return sum(load(server)) == count

        wait_for(arrived, f"request {i} running or waiting")
    assert load(server) == (2, 3)
    for i in range(5):
        # One permit: the oldest running request ends, the oldest waiting one starts.
        server.request("/fake/release", {"count": 1})
        wait_for(lambda i=i: i in clients.answered(), f"the answer to request {i}")
        assert clients.answered() == list(range(i + 1))
        still = 5 - i - 1
        wait_for(
            lambda still=still: load(server) == (min(2, still), max(0, still - 2)),
            f"{still} requests left",
        )
    order = [json.loads(clients.answers[i].headers["X-Fake-Vllm-Request"]) for i in range(5)]
    assert [(q["arrival"], q["start"]) for q in order] == [(i, i) for i in range(5)]


def test_metrics_parse_with_prometheus_client_under_vllm_names(start_server):
    server = start_server(SERVE)
    assert server.request("/v1/completions", ASK).status == 200
    text = server.request("/metrics").body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The parser names a counter's family without its _total suffix.
    assert {name: f.type for name, f in families.items()} == {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:gpu_cache_usage_perc": "gauge",
        "vllm:num_preemptions": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
    }
    for family in families.values():
        for sample in family.samples:
            assert sample.labels["model_name"] == "model-7b", sample
            assert sample.labels["engine"] == "0", sample
    found = samples(server)
    assert found["vllm:request_success_total", "0"] == 1
    assert found["vllm:num_preemptions_total", "0"] == 0
    assert found["vllm:e2e_request_latency_seconds_count", "0"] == 1


def test_kv_cache_share_per_request_limits_what_runs(start_server):
    server = start_server(
        [*SERVE, "--max-num-seqs", "8"], env={**HOLD, "FAKE_VLLM_KV_PER_REQUEST": "0.4"}
    )
    clients = Clients(server)
    for i in range(3):
        clients.send(i)
    # 0.4 each: two fit in the cache, the third waits although --max-num-seqs is 8.
    wait_for(lambda: load(server) == (2, 1), "2 requests running and 1 waiting")
    assert samples(server)["vllm:kv_cache_usage_perc", "0"] == 0.8
    server.request("/fake/release", {})
    clients.join()
    assert sorted(clients.answered()) == [0, 1, 2]
    wait_for(lambda: samples(server)["vllm:kv_cache_usage_perc", "0"] == 0, "an empty KV cache")


def test_a_client_that_leaves_takes_its_request_out(start_server):
    server = start_server([*SERVE, "--max-num-seqs", "1"], env=HOLD)
    running = send_raw(server.port)
    wait_for(lambda: load(server) == (1, 0), "the first request running (held)")
    waiting = send_raw(server.port)
    wait_for(lambda: load(server) == (1, 1), "the second request waiting")
    waiting.close()  # vLLM aborts the request of a client that went away
    wait_for(lambda: load(server) == (1, 0), "the abandoned request out of the queue")
    running.close()
    wait_for(lambda: load(server) == (0, 0), "the abandoned running request ended")
    assert samples(server)["vllm:request_success_total", "0"] == 0
    # The server goes on: a new request runs as soon as it is let through.
    server.request("/fake/release", {})
    assert server.request("/v1/completions", ASK).status == 200


def test_the_gate_closes_again(start_server):
    server = start_server(SERVE)
    assert server.request("/fake/hold", {}).json() == {"holding": True, "held": 0, "permits": 0}
    clients = Clients(server)
    clients.send("held")
    wait_for(
        lambda: server.request("/fake/release", {"count": 0}).json()["held"] == 1,
        "one request held",
    )
    assert clients.answered() == []
    assert server.request("/fake/release", {"count": -1}).status == 400
    server.request("/fake/release", {"count": 1})
    clients.join()
    assert clients.answered() == ["held"]


def test_engines_of_a_data_parallel_server_share_the_load(start_server):
    # Two ranks on this node (no members to wait for): two engines, each with its own queue.
    server = start_server(
        [*SERVE, "--data-parallel-size", "2", "--max-num-seqs", "1"], npus=[0, 1], env=HOLD
    )
    clients = Clients(server)
    for i in range(3):
        clients.send(i)
    wait_for(
        lambda: (load(server, "0"), load(server, "1")) in (((1, 1), (1, 0)), ((1, 0), (1, 1))),
        "one request running on each engine and one waiting",
    )
    server.request("/fake/release", {})
    clients.join()
    wait_for(lambda: load(server, "0") == load(server, "1") == (0, 0), "both engines idle")
    found = samples(server)
    assert found["vllm:request_success_total", "0"] + found["vllm:request_success_total", "1"] == 3
    engines = {
        json.loads(a.headers["X-Fake-Vllm-Request"])["engine"] for a in clients.answers.values()
    }
    assert engines == {0, 1}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--max-num-seqs", "0"], {}, "--max-num-seqs 0 must be at least 1"),
        ([], {"FAKE_VLLM_MAX_RUNNING": "many"}, "FAKE_VLLM_MAX_RUNNING='many' is not an integer"),
        ([], {"FAKE_VLLM_KV_PER_REQUEST": "1.5"}, "FAKE_VLLM_KV_PER_REQUEST='1.5' must be"),
    ],
)
def test_bad_load_settings_stop_it(start_server, args, env, message):
    server = start_server([*SERVE, *args], env=env)
    code, err = server.wait_exit()
    assert code == 1
    assert message in err


def test_default_max_num_seqs_is_vllms(start_server):
    # vLLM's default (256) queues nothing of what the gateway bench sends at once.
    assert start_server(SERVE).request("/npus").json()["max_num_seqs"] == 256
