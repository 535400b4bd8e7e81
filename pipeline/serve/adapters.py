"""`specialist serve --adapters RUN_OR_RECIPE...`: one base GGUF in memory, several runs' adapters on it, the
adapter chosen per request by the model name, as one OpenAI-compatible endpoint.

Each run's adapter GGUF (its quantize variant of kind gguf-lora; --variant picks one by name) names the shared
base file it was made for (quantize/<variant>/base.json): every run served together must name the same one.
llama.cpp loads that base once and each adapter beside it; a request sets its adapter on the context and is
answered with the evaluation's own code (the run's prompt rendering and tokenizer, greedy decoding, a clean KV
cache), so each adapter answers as its evaluation measured it. Requests run one at a time: one context.

Model names: the run's recipe name, or NAME given as NAME=RUN_OR_RECIPE. `GET /v1/models` lists them; a request
without `model` is refused unless one adapter is served. What a client sends: pipeline/serve/openai_api.py.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import data, gguf_export, models, sweep
from pipeline.errors import PipelineError
from pipeline.recipe import LoadedRecipe, load_recipe
from pipeline.run_layout import RunLayout
from pipeline.runtimes import Prompt, llamacpp
from pipeline.serve import openai_api, requests
from pipeline.serve.requests import RequestError


@dataclass
class Specialist:
    """One served adapter: the run it came from, how its requests are rendered, and llama.cpp's handle on it."""

    name: str
    loaded: LoadedRecipe
    run_dir: Path
    variant: str
    adapter_file: Path
    tokenizer: object  # the run's own (chat template, special tokens), as its evaluation rendered prompts
    chat: bool
    handle: object = None  # llama.cpp's loaded adapter


@dataclass
class AdapterServer:
    base_file: Path
    specialists: dict[str, Specialist]
    threads: int
    context: int
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self):
        import torch  # already loaded by pipeline.models

        self._llm = llamacpp.open_model(str(self.base_file), self.context, self.threads, torch.cuda.is_available())
        for specialist in self.specialists.values():
            specialist.handle = llamacpp.load_adapter(self._llm, str(specialist.adapter_file))
        self._lock = threading.Lock()  # one context: one request at a time, with its own adapter set

    def pick(self, body: dict) -> Specialist:
        name = body.get("model")
        if name is None and len(self.specialists) == 1:
            return next(iter(self.specialists.values()))
        if name not in self.specialists:
            known = ", ".join(self.specialists)
            said = "no model named" if name is None else f"model {name!r} is not served;"
            raise RequestError(404 if name is not None else 400, f"{said} name one of: {known}")
        return self.specialists[name]

    def answer(self, body: dict, chat: bool) -> dict:
        specialist = self.pick(body)
        section = specialist.loaded.recipe.data
        limit = requests.max_tokens(body, specialist.loaded.recipe.evaluate.max_new_tokens)
        if section.format == "messages":
            row = openai_api.conversation_row(body, chat)
        else:
            fields = openai_api.fields_of(body, chat, openai_api.input_fields(section, section.prompt))
            row = openai_api.task_row(section, section.prompt, fields)
        text, add_special = data.prompt_text(specialist.tokenizer, row, specialist.chat)
        with self._lock:
            llamacpp.use_adapter(self._llm, specialist.handle)
            ids = llamacpp.tokenize(self._llm, Prompt([], text, add_special))
            openai_api.check_context(len(ids), limit, self.context)
            answer = llamacpp.complete(self._llm, ids, limit)
        self.counts[specialist.name] += 1
        return openai_api.completion(answer["prediction"], answer, chat, specialist.name, len(ids), "adapter")

    def describe(self) -> str:
        served = ", ".join(f"{s.name} ({s.run_dir}, {s.variant})" for s in self.specialists.values())
        size = self.base_file.stat().st_size / 1e6
        adapters = sum(s.adapter_file.stat().st_size for s in self.specialists.values()) / 1e6
        count = len(self.specialists)
        return f"one base {self.base_file} ({size:.1f} MB) with {count} adapters ({adapters:.1f} MB): {served}"


def load(refs: list[str], runs_dir: Path, variant: str | None = None, threads: int | None = None, context: int = 4096):
    """The runs' adapters on their shared base. refs: RUN_OR_RECIPE or NAME=RUN_OR_RECIPE."""
    import os

    if not refs:
        raise PipelineError("serve --adapters: give at least one run folder or recipe")
    specialists: dict[str, Specialist] = {}
    bases: dict[Path, list[str]] = {}
    for ref in refs:
        name, _, where = ref.rpartition("=") if "=" in ref else ("", "", ref)
        run_dir = sweep.run_folder(where, runs_dir, "serve --adapters")
        loaded = load_recipe(RunLayout(run_dir).resolved_recipe)
        label = _adapter_variant(loaded, run_dir, variant, ref)
        base_file, adapter_file = gguf_export.variant_files("gguf-lora", RunLayout(run_dir).variant(label))
        name = name or loaded.recipe.name
        if name in specialists:
            raise PipelineError(f"serve --adapters: two runs would both be served as {name!r}; name them: NAME={where}")
        tokenizer = models.load_tokenizer(models.ModelSource(str(RunLayout(run_dir).variant(label)), None, True))
        data.apply_chat_template_file(tokenizer, loaded.recipe.data)
        chat = data.uses_chat_template(tokenizer, loaded.recipe.data.chat_template)
        specialists[name] = Specialist(name, loaded, run_dir, label, adapter_file, tokenizer, chat)
        bases.setdefault(base_file, []).append(name)
    if len(bases) > 1:
        each = "; ".join(f"{', '.join(names)}: {base}" for base, names in bases.items())
        raise PipelineError(
            f"serve --adapters: the adapters were made for different bases ({each}); one server holds one base: "
            "serve the runs on each base apart, or build each with the same model.base and base_type"
        )
    return AdapterServer(next(iter(bases)), specialists, threads or os.cpu_count() or 1, context)


def _adapter_variant(loaded: LoadedRecipe, run_dir: Path, wanted: str | None, ref: str) -> str:
    """The run's gguf-lora variant: --variant where given, else its first."""
    labels = [v.label for v in loaded.recipe.quantize if v.kind == "gguf-lora"]
    if not labels:
        raise PipelineError(
            f"serve --adapters: {ref} has no adapter GGUF; add {{kind: gguf-lora, base_type: q8_0}} under quantize: "
            "and run `make quantize`"
        )
    if wanted is not None and wanted not in labels:
        raise PipelineError(f"serve --adapters: --variant {wanted}: {ref} has {', '.join(labels)}")
    label = wanted or labels[0]
    if not (RunLayout(run_dir).variant(label) / "adapter.gguf").is_file():
        raise PipelineError(f"serve --adapters: {run_dir} has no finished {label}; run `make quantize` for it")
    return label


def app(server: AdapterServer, api_key: str | None = None, max_waiting: int = openai_api.MAX_WAITING):
    """/v1/chat/completions, /v1/completions, /v1/models, /adapters/stats, /health."""
    return openai_api.app(
        "specialist adapters",
        lambda body, chat: (server.answer(body, chat), {}),
        lambda: list(server.specialists),
        "/adapters/stats",
        lambda: {"base": str(server.base_file), "requests": dict(server.counts)},
        api_key,
        max_waiting=max_waiting,
    )


def run(server: AdapterServer, host: str, port: int, api_key_env: str | None, max_waiting: int) -> None:
    openai_api.serve(app(server, openai_api.api_key_from(api_key_env), max_waiting), host, port)
