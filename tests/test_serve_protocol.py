"""The served specialists' shared app (pipeline/serve/openai_api.py) on a real server on 127.0.0.1, with an answer
function the test controls: the queue bound answers 503 at once, a bug in an answer is a JSON 500 (not a
traceback to the client), and the malformed-request suite holds without any model."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline.serve import openai_api
from tests import llama_server, served_protocol


@pytest.fixture
def serve_app():
    """Start an app on a free port in this process; stop it after the test."""
    import uvicorn

    servers = []

    def start(application) -> str:
        port = llama_server.free_port()
        server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def _echo(body: dict, chat: bool) -> tuple[dict, dict]:
    text = openai_api.fields_of(body, chat, {"text"})["text"]
    return openai_api.completion(text.upper(), {"stopped": True, "generated_tokens": 1}, chat, "echo", 3, "t"), {}


def _app(answer, max_waiting: int = openai_api.MAX_WAITING):
    return openai_api.app("test", answer, lambda: ["echo"], "/stats", dict, max_waiting=max_waiting)


def test_the_shared_app_passes_the_malformed_request_suite(serve_app):
    base = serve_app(_app(_echo, max_waiting=4))
    served_protocol.check(base, {"messages": [{"role": "user", "content": "hello"}]}, bounded=True)
    status, _, raw = served_protocol.post(base, "/v1/completions", b'{"prompt": "hi", "n": 2}')
    assert status == 400 and "one answer per request" in json.loads(raw)["error"]["message"]
    # a streamed text completion, with the usage where asked
    status, _, raw = served_protocol.post(
        base, "/v1/completions", b'{"prompt": "hi", "stream": true, "stream_options": {"include_usage": true}}'
    )
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert status == 200 and events[-1] == "[DONE]" and "".join(c["choices"][0]["text"] for c in chunks[:2]) == "HI"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_a_full_queue_answers_503_at_once_and_the_waiting_requests_are_answered(serve_app):
    release = threading.Event()

    def slow(body, chat):
        release.wait(30)
        return _echo(body, chat)

    base = serve_app(_app(slow, max_waiting=2))
    body = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()
    answered = []
    waiting = [
        threading.Thread(target=lambda: answered.append(served_protocol.post(base, "/v1/chat/completions", body)))
        for _ in range(2)
    ]
    for thread in waiting:
        thread.start()
    time.sleep(1.0)  # both are in the app, holding the two places
    started = time.perf_counter()
    status, headers, raw = served_protocol.post(base, "/v1/chat/completions", body)
    assert status == 503 and time.perf_counter() - started < 5
    assert "busy: 2 requests" in json.loads(raw)["error"]["message"] and headers.get("retry-after") == "1"
    release.set()
    for thread in waiting:
        thread.join()
    assert [status for status, _, _ in answered] == [200, 200]
    assert served_protocol.post(base, "/v1/chat/completions", body)[0] == 200


def test_a_bug_in_an_answer_is_a_json_500_and_the_server_goes_on(serve_app):
    def broken(body, chat):
        if body.get("prompt") == "boom":
            raise KeyError("a bug")
        return _echo(body, chat)

    base = serve_app(_app(broken))
    status, _, raw = served_protocol.post(base, "/v1/completions", b'{"prompt": "boom"}')
    assert status == 500 and "KeyError" in json.loads(raw)["error"]["message"]
    status, _, raw = served_protocol.post(base, "/v1/completions", b'{"prompt": "fine"}')
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == "FINE"
