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

What a client sends (the task's input, not a rendered prompt) and gets back: pipeline/serve/openai_api.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline import data, gguf_export, models
from pipeline.errors import PipelineError
from pipeline.recipe import LoadedRecipe
from pipeline.run_layout import RunLayout
from pipeline.runs import stage_done
from pipeline.runtimes import Prompt, llamacpp
from pipeline.runtimes import endpoint as endpoint_runtime
from pipeline.serve import openai_api, requests
from pipeline.serve.requests import RequestError

ANSWERED_BY_HEADER = "X-Cascade-Answered-By"


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
    lora_file: Path | None  # a LoRA GGUF on gguf_file (a shared base), or None
    threshold: float | None  # None: the cascade stage found none that holds; everything is deferred
    operating_point: dict  # what the cascade stage measured at this threshold
    tokenizer: object  # the specialist's own (chat template, special tokens), as the evaluation renders prompts
    specialist_chat: bool
    fallback: endpoint_runtime.Endpoint
    threads: int
    context: int
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self):
        lora = str(self.lora_file) if self.lora_file else None
        self._llm = llamacpp.open_model(str(self.gguf_file), self.context, self.threads, gpu=_gpu(), lora_file=lora)
        self._local_lock = threading.Lock()  # llama.cpp's Python API serves one sequence at a time
        self._client = endpoint_runtime.Client(self.fallback)

    @property
    def reference(self):
        return self.recipe.recipe.evaluate.reference

    def answer(self, body: dict, chat: bool) -> tuple[dict, dict]:
        """The response body (OpenAI's chat.completion or text_completion) and its headers."""
        settings = self.recipe.recipe.evaluate
        max_tokens = requests.max_tokens(body, settings.max_new_tokens)
        local_row, reference_row = self.rows(body, chat)
        text, add_special = data.prompt_text(self.tokenizer, local_row, self.specialist_chat)
        started = time.perf_counter()
        with self._local_lock:
            ids = llamacpp.tokenize(self._llm, Prompt([], text, add_special))
            openai_api.check_context(len(ids), max_tokens, self.context)
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
            row = openai_api.conversation_row(body, chat)
            return row, row
        reference_prompt = self.reference.prompt or section.prompt
        fields = openai_api.fields_of(body, chat, openai_api.input_fields(section, section.prompt, reference_prompt))
        local = openai_api.task_row(section, section.prompt, fields)
        return local, openai_api.task_row(section, reference_prompt, fields, "evaluate.reference.prompt")

    def _response(self, text: str, answer: dict, cascade: dict, chat: bool, model: str, prompt_tokens) -> tuple:
        body = {**openai_api.completion(text, answer, chat, model, prompt_tokens, "cascade"), "cascade": cascade}
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
    result_path = RunLayout(run_dir).cascade_result
    if stage_done(run_dir, "cascade") is None or not result_path.is_file():
        raise PipelineError(
            f"{run_dir}: no finished cascade stage to serve; run `make train RECIPE={loaded.path}` (or `specialist "
            f"cascade {loaded.path}` on a finished evaluation) first"
        )
    measured = json.loads(result_path.read_text())["candidates"]
    ggufs = {v.label: v.kind for v in recipe.quantize if v.is_gguf}
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
    folder = RunLayout(run_dir).variant(candidate)
    gguf_file, lora_file = gguf_export.variant_files(ggufs[candidate], folder)
    tokenizer = models.load_tokenizer(models.ModelSource(str(folder), None, True))
    data.apply_chat_template_file(tokenizer, recipe.data)
    point = measured[candidate]
    return CascadeServer(
        recipe=loaded,
        candidate=candidate,
        gguf_file=gguf_file,
        lora_file=lora_file,
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


def app(server: CascadeServer, api_key: str | None = None, max_waiting: int = openai_api.MAX_WAITING):
    """/v1/chat/completions, /v1/completions, /v1/models, /cascade/stats, /health."""
    return openai_api.app(
        "specialist cascade",
        server.answer,
        lambda: [server.candidate, server.fallback.model],
        "/cascade/stats",
        lambda: {**server.counts.as_dict(), "candidate": server.candidate, "threshold": server.threshold},
        api_key,
        "fallback_error",
        max_waiting=max_waiting,
    )


def run(server: CascadeServer, host: str, port: int, api_key_env: str | None, max_waiting: int) -> None:
    openai_api.serve(app(server, openai_api.api_key_from(api_key_env), max_waiting), host, port)


def _gpu() -> bool:
    import torch  # already loaded by pipeline.models

    return torch.cuda.is_available()
