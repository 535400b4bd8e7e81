"""`specialist serve --cascade RECIPE`: a run's cascade as one OpenAI-compatible endpoint.

The specialist (a GGUF variant of the run; default the first one the cascade stage measured) answers in this
process through llama.cpp with the evaluation's own code: the same prompt rendering as training, greedy
decoding, and the same confidence (the product of the answer's token probabilities, the end token included:
pipeline/runtimes/llamacpp.py). Where that confidence is below the threshold the cascade stage chose on the
validation rows, the request goes to the fallback (`evaluate.reference`'s endpoint, or --fallback-url: an
OpenAI-compatible server such as `specialist serve packaged:NAME`) with the reference's own prompt, system
message and chat template, as the evaluation asked it. Every response says who answered: `model`, a
`cascade` field (answered_by, confidence, threshold) and the X-Cascade-Answered-By header; GET /cascade/stats
counts both. When the fallback cannot answer, the recipe's `cascade.when_fallback_fails` decides: HTTP 502
naming the fallback and why, or the local answer flagged `fallback_failed`.

A client sends the task's input, not a rendered prompt: the last user message (chat) or the prompt (text
completions) fills the prompt template's one field, or `fields` ({"name": value}, extra body) fills several;
for data.format messages, the conversation itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeline import data, models
from pipeline.errors import PipelineError
from pipeline.recipe import LoadedRecipe
from pipeline.runs import done_fingerprint
from pipeline.runtimes import Prompt, llamacpp
from pipeline.runtimes import endpoint as endpoint_runtime
from pipeline.templates import template_fields

ANSWERED_BY_HEADER = "X-Cascade-Answered-By"


class RequestError(Exception):
    """A request the cascade cannot take: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Counts:
    requests: int = 0
    answered_locally: int = 0
    deferred: int = 0
    fallback_failed: int = 0  # deferred, the fallback failed, and the local answer went out flagged
    failed: int = 0  # deferred, the fallback failed, and the client got an error
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, outcome: str) -> None:
        with self.lock:
            self.requests += 1
            setattr(self, outcome, getattr(self, outcome) + 1)
            if outcome in ("fallback_failed", "failed"):
                self.deferred += 1

    def as_dict(self) -> dict:
        with self.lock:
            answered = self.answered_locally + self.fallback_failed
            return {
                "requests": self.requests,
                "answered_locally": self.answered_locally,
                "deferred": self.deferred,
                "fallback_failed": self.fallback_failed,
                "failed": self.failed,
                "share_local": answered / self.requests if self.requests else None,
            }


@dataclass
class CascadeServer:
    """What one request needs: the local model and its threshold, the fallback, and how each is prompted."""

    recipe: LoadedRecipe
    candidate: str
    gguf_file: Path
    threshold: float | None  # None: the cascade stage found none that holds; everything is deferred
    operating_point: dict  # what the cascade stage measured at this threshold
    tokenizer: object  # the specialist's own (chat template, special tokens), as the evaluation renders prompts
    specialist_chat: bool
    fallback: endpoint_runtime.Endpoint
    threads: int
    context: int
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self):
        self._llm = llamacpp.open_model(str(self.gguf_file), self.context, self.threads, gpu=_gpu())
        self._local_lock = threading.Lock()  # llama.cpp's Python API serves one sequence at a time
        self._client = endpoint_runtime.Client(self.fallback)

    @property
    def reference(self):
        return self.recipe.recipe.evaluate.reference

    def answer(self, body: dict, chat: bool) -> tuple[dict, dict]:
        """The response body (OpenAI's chat.completion or text_completion) and its headers."""
        settings = self.recipe.recipe.evaluate
        max_tokens = _max_tokens(body, settings.max_new_tokens)
        local_row, reference_row = self.rows(body, chat)
        text, add_special = data.prompt_text(self.tokenizer, local_row, self.specialist_chat)
        started = time.perf_counter()
        with self._local_lock:
            ids = llamacpp.tokenize(self._llm, Prompt([], text, add_special))
            if len(ids) + max_tokens > self.context:
                raise RequestError(
                    400, f"the prompt is {len(ids)} tokens; with max_tokens {max_tokens} it passes the served "
                    f"context of {self.context} (--context)",
                )  # fmt: skip
            local = llamacpp.complete(self._llm, ids, max_tokens, confidence=True)
        local_seconds = time.perf_counter() - started
        cascade = {
            "answered_by": "specialist",
            "candidate": self.candidate,
            "confidence": local["confidence"],
            "threshold": self.threshold,
            "local_seconds": round(local_seconds, 4),
        }
        if self.threshold is not None and local["confidence"] >= self.threshold:
            self.counts.add("answered_locally")
            return self._response(local["prediction"], local, cascade, chat, self.candidate, len(ids))
        cascade["answered_by"] = "reference"
        reference_chat = self.reference.chat_template == "auto"
        asked = endpoint_runtime.prompts_for([reference_row], reference_chat, self.reference.system)[0]
        started = time.perf_counter()
        try:
            answer = self._client.ask(asked, max_tokens)
        except PipelineError as error:  # unreachable, refused, timed out after its retries: already explained
            if self.recipe.recipe.cascade.when_fallback_fails == "error":
                self.counts.add("failed")
                raise RequestError(
                    502, f"the confidence {local['confidence']:.4f} is below the threshold, and the fallback "
                    f"failed: {error}",
                ) from None  # fmt: skip
            self.counts.add("fallback_failed")
            cascade.update(answered_by="specialist", fallback_failed=True, fallback_error=str(error))
            return self._response(local["prediction"], local, cascade, chat, self.candidate, len(ids))
        cascade["fallback_seconds"] = round(time.perf_counter() - started, 4)
        self.counts.add("deferred")
        stopped = {"stopped": answer["stopped"], "generated_tokens": answer["generated_tokens"]}
        model, prompt_tokens = self.fallback.model, answer["prompt_tokens"]
        return self._response(answer["prediction"], stopped, cascade, chat, model, prompt_tokens)

    def rows(self, body: dict, chat: bool) -> tuple[data.TaskRow, data.TaskRow]:
        """The request as the specialist's row and as the reference's (its own prompt template, where set)."""
        section = self.recipe.recipe.data
        if section.format == "messages":
            turns = body.get("messages") if chat else None
            if not isinstance(turns, list) or not turns:
                raise RequestError(400, "trained on conversations: send messages to /v1/chat/completions")
            answer = {"role": "assistant", "content": ""}  # the turn to generate, as an eval row ends
            row = data.TaskRow(target="", source="request", messages=(*_turns(turns), answer))
            return row, row
        fields = _fields(body, chat, self._input_fields())
        local = self._row(section.prompt, fields, "data.prompt")
        return local, self._row(self.reference.prompt or section.prompt, fields, "evaluate.reference.prompt")

    def _input_fields(self) -> set[str]:
        section = self.recipe.recipe.data
        if section.format == "alpaca":
            return {"instruction", "input"}
        return template_fields(section.prompt) | template_fields(self.reference.prompt or section.prompt)

    def _row(self, template: str, fields: dict, field_name: str) -> data.TaskRow:
        section = self.recipe.recipe.data
        try:
            if section.format == "alpaca":
                return data.format_row(section, {**fields, "output": "-"}, "request")
            prompt = data.render(template, fields, "request", field_name)
            return data.TaskRow(target="", source="request", prompt=prompt)
        except PipelineError as error:
            raise RequestError(400, str(error)) from None

    def _response(self, text: str, answer: dict, cascade: dict, chat: bool, model: str, prompt_tokens) -> tuple:
        finish = "stop" if answer.get("stopped") else "length"
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        completion = answer.get("generated_tokens")
        body = {
            "id": f"cascade-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": (prompt_tokens or 0) + (completion or 0),
            },
            "cascade": cascade,
        }
        return body, {ANSWERED_BY_HEADER: cascade["answered_by"]}

    def describe(self) -> str:
        point = self.operating_point
        where = f"threshold {self.threshold:.4f}" if self.threshold is not None else "no threshold (all deferred)"
        return (
            f"cascade: {self.candidate} ({self.gguf_file}) with {where}; measured on the eval rows: "
            f"{point['value']:.3f} with {point['share_local']:.0%} answered locally. Below it: {self.fallback.model} "
            f"at {self.fallback.base_url}; if it fails: {self.recipe.recipe.cascade.when_fallback_fails}"
        )


def load(
    loaded: LoadedRecipe,
    run_dir: Path,
    candidate: str | None = None,
    fallback_url: str | None = None,
    fallback_model: str | None = None,
    fallback_api_key_env: str | None = None,
    threads: int | None = None,
    context: int = 4096,
) -> CascadeServer:
    """The served cascade of a finished run: the candidate's GGUF file and the threshold its cascade stage chose."""
    recipe = loaded.recipe
    if recipe.cascade is None:
        raise PipelineError(f"{loaded.path}: serve --cascade needs a cascade: section in the recipe")
    result_path = run_dir / "cascade" / "result.json"
    if done_fingerprint(run_dir / "cascade") is None or not result_path.is_file():
        raise PipelineError(
            f"{run_dir}: no finished cascade stage to serve; run `make train RECIPE={loaded.path}` (or `specialist "
            f"cascade {loaded.path}` on a finished evaluation) first"
        )
    measured = json.loads(result_path.read_text())["candidates"]
    ggufs = {v.label for v in recipe.quantize if v.kind == "gguf"}
    served = [name for name in measured if name in ggufs]
    if candidate is None:
        if not served:
            raise PipelineError(
                f"{loaded.path}: cascade: none of its candidates ({', '.join(measured)}) is a GGUF file, which the "
                "served cascade runs through llama.cpp; add {kind: gguf, type: q4_k_m} to quantize:"
            )
        candidate = served[0]
    elif candidate not in served:
        raise PipelineError(
            f"--candidate {candidate}: not a GGUF candidate of this run's cascade; one of: "
            f"{', '.join(served) or 'none'}"
        )
    folder = run_dir / "quantize" / candidate
    tokenizer = models.load_tokenizer(models.ModelSource(str(folder), None, True))
    data.apply_chat_template_file(tokenizer, recipe.data)
    point = measured[candidate]
    return CascadeServer(
        recipe=loaded,
        candidate=candidate,
        gguf_file=folder / "model.gguf",
        threshold=point["threshold"],
        operating_point={"value": point["value"], "share_local": point["share_local"]},
        tokenizer=tokenizer,
        specialist_chat=data.uses_chat_template(tokenizer, recipe.data.chat_template),
        fallback=fallback_endpoint(loaded, fallback_url, fallback_model, fallback_api_key_env),
        threads=threads or os.cpu_count() or 1,
        context=context,
    )


def fallback_endpoint(
    loaded: LoadedRecipe, url: str | None, model: str | None, api_key_env: str | None
) -> endpoint_runtime.Endpoint:
    """The reference as an endpoint: --fallback-url where given, else the recipe's evaluate.reference endpoint."""
    reference = loaded.recipe.evaluate.reference
    if url is None:
        if reference.endpoint is None:
            raise PipelineError(
                f"{loaded.path}: evaluate.reference ({reference.model}) runs in this process at evaluation; the "
                f"served cascade forwards to an endpoint: serve it (`specialist serve {reference.model} --port 8081`, "
                "given a GGUF) and pass --fallback-url http://127.0.0.1:8081/v1"
            )
        found = endpoint_runtime.Endpoint.from_recipe(reference, "evaluate.reference")
        return found if model is None else replace(found, model=model)
    if not url.startswith(("http://", "https://")):
        raise PipelineError(f"--fallback-url {url}: give the API's base URL, e.g. http://127.0.0.1:8081/v1")
    settings = reference.endpoint
    return endpoint_runtime.Endpoint(
        field="--fallback-url",
        base_url=url.rstrip("/"),
        model=model or reference.model.removeprefix("packaged:"),
        api_key_env=api_key_env if api_key_env is not None else (settings.api_key_env if settings else None),
        concurrency=1,
        timeout_seconds=settings.timeout_seconds if settings else 60.0,
        max_retries=settings.max_retries if settings else 2,
        chat=reference.chat_template == "auto",
    )


def app(server: CascadeServer, api_key: str | None = None):
    """The FastAPI application: /v1/chat/completions, /v1/completions, /v1/models, /cascade/stats, /health."""
    import secrets

    api = FastAPI(title="specialist cascade")

    def refused(request: Request) -> JSONResponse | None:
        if api_key is None:
            return None
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if secrets.compare_digest(given.encode(), api_key.encode()):
            return None
        return _error(401, "a valid API key is needed (Authorization: Bearer ...)")

    def handle(request: Request, body: dict, chat: bool):
        if (denied := refused(request)) is not None:
            return denied
        try:
            payload, headers = server.answer(body, chat)
        except RequestError as error:
            return _error(error.status, str(error))
        return JSONResponse(payload, headers=headers)

    @api.post("/v1/chat/completions")
    def chat_completions(request: Request, body: dict):  # sync: FastAPI runs it in its thread pool
        return handle(request, body, chat=True)

    @api.post("/v1/completions")
    def completions(request: Request, body: dict):
        return handle(request, body, chat=False)

    @api.get("/v1/models")
    def served_models(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        names = [server.candidate, server.fallback.model]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "specialist"} for n in names]}

    @api.get("/cascade/stats")
    def stats():
        return {**server.counts.as_dict(), "candidate": server.candidate, "threshold": server.threshold}

    @api.get("/health")
    def health():
        return {"status": "ok"}

    return api


def run(server: CascadeServer, host: str, port: int, api_key_env: str | None) -> None:
    import uvicorn

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env, "").strip()
        if not api_key:
            raise PipelineError(f"serve: --api-key-env {api_key_env}: the variable is not set (or empty)")
    uvicorn.run(app(server, api_key), host=host, port=port, log_level="warning")


def _fields(body: dict, chat: bool, wanted: set[str]) -> dict:
    """The input fields of a request: `fields`, or the one field filled from the user's text."""
    given = body.get("fields")
    if given is not None:
        if not isinstance(given, dict):
            raise RequestError(400, 'fields: give an object of the prompt template\'s fields, e.g. {"text": "..."}')
        return given
    if chat:
        turns = body.get("messages")
        users = [t for t in turns if isinstance(t, dict) and t.get("role") == "user"] if isinstance(turns, list) else []
        if not users:
            raise RequestError(400, "messages: send the input as a user message")
        text = users[-1].get("content")
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


def _turns(turns: list) -> tuple[dict, ...]:
    for turn in turns:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise RequestError(400, "messages: each turn needs a role and a text content")
    return tuple({"role": t["role"], "content": t["content"]} for t in turns)


def _max_tokens(body: dict, default: int) -> int:
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(400, f"max_tokens: {value!r} is not a positive whole number")
    return value


def _error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "fallback_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _gpu() -> bool:
    import torch  # already loaded by pipeline.models

    return torch.cuda.is_available()
