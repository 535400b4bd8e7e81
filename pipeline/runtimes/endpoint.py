"""The endpoint runtime: a model behind an OpenAI-compatible API (a hosted model, or a vLLM, llama.cpp or
Ollama server), asked through the `openai` client.

Each row is asked what the recipe asks a local model: with a chat template (chat_template: auto) its turns
(the system message, then the prompt or the row's conversation) go to /chat/completions and the server
applies the model's own template; with chat_template: never the plain prompt goes to /completions.
Greedy (temperature 0; a teacher writing rows: sampled, with a seed per row, which servers that support it honour),
at most max_new_tokens, `concurrency` requests in flight; the client retries rate
limits (429), server errors (5xx), timeouts and dropped connections with exponential backoff (and the
server's Retry-After). Token counts are the server's own (`usage`). Every answer reaches `on_answer` as it
arrives, so a killed run loses only the requests in flight, and the caller's cache never pays for a row
twice.

The key is read from the environment variable the recipe names, at the moment of asking; it is never
written anywhere, and every message that could quote it is scrubbed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline import data
from pipeline.errors import PipelineError, RemoteError
from pipeline.runtimes import GenerationJob, OnBatch, Prompt, Sampling

NO_KEY = "no-key"  # what the client sends to a local server that needs none (it insists on some value)


@dataclass(frozen=True)
class Endpoint:
    field: str  # where the recipe names it (evaluate.reference, distill.teacher): every error says so
    base_url: str
    model: str
    api_key_env: str | None
    concurrency: int
    timeout_seconds: float
    max_retries: int
    chat: bool  # chat completions (the server's chat template) or plain completions

    @classmethod
    def from_recipe(cls, reference, field: str) -> Endpoint:
        settings = reference.endpoint
        return cls(
            field=field,
            base_url=settings.base_url,
            model=reference.model,
            api_key_env=settings.api_key_env,
            concurrency=settings.concurrency,
            timeout_seconds=settings.timeout_seconds,
            max_retries=settings.max_retries,
            chat=reference.chat_template == "auto",
        )

    @property
    def identity(self) -> str:
        """What decides the answers (not the key, the timeouts or the concurrency): for generation caches."""
        return f"endpoint:{self.base_url}#{self.model}#{'chat' if self.chat else 'completions'}"

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc


def api_key(endpoint: Endpoint) -> str:
    if endpoint.api_key_env is None:
        return NO_KEY
    key = os.environ.get(endpoint.api_key_env, "").strip()
    if not key:
        raise PipelineError(
            f"{endpoint.field}.endpoint.api_key_env: the environment variable {endpoint.api_key_env} is not set "
            f"(or empty); export the API key for {endpoint.host} in it"
        )
    return key


def prompts_for(rows: list[data.TaskRow], chat: bool, system: str | None) -> list[Prompt]:
    """Each row's prompt as the API takes it: chat turns, or the plain prompt text."""
    prompts = []
    for row in rows:
        messages = data.prompt_messages(row, chat, system)
        text = row.prompt if messages is None else "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        prompts.append(Prompt([], text, False, tuple(messages) if messages is not None else None))
    return prompts


class Client:
    """One endpoint's openai client, with its errors turned into messages that name the recipe field."""

    def __init__(self, endpoint: Endpoint):
        from openai import OpenAI

        self.endpoint = endpoint
        self._key = api_key(endpoint)
        self._client = OpenAI(
            base_url=endpoint.base_url,
            api_key=self._key,
            timeout=endpoint.timeout_seconds,
            max_retries=endpoint.max_retries,
        )
        self._completion_limit = "max_tokens"  # newer OpenAI models take max_completion_tokens instead

    def check(self) -> None:
        """Reachable, the key accepted, and the model served (where the API lists its models)."""
        import openai

        try:
            served = [m.id for m in self._client.models.list()]
        except (openai.NotFoundError, openai.BadRequestError, openai.UnprocessableEntityError):
            return  # no model list at this API: the first request will tell
        except openai.OpenAIError as error:
            raise self.explain(error) from None
        # Ollama lists "name:latest" and answers to "name" as well
        if served and not {self.endpoint.model, f"{self.endpoint.model}:latest"} & set(served):
            shown = ", ".join(served[:20]) + (f" and {len(served) - 20} more" if len(served) > 20 else "")
            raise PipelineError(
                f"{self.endpoint.field}.model: {self.endpoint.host} does not serve {self.endpoint.model!r}; it "
                f"serves: {shown}"
            )

    def ask(self, prompt: Prompt, max_new_tokens: int, logprobs: bool = False, sampled: dict | None = None) -> dict:
        """One request, greedy (or sampled: temperature, top_p, seed): the answer, the server's token counts, the
        time it took, how it ended."""
        import openai

        started = time.perf_counter()
        try:
            response, choice = self._request(prompt, max_new_tokens, logprobs, sampled or {"temperature": 0})
        except openai.OpenAIError as error:
            raise self.explain(error) from None
        seconds = time.perf_counter() - started
        if prompt.messages is not None:
            text = choice.message.content if choice.message else None
            tokens = choice.logprobs.content if choice.logprobs and choice.logprobs.content else None
            token_logprobs = [t.logprob for t in tokens] if tokens else None
        else:
            text = choice.text
            token_logprobs = choice.logprobs.token_logprobs if choice.logprobs else None
        if text is None or (not text.strip() and choice.finish_reason == "length"):
            why = f"finish_reason {choice.finish_reason!r}"
            raise PipelineError(
                f"{self.endpoint.field}: {self.endpoint.host} answered {self.endpoint.model!r} with no text ({why})"
                + ("; a reasoning model may need a larger evaluate.max_new_tokens" if text is not None else "")
            )
        usage = response.usage
        entry = {
            "prediction": text.strip(),
            "generated_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "request_seconds": seconds,
            "stopped": choice.finish_reason == "stop",
        }
        if logprobs:
            entry["confidence"] = math.exp(sum(token_logprobs)) if token_logprobs else None
        return entry

    def _request(self, prompt: Prompt, max_new_tokens: int, logprobs: bool, sampled: dict):
        import openai

        if prompt.messages is None:
            response = self._client.completions.create(
                model=self.endpoint.model,
                prompt=prompt.text,
                max_tokens=max_new_tokens,
                **sampled,
                **({"logprobs": 1} if logprobs else {}),
            )
            return response, _first_choice(response, self.endpoint)
        options = {"logprobs": True} if logprobs else {}
        try:
            response = self._client.chat.completions.create(
                model=self.endpoint.model,
                messages=list(prompt.messages),
                **sampled,
                **{self._completion_limit: max_new_tokens},
                **options,
            )
        except openai.BadRequestError as error:
            if self._completion_limit != "max_tokens" or "max_completion_tokens" not in str(error):
                raise
            self._completion_limit = "max_completion_tokens"
            return self._request(prompt, max_new_tokens, logprobs, sampled)
        return response, _first_choice(response, self.endpoint)

    def explain(self, error) -> Exception:
        """The error as a user reads it: which recipe field, what happened, what to do; never the key."""
        import openai

        e, where = self.endpoint, self.endpoint.field
        retries = f"after {e.max_retries} retries" if e.max_retries else "(endpoint.max_retries: 0)"
        if isinstance(error, openai.APITimeoutError):
            made = RemoteError(
                f"{where}: {e.host} did not answer within {e.timeout_seconds:g} s {retries}; raise "
                f"{where}.endpoint.timeout_seconds, or check the server. Answered rows are cached: rerun to continue"
            )
        elif isinstance(error, openai.APIConnectionError):
            made = RemoteError(
                f"{where}.endpoint.base_url: cannot reach {e.base_url} {retries} ({_cause(error)}); is the server "
                "running there? Answered rows are cached: rerun to continue"
            )
        elif isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
            if e.api_key_env is None:
                fix = f"it wants an API key: set {where}.endpoint.api_key_env to the variable that holds it"
            else:
                fix = f"check the key in ${e.api_key_env}"
            made = PipelineError(
                f"{where}.endpoint.api_key_env: {e.host} refused the key ({error.status_code}: "
                f"{_server_message(error)}); {fix}"
            )
        elif isinstance(error, openai.NotFoundError):
            made = PipelineError(
                f"{where}.model: {e.host} has no model {e.model!r} (404: {_server_message(error)}); check the name, "
                "or the base_url's path (it usually ends in /v1)"
            )
        elif isinstance(error, openai.RateLimitError):
            made = RemoteError(
                f"{where}: {e.host} still refused for its rate limit (429) {retries} with backoff "
                f"({_server_message(error)}); lower {where}.endpoint.concurrency (now {e.concurrency}) or raise "
                "endpoint.max_retries. Answered rows are cached: rerun to continue"
            )
        elif isinstance(error, openai.InternalServerError):
            made = RemoteError(
                f"{where}: {e.host} failed with {error.status_code} {retries} ({_server_message(error)}). "
                "Answered rows are cached: rerun to continue"
            )
        elif isinstance(error, openai.APIStatusError):
            made = PipelineError(
                f"{where}: {e.host} rejected the request for {e.model!r} ({error.status_code}: "
                f"{_server_message(error)})"
            )
        else:
            made = PipelineError(f"{where}: {e.host}: {error}")
        if self._key != NO_KEY:
            made.args = (str(made).replace(self._key, "***"),)
        return made


def _first_choice(response, endpoint: Endpoint):
    if not getattr(response, "choices", None):
        raise PipelineError(f"{endpoint.field}: {endpoint.host} answered {endpoint.model!r} with no choices")
    return response.choices[0]


def _cause(error) -> str:
    cause = error.__cause__ or error.__context__
    return f"{type(cause).__name__}: {cause}"[:200] if cause else str(error)


def _server_message(error) -> str:
    """What the server said: OpenAI's {"error": {"message"}}, or a bare message / detail / error string."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else inner
        message = message or body.get("message") or body.get("detail")
        if message:
            return str(message)[:300]
    return str(getattr(error, "message", error))[:300]


def ask_all(
    client: Client,
    prompts: list[Prompt],
    rows: list[int],
    max_new_tokens: int,
    on_answer: Callable[[dict], None],
    logprobs: bool = False,
    sampling: Sampling | None = None,
) -> None:
    """Ask `rows` with up to `concurrency` requests in flight; each answer goes to on_answer as it arrives,
    with `seconds` its share of the wall time (the time since the answer before it), as a batch's rows share
    their batch's time elsewhere. On an error the requests in flight still finish and are kept."""
    last = time.perf_counter()
    failure = None
    pool = ThreadPoolExecutor(client.endpoint.concurrency, thread_name_prefix="endpoint")
    try:

        def sampled(row: int) -> dict | None:
            if sampling is None:
                return None
            return {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seeds[row]}

        pending = {pool.submit(client.ask, prompts[row], max_new_tokens, logprobs, sampled(row)): row for row in rows}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                row = pending.pop(future)
                if future.exception() is not None:
                    failure = failure or future.exception()
                    continue
                now = time.perf_counter()
                on_answer({"row": row, **future.result(), "seconds": now - last})
                last = now
            if failure is not None:
                for future in pending:
                    future.cancel()  # not started: not asked, not paid
                pending = {f: r for f, r in pending.items() if not f.cancelled()}
    finally:  # also on a stop signal or Ctrl-C: nothing more is asked
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        raise failure


def run(endpoint: Endpoint, job: GenerationJob, on_batch: OnBatch) -> dict:
    """Generate job.todo through the API (each answer reported as it arrives), then time job.latency_rows
    one request at a time, as a user waits for one answer."""
    client = Client(endpoint)
    started = time.perf_counter()
    client.check()
    check_seconds = time.perf_counter() - started
    ask_all(client, job.prompts, job.todo, job.max_new_tokens, lambda entry: on_batch([entry]))
    single = [client.ask(job.prompts[row], job.max_new_tokens)["request_seconds"] for row in job.latency_rows]
    return {
        "runtime": "endpoint",
        "parameters": None,  # not knowable from the API
        "weights_memory_bytes": None,  # on the server, not here
        "peak_memory_bytes": None,
        "load_seconds": round(check_seconds, 3),
        "single_request_seconds": single,
        "prompt_tokens": None,  # the server's counts come with each answer
        "device": f"endpoint {endpoint.host}",
        "threads": endpoint.concurrency,
    }
