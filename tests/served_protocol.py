"""One malformed-request suite for every server `specialist serve` starts (one GGUF through llama.cpp's own
server, many adapters on one base, the cascade): what OpenAI clients and broken clients send, against the real
server on 127.0.0.1. Each refusal is a 4xx with a JSON body, never a 500; "stream": true is server-sent events
an OpenAI client reads, with the same answer as without it; concurrent requests all get an answer (or a 503
with a JSON body where the server bounds its queue); and the server keeps answering after all of it."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

# (what it is, path, raw body): every one is a request a server must refuse with a 4xx and a JSON body
MALFORMED: list[tuple[str, str, bytes]] = [
    ("not JSON", "/v1/chat/completions", b"{not json"),
    ("a JSON array", "/v1/chat/completions", b"[]"),
    ("a JSON string", "/v1/completions", b'"hello"'),
    ("JSON null", "/v1/completions", b"null"),
    ("messages a string", "/v1/chat/completions", b'{"messages": "hello"}'),
    ("messages empty", "/v1/chat/completions", b'{"messages": []}'),
    ("a turn without a role", "/v1/chat/completions", b'{"messages": [{"content": "hello"}]}'),
    ("a turn that is a string", "/v1/chat/completions", b'{"messages": ["hello"]}'),
    ("content a number", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
    ("max_tokens negative", "/v1/completions", b'{"prompt": "hello", "max_tokens": -1}'),
    ("max_tokens text", "/v1/completions", b'{"prompt": "hello", "max_tokens": "five"}'),
    ("model a list", "/v1/chat/completions", b'{"model": ["a"], "messages": [{"role": "user", "content": "hi"}]}'),
    ("stream not a boolean", "/v1/completions", b'{"prompt": "hello", "stream": "yes"}'),
    ("prompt an object", "/v1/completions", b'{"prompt": {"text": "hello"}}'),
]


def post(base: str, path: str, body: bytes, key: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers with lowercase names, raw body) of a POST to base (http://127.0.0.1:PORT) + path."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + path, body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def check(base: str, valid: dict, key: str | None = None, bounded: bool = False) -> None:
    """The whole suite against the server at `base`; `valid`: a chat request it answers (200)."""
    for what, path, body in MALFORMED:
        status, _, raw = post(base, path, body, key)
        assert 400 <= status < 500, f"{what}: status {status}: {raw[:300]!r}"
        assert isinstance(json.loads(raw), dict), f"{what}: the body is not a JSON object: {raw[:300]!r}"

    # OpenAI's content parts are text too
    parts = {**valid, "messages": [{**valid["messages"][-1], "content": [{"type": "text", "text": _text(valid)}]}]}
    status, _, raw = post(base, "/v1/chat/completions", json.dumps(parts).encode(), key)
    assert status == 200, raw[:300]

    # streamed: events a client reads, ending in [DONE], with the answer the plain request gets
    status, _, raw = post(base, "/v1/chat/completions", json.dumps(valid).encode(), key)
    assert status == 200, raw[:300]
    answer = json.loads(raw)["choices"][0]["message"]["content"]
    status, headers, raw = post(base, "/v1/chat/completions", json.dumps({**valid, "stream": True}).encode(), key)
    assert status == 200 and headers.get("content-type", "").startswith("text/event-stream"), (status, headers)
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1].strip() == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(choice["delta"].get("content") or "" for c in chunks for choice in c["choices"])
    assert streamed == answer
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") or any(
        choice.get("finish_reason") for c in chunks for choice in c["choices"]
    )

    # many at once: every request gets an answer, or (a server that bounds its queue) a 503 with a JSON body
    results: list[tuple[int, bytes]] = []
    barrier = threading.Barrier(8)

    def ask():
        barrier.wait()
        status, _, raw = post(base, "/v1/chat/completions", json.dumps(valid).encode(), key)
        results.append((status, raw))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allowed = {200, 503} if bounded else {200}
    assert {status for status, _ in results} <= allowed, [(s, r[:200]) for s, r in results]
    assert all(isinstance(json.loads(raw), dict) for _, raw in results)
    assert any(status == 200 for status, _ in results)

    # and it still answers
    status, _, raw = post(base, "/v1/chat/completions", json.dumps(valid).encode(), key)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == answer


def _text(request: dict) -> str:
    content = request["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)
