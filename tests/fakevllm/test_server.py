"""The fake vLLM server's contract, as the lab tests and operator tests rely on it."""

import contextlib
import json
import re
import threading
import time

CANNED = "This is a canned answer from the fake vLLM server."
SERVE = ["org/model-7b", "--served-model-name", "model-7b"]


def poll(condition, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)  # poll interval, the deadline bounds the wait
    raise AssertionError(f"condition not met within {timeout}s")


def sse_events(body: bytes) -> list[str]:
    return [
        line[len("data: ") :] for line in body.decode().split("\n\n") if line.startswith("data: ")
    ]


def test_reports_the_npus_it_sees(start_server):
    server = start_server(
        [*SERVE, "--tensor-parallel-size", "2"],
        npus=[1, 3],
        env={"ASCEND_VISIBLE_DEVICES": "1,3", "ASCEND_DOCKER_RUNTIME": "True"},
    )
    resp = server.request("/npus")
    assert resp.status == 200
    npus = resp.json()
    assert npus["devices"] == ["davinci1", "davinci3"]
    assert npus["control_devices"] == ["davinci_manager", "devmm_svm", "hisi_hdc"]
    assert npus["ASCEND_VISIBLE_DEVICES"] == "1,3"
    assert npus["ASCEND_DOCKER_RUNTIME"] == "True"
    assert npus["tensor_parallel_size"] == 2
    assert npus["hostname"]
    header = json.loads(resp.headers["X-Fake-Vllm-Npus"])
    assert header["devices"] == ["davinci1", "davinci3"]
    assert header["hostname"] == npus["hostname"]


def test_every_response_carries_the_npus_header(start_server):
    server = start_server(SERVE)
    for path in ("/health", "/v1/models", "/metrics", "/nowhere"):
        assert "X-Fake-Vllm-Npus" in server.request(path).headers, path


def test_health_and_models(start_server):
    server = start_server([*SERVE, "--max-model-len", "4096"])
    assert server.request("/health").status == 200
    models = server.request("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["model-7b"]
    assert models["data"][0]["root"] == "org/model-7b"
    assert models["data"][0]["max_model_len"] == 4096


def test_model_name_defaults_to_the_model_path(start_server):
    server = start_server(["org/model-7b"])
    assert server.request("/v1/models").json()["data"][0]["id"] == "org/model-7b"


def test_completion(start_server):
    server = start_server(SERVE)
    resp = server.request(
        "/v1/completions", {"model": "model-7b", "prompt": "one two three", "max_tokens": 3}
    )
    assert resp.status == 200
    body = resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "This is a"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_chat_completion(start_server):
    server = start_server(SERVE)
    messages = [{"role": "user", "content": "hello there"}]
    body = server.request(
        "/v1/chat/completions", {"model": "model-7b", "messages": messages}
    ).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": CANNED}
    assert body["usage"]["prompt_tokens"] == 2


def test_unknown_model_is_404_like_vllm(start_server):
    server = start_server(SERVE)
    resp = server.request("/v1/completions", {"model": "other", "prompt": "x"})
    assert resp.status == 404
    assert resp.json()["message"] == "The model `other` does not exist."


def test_chat_stream_is_sse_ending_in_done(start_server):
    server = start_server(SERVE)
    resp = server.request(
        "/v1/chat/completions",
        {"model": "model-7b", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = sse_events(resp.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == CANNED
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_stream(start_server):
    server = start_server(SERVE)
    resp = server.request(
        "/v1/completions", {"model": "model-7b", "prompt": "hi", "stream": True, "max_tokens": 2}
    )
    chunks = [json.loads(e) for e in sse_events(resp.body)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "This is"


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + r"\{([^}]*)\} (\S+)"
    for found_labels, value in re.findall(pattern, text):
        if labels in found_labels and 'model_name="model-7b"' in found_labels:
            return float(value)
    raise AssertionError(f"{name}{{{labels}}} not in metrics:\n{text}")


def test_metrics_count_requests_in_vllm_names(start_server):
    server = start_server(SERVE)
    for _ in range(2):
        server.request("/v1/completions", {"model": "model-7b", "prompt": "a b", "max_tokens": 4})
    text = server.request("/metrics").body.decode()
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in text
    assert metric(text, "vllm:prompt_tokens_total") == 4
    assert metric(text, "vllm:generation_tokens_total") == 8
    assert metric(text, "vllm:e2e_request_latency_seconds_count") == 2
    assert metric(text, "vllm:e2e_request_latency_seconds_bucket", 'le="+Inf"') == 2
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:num_requests_waiting") == 0
    assert metric(text, "vllm:gpu_cache_usage_perc") == 0


def test_running_requests_show_in_metrics(start_server):
    # A latency no busy machine can outlast, so the request is still running whenever the
    # poll looks; the server is killed with it unanswered. the metrics test above sees it at 0 after answers.
    server = start_server(SERVE, env={"FAKE_VLLM_LATENCY_SECONDS": "600"})

    def ask() -> None:
        with contextlib.suppress(OSError):
            server.request("/v1/completions", {"model": "model-7b", "prompt": "x"})

    threading.Thread(target=ask, daemon=True).start()
    poll(lambda: metric(server.request("/metrics").body.decode(), "vllm:num_requests_running") == 1,
         timeout=60)


def test_refuses_to_start_without_npus(start_server):
    server = start_server(SERVE, npus=[])
    code, err = server.wait_exit()
    assert code == 1
    assert "no Ascend NPU found" in err
    assert "ASCEND_VISIBLE_DEVICES=<unset>" in err


def test_refuses_tensor_parallel_larger_than_its_npus(start_server):
    server = start_server([*SERVE, "--tensor-parallel-size", "2"], npus=[5])
    code, err = server.wait_exit()
    assert code == 1
    assert "--tensor-parallel-size 2 needs 2 NPUs but only 1 usable: davinci5" in err


def test_refuses_host_ids_in_rt_visible_devices(start_server):
    server = start_server(
        [*SERVE, "--tensor-parallel-size", "2"],
        npus=[4, 5],
        env={"ASCEND_RT_VISIBLE_DEVICES": "4,5"},
    )
    code, err = server.wait_exit()
    assert code == 1
    assert "invalid device ordinal 4 in ASCEND_RT_VISIBLE_DEVICES=4,5" in err


def test_rt_visible_devices_renumbered_from_zero_is_accepted(start_server):
    server = start_server(
        [*SERVE, "--tensor-parallel-size", "2"],
        npus=[4, 5],
        env={"ASCEND_RT_VISIBLE_DEVICES": "0-1"},
    )
    assert server.request("/npus").json()["ASCEND_RT_VISIBLE_DEVICES"] == "0-1"


def test_health_is_503_while_the_model_loads(start_server):
    # A load no busy machine can outlast: the 503s are seen whatever the scheduling.
    server = start_server(SERVE, env={"FAKE_VLLM_LOAD_SECONDS": "600"})
    assert server.request("/health").status == 503
    assert server.request("/v1/models").status == 503
    assert server.request("/npus").status == 200  # tests can still tell what it runs on


def test_health_turns_200_once_the_model_has_loaded(start_server):
    server = start_server(SERVE, env={"FAKE_VLLM_LOAD_SECONDS": "1"})
    poll(lambda: server.request("/health").status == 200, timeout=60)
    assert server.request("/v1/models").status == 200


def test_crashes_when_asked(start_server):
    server = start_server(SERVE)
    assert server.request("/fake/crash", {}).json() == {"crashing": True, "exit_code": 1}
    code, err = server.wait_exit()
    assert code == 1
    assert "crashing on request (POST /fake/crash)" in err


def test_crash_exit_code_is_chosen_by_the_test(start_server):
    server = start_server(SERVE)
    server.request("/fake/crash", {"exit_code": 3})
    assert server.wait_exit()[0] == 3


def test_crashes_after_the_given_time(start_server):
    server = start_server(SERVE, env={"FAKE_VLLM_CRASH_AFTER_SECONDS": "0.5"})
    code, err = server.wait_exit()
    assert code == 1
    assert "crashing as asked by FAKE_VLLM_CRASH_AFTER_SECONDS=0.5" in err


def test_accepts_vllm_option_spellings_and_ignores_unknown_options(start_server):
    args = [
        "org/m",
        "--tensor_parallel_size",
        "2",
        "--enable_expert_parallel",
        "--gpu-memory-utilization",
        "0.9",
        "--trust-remote-code",
    ]
    server = start_server(args, npus=[0, 1])
    npus = server.request("/npus").json()
    assert npus["tensor_parallel_size"] == 2
    assert npus["enable_expert_parallel"] is True


def test_exits_promptly_on_sigterm(start_server):
    server = start_server(SERVE)
    server.proc.terminate()
    assert server.wait_exit(timeout=5)[0] == 0


def stream_arrivals(server, body) -> list[tuple[float, bytes]]:
    """Each SSE event of a streamed request with the time it arrived, read as it comes."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    arrivals = []
    while line := response.readline():
        if line.startswith(b"data: "):
            arrivals.append((time.monotonic(), line))
    connection.close()
    return arrivals


def test_stream_chunks_come_one_token_delay_apart(start_server):
    server = start_server(SERVE, env={"FAKE_VLLM_TOKEN_DELAY_SECONDS": "0.2"})
    body = {"model": "model-7b", "messages": [{"role": "user", "content": "hi"}],
            "stream": True, "max_tokens": 4}
    arrivals = stream_arrivals(server, body)
    assert [line for _, line in arrivals][-1] == b"data: [DONE]\n"
    tokens = [t for t, line in arrivals if line != b"data: [DONE]\n"]
    assert len(tokens) == 4
    # Written as generated, not at the end: 3 token delays from the first to the last (half of
    # it leaves room for a busy client reading two chunks at once).
    assert tokens[-1] - tokens[0] >= 3 * 0.2 * 0.5, tokens


def test_time_to_first_token_is_in_metrics(start_server):
    server = start_server(SERVE)
    server.request("/v1/completions", {"model": "model-7b", "prompt": "x"})
    text = server.request("/metrics").body.decode()
    assert metric(text, "vllm:time_to_first_token_seconds_count") == 1
    assert metric(text, "vllm:time_to_first_token_seconds_bucket", 'le="+Inf"') == 1


def test_sigterm_lets_requests_under_way_finish_and_refuses_new_ones(start_server):
    server = start_server(SERVE, env={"FAKE_VLLM_LATENCY_SECONDS": "1.5"})
    answers = []

    def ask() -> None:
        answers.append(server.request("/v1/completions", {"model": "model-7b", "prompt": "x"}))

    asker = threading.Thread(target=ask)
    asker.start()
    poll(lambda: metric(server.request("/metrics").body.decode(), "vllm:num_requests_running") == 1)
    server.proc.terminate()
    poll(lambda: not _accepts(server.port))
    asker.join(timeout=30)
    assert [a.status for a in answers] == [200]
    code, err = server.wait_exit(timeout=10)
    assert code == 0
    assert "fake-vllm: stopping" in err and "still running" not in err


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True
