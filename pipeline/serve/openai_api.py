"""What the served specialists share: an OpenAI-compatible request read as a task row of the recipe (the input a
client sends fills the prompt template, as the evaluation renders it), the response bodies, errors and the API
key check. Used by the cascade endpoint (serve/cascade.py) and the many-adapter server (serve/adapters.py).

A client sends the task's input, not a rendered prompt: the last user message (chat) or the prompt (text
completions) fills the prompt template's one field, or `fields` ({"name": value}, extra body) fills several;
for data.format messages, the conversation itself.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pipeline import data
from pipeline.errors import PipelineError
from pipeline.recipe import DataSection
from pipeline.serve.requests import RequestError, check_request, content_text
from pipeline.templates import template_fields


def input_fields(section: DataSection, *templates: str | None) -> set[str]:
    """The fields a request's input fills: the prompt templates' (alpaca: instruction and input)."""
    if section.format == "alpaca":
        return {"instruction", "input"}
    return set().union(*(template_fields(t) for t in templates if t))


def task_row(section: DataSection, template: str | None, fields: dict, field: str = "data.prompt") -> data.TaskRow:
    """The request's fields as an eval row of this data section, rendered through `template` (the recipe's `field`)."""
    try:
        if section.format == "alpaca":
            return data.format_row(section, {**fields, "output": "-"}, "request")
        prompt = data.render(template or section.prompt, fields, "request", field)
        return data.TaskRow(target="", source="request", prompt=prompt)
    except PipelineError as error:
        raise RequestError(400, str(error)) from None


def conversation_row(body: dict, chat: bool) -> data.TaskRow:
    """A messages-format specialist's request: the conversation, ending where the answer is generated."""
    turns = body.get("messages") if chat else None
    if not isinstance(turns, list) or not turns:
        raise RequestError(400, "trained on conversations: send messages to /v1/chat/completions")
    answer = {"role": "assistant", "content": ""}  # the turn to generate, as an eval row ends
    said = tuple({"role": t["role"], "content": content_text(t.get("content"))} for t in turns)
    return data.TaskRow(target="", source="request", messages=(*said, answer))


def fields_of(body: dict, chat: bool, wanted: set[str]) -> dict:
    """The input fields of a request: `fields`, or the one field filled from the user's text."""
    given = body.get("fields")
    if given is not None:
        check_request({"fields": given}, chat=False)
        return {name: str(value) for name, value in given.items()}
    if chat:
        turns = body.get("messages")
        users = [t for t in turns if isinstance(t, dict) and t.get("role") == "user"] if isinstance(turns, list) else []
        if not users:
            raise RequestError(400, "messages: send the input as a user message")
        text = content_text(users[-1].get("content"), "the last user message's content")
    else:
        text = body.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise RequestError(400, "the input is empty: send it as the last user message (chat) or the prompt")
    if len(wanted) != 1:
        raise RequestError(
            400, f"the prompt template has {len(wanted)} fields ({', '.join(sorted(wanted))}): send them as "
            "\"fields\": {name: value} in the request body",
        )  # fmt: skip
    return {next(iter(wanted)): text}


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    if prompt_tokens + max_tokens > context:
        raise RequestError(
            400, f"the prompt is {prompt_tokens} tokens; with max_tokens {max_tokens} it passes the served context "
            f"of {context} (--context)",
        )  # fmt: skip


def completion(text: str, answer: dict, chat: bool, model: str, prompt_tokens: int | None, prefix: str) -> dict:
    """OpenAI's chat.completion or text_completion body for one answer (`answer`: stopped, generated_tokens)."""
    finish = "stop" if answer.get("stopped") else "length"
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    generated = answer.get("generated_tokens")
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": (prompt_tokens or 0) + (generated or 0),
        },
    }


def models_list(names: list[str]) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "specialist"} for n in names]}


def error(status: int, message: str, server_side: str = "server_error") -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else server_side
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def refused(request: Request, api_key: str | None) -> JSONResponse | None:
    """None where the request may go on (no key required, or the right one); else the 401 response."""
    if api_key is None:
        return None
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if secrets.compare_digest(given.encode(), api_key.encode()):
        return None
    return error(401, "a valid API key is needed (Authorization: Bearer ...)")


def api_key_from(variable: str | None) -> str | None:
    """The key clients must send, from the environment variable --api-key-env names (never the command line)."""
    import os

    if not variable:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise PipelineError(f"serve: --api-key-env {variable}: the variable is not set (or empty)")
    return key


MAX_WAITING = 64  # requests answered or waiting at once; more get 503 at once rather than a queue without end


def app(
    title: str,
    answer: Callable[[dict, bool], tuple[dict, dict]],
    models: Callable[[], list[str]],
    stats_path: str,
    stats: Callable[[], dict],
    api_key: str | None = None,
    server_side: str = "server_error",
    max_waiting: int = MAX_WAITING,
) -> FastAPI:
    """The FastAPI application every served specialist has: /v1/chat/completions and /v1/completions (answer(body,
    chat) -> (response body, headers), RequestError for a refusal), /v1/models, its stats and /health.

    Every refusal is a JSON error body with a 4xx status (a body that is not a JSON object included); "stream":
    true is answered as server-sent events, as OpenAI's API streams; at most `max_waiting` requests are answered
    or waiting at once, and the next gets 503 with Retry-After at once."""
    from fastapi.exceptions import RequestValidationError

    api = FastAPI(title=title)
    slots = threading.BoundedSemaphore(max_waiting)

    @api.exception_handler(RequestValidationError)
    def not_an_object(request: Request, failure: RequestValidationError):
        return error(400, "the request body must be a JSON object (OpenAI's completion or chat completion request)")

    def handle(request: Request, body: dict, chat: bool):
        if (denied := refused(request, api_key)) is not None:
            return denied
        if not slots.acquire(blocking=False):
            busy = error(503, f"busy: {max_waiting} requests are being answered or waiting; retry shortly", server_side)
            busy.headers["Retry-After"] = "1"
            return busy
        try:
            check_request(body, chat)
            payload, headers = answer(body, chat)
        except RequestError as failure:
            return error(failure.status, str(failure), server_side)
        except Exception as failure:  # a bug: the client gets JSON, the log the traceback
            logging.getLogger("specialist.serve").exception("request failed")
            return error(500, f"the server failed on this request ({type(failure).__name__}); see its log")
        finally:
            slots.release()
        if body.get("stream"):
            events = stream_events(payload, chat, bool((body.get("stream_options") or {}).get("include_usage")))
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return JSONResponse(payload, headers=headers)

    @api.post("/v1/chat/completions")
    def chat_completions(request: Request, body: dict):  # sync: FastAPI runs it in its thread pool
        return handle(request, body, chat=True)

    @api.post("/v1/completions")
    def completions(request: Request, body: dict):
        return handle(request, body, chat=False)

    @api.get("/v1/models")
    def served_models(request: Request):
        if (denied := refused(request, api_key)) is not None:
            return denied
        return models_list(models())

    api.add_api_route(stats_path, lambda: stats(), methods=["GET"])

    @api.get("/health")
    def health():
        return {"status": "ok"}

    return api


def stream_events(payload: dict, chat: bool, include_usage: bool) -> Iterator[str]:
    """A finished answer as OpenAI's server-sent events: the text in one chunk (answers are short and computed
    before the first byte), a chunk with the finish reason, the usage where asked, then [DONE]."""
    choice = payload["choices"][0]
    extra = {k: v for k, v in payload.items() if k not in ("object", "choices", "usage")}  # id, model, cascade, ...
    kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        first = {"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]}}
        last = {"index": 0, "delta": {}}
    else:
        first, last = {"index": 0, "text": choice["text"]}, {"index": 0, "text": ""}
    chunks = [
        {**extra, "object": kind, "choices": [{**first, "finish_reason": None, "logprobs": None}]},
        {**extra, "object": kind, "choices": [{**last, "finish_reason": choice["finish_reason"], "logprobs": None}]},
    ]
    if include_usage:
        chunks.append({**extra, "object": kind, "choices": [], "usage": payload["usage"]})
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def serve(application: FastAPI, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(application, host=host, port=port, log_level="warning")
