"""The process `specialist serve MODEL` runs: llama-cpp-python's own OpenAI-compatible server, its app unchanged,
behind one ASGI layer that refuses a completion request whose body is not a valid request with a 400 and a JSON
error body, and hands on OpenAI's text content parts as the plain text that server's chat templates take.
Without it that server answers 500 (plain text, or a traceback in its log) to a body that is not JSON, and 500 to
every body its request models reject: its error route parses the body again to word the error, and that fails
the same way.

Run as `python -m pipeline.serve.gguf_server <llama_cpp.server's own arguments>`: the arguments, the settings and
the app are llama_cpp.server's (its __main__), with create_app wrapped.
"""

from __future__ import annotations

import json
import os
import secrets

from pydantic import ValidationError

from pipeline.serve.requests import RequestError, check_request, content_text

COMPLETIONS = {"/v1/completions": "CreateCompletionRequest", "/v1/chat/completions": "CreateChatCompletionRequest"}


class ValidRequestBodies:
    """ASGI middleware: a POST to a completions route passes on only with a body the route's request model takes."""

    def __init__(self, app):
        self.app = app
        self.key = os.environ.get("API_KEY")  # the server's own key (gguf.environment sets it)

    async def __call__(self, scope, receive, send):
        model_name = COMPLETIONS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if model_name is None or scope.get("method") != "POST" or not self._authorized(scope):
            return await self.app(scope, receive, send)  # the app answers it (a 401 where the key is wrong)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = _problem(body, model_name)
        if problem is not None:
            return await _send_error(send, problem)
        body = _text_contents(body)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        if not self.key:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode(errors="replace")
        return secrets.compare_digest(header.removeprefix("Bearer ").strip().encode(), self.key.encode())


def _problem(body: bytes, model_name: str) -> str | None:
    from llama_cpp.server import types

    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"the request body is not JSON ({e})"
    if not isinstance(parsed, dict):
        return "the request body must be a JSON object (OpenAI's completion or chat completion request)"
    try:
        check_request(parsed, chat=model_name == COMPLETIONS["/v1/chat/completions"], one_answer=False)
        getattr(types, model_name)(**parsed)
    except RequestError as e:
        return str(e)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" + (f" ({len(e.errors()) - 1} more)" if len(e.errors()) > 1 else "")
    except TypeError as e:  # keys that are not strings, and the like
        return f"the request body is not a request: {e}"
    return None


def _text_contents(body: bytes) -> bytes:
    """OpenAI's content parts of type text as one string per message: that server's chat templates take text only."""
    parsed = json.loads(body)
    turns = parsed.get("messages")
    if not isinstance(turns, list) or not any(isinstance(t.get("content"), list) for t in turns):
        return body
    parsed["messages"] = [{**t, "content": content_text(t.get("content"))} for t in turns]
    return json.dumps(parsed).encode()


async def _send_error(send, message: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": 400}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def main() -> None:
    from llama_cpp.server import __main__ as server

    original = server.create_app

    def create_app(**settings):
        app = original(**settings)
        app.add_middleware(ValidRequestBodies)
        return app

    server.create_app = create_app
    server.main()


if __name__ == "__main__":
    main()
