"""Evaluate stage: every candidate answers the same eval rows with the same greedy decoding.

Candidates: the general base, the specialized model (base + adapter), each quantized variant, and the
reference. Each runs through a runtime (pipeline/runtimes/): transformers for model folders, llama.cpp
for GGUF files, with the same prompts, greedy decoding and end tokens. Per candidate it records the
generations (evaluate/generations/<name>.jsonl, a cache that lets an interrupted evaluation continue
and `make report` rebuild without generating), the task metrics from the shipped `evaluate` modules,
and what running it cost: load time, peak memory, seconds per example amortized over a batch and per
single request, generated tokens per second, prompt tokens per example, size.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import data, gguf_export, llamacpp_install, models, precision, result_types, runtimes
from pipeline.errors import PipelineError
from pipeline.files import append_jsonl, dir_size_bytes, read_jsonl_records, write_json_atomic, write_jsonl_atomic
from pipeline.logs import log
from pipeline.metrics import scorer
from pipeline.recipe import LoadedRecipe, answer_identity, reference_runtime
from pipeline.run_layout import RunLayout
from pipeline.runs import mark_done, stage_done, stage_fingerprint, start_stage
from pipeline.runtimes import endpoint as endpoint_runtime
from pipeline.runtimes import llamacpp
from pipeline.runtimes import transformers as transformers_runtime
from pipeline.stages import synthesize

STAGE = "evaluate"


@dataclass(frozen=True)
class Candidate:
    name: str
    # base | specialized | quantized | reference | seed_only (a synthesize recipe: the seed rows alone)
    # | before_refit (train.refit: the adapter validation chose, before the refit on the validation rows too)
    role: str
    source: models.ModelSource
    adapter_dir: Path | None = None
    quantized: bool = False  # a variant of the quantize stage (bitsandbytes folder or GGUF file)
    gguf_file: Path | None = None  # run through llama.cpp instead of transformers
    lora_file: Path | None = None  # a LoRA GGUF llama.cpp applies to gguf_file (then the shared base)
    prompt_template: str | None = None  # None: data.prompt
    system: str | None = None  # system message, where the chat template is used
    chat_template: str | None = None  # None: data.chat_template
    trust_remote_code: bool = False
    endpoint: endpoint_runtime.Endpoint | None = None  # asked through an OpenAI-compatible API

    @property
    def variant_dir(self) -> Path:
        return Path(self.source.location)

    def fingerprint(self) -> str:
        if self.endpoint is not None:
            return stage_fingerprint(self.endpoint.identity, self.prompt_template, self.system, self.chat_template)
        adapter = _file_stats(self.adapter_dir) if self.adapter_dir else None
        gguf = _file_stats(self.variant_dir) if self.gguf_file else None
        # a reference answering through llama.cpp from its GGUF, not in PyTorch from the converted folder
        runtime = (
            ["llama.cpp", self.gguf_file.name, self.gguf_file.stat().st_size]
            if self.role == "reference" and self.gguf_file
            else []
        )
        return stage_fingerprint(
            self.source.fingerprint, adapter, gguf, self.prompt_template, self.system, self.chat_template, *runtime
        )


def candidates(loaded: LoadedRecipe, run_dir: Path) -> list[Candidate]:
    recipe = loaded.recipe
    base = models.resolve_model(recipe.model.base)
    trust = recipe.model.trust_remote_code
    found = [Candidate("base", "base", base, trust_remote_code=trust), _specialized(loaded, run_dir, base)]
    validated = RunLayout(run_dir).validated_adapter
    if recipe.train.refit and validated.is_dir():  # the same training without the validation rows: what refit bought
        found.append(Candidate("before-refit", "before_refit", base, adapter_dir=validated, trust_remote_code=trust))
    sibling = synthesize.seed_only_run(loaded, run_dir)
    if sibling is not None:  # the specialist of the seed rows alone: what the teacher's rows bought
        found.append(Candidate("seed-only", "seed_only", base, adapter_dir=_seed_only_adapter(loaded, sibling)))
    for variant in recipe.quantize:
        folder = RunLayout(run_dir).variant(variant.label)
        gguf, lora = gguf_export.variant_files(variant.kind, folder) if variant.is_gguf else (None, None)
        source = models.ModelSource(str(folder), None, True)
        found.append(Candidate(variant.label, "quantized", source, quantized=True, gguf_file=gguf, lora_file=lora))
    reference = recipe.evaluate.reference
    if reference:
        endpoint = None
        if reference.endpoint is not None:
            endpoint = endpoint_runtime.Endpoint.from_recipe(reference, "evaluate.reference")
            source = models.ModelSource(f"{reference.model} at {endpoint.base_url}", None, False)
        else:
            source = models.resolve_model(reference.model, "evaluate.reference.model")
        found.append(
            Candidate(
                "reference",
                "reference",
                source,
                gguf_file=reference_gguf(reference) if endpoint is None else None,
                prompt_template=reference.prompt,
                system=reference.system,
                chat_template=reference.chat_template,
                endpoint=endpoint,
            )
        )
    return found


def _seed_only_adapter(loaded: LoadedRecipe, sibling: Path) -> Path:
    adapter = RunLayout(sibling).adapter
    if stage_done(sibling, "train") is None:
        raise PipelineError(
            f"{sibling}: the seed-only specialist is not trained; `specialist run {loaded.path}` trains it before "
            "the evaluation (or set synthesize.seed_only: false)"
        )
    return adapter


def reference_gguf(reference) -> Path | None:
    """The GGUF file a local reference runs from through llama.cpp (evaluate.reference.runtime), else None."""
    if reference_runtime(reference) != "llamacpp":
        return None
    return models.gguf_file(reference.model, "evaluate.reference.model")


def _specialized(loaded: LoadedRecipe, run_dir: Path, base: models.ModelSource) -> Candidate:
    adapter = RunLayout(run_dir).adapter
    return Candidate(
        "specialized", "specialized", base, adapter_dir=adapter, trust_remote_code=loaded.recipe.model.trust_remote_code
    )


def specialist_answers(loaded: LoadedRecipe, run_dir: Path, rows: list[data.TaskRow], folder: Path) -> list[dict]:
    """The run's specialist's answer to each row, with its probability of it (`confidence`), through the evaluate
    stage's runtime and decoding, cached in folder/generations/ (`specialist suggest`)."""
    (folder / "generations").mkdir(parents=True, exist_ok=True)
    candidate = _specialized(loaded, run_dir, models.resolve_model(loaded.recipe.model.base))
    return candidate_answers(candidate, rows, loaded, folder, time_single_requests=False)[0]


def score_specialized(loaded: LoadedRecipe, run_dir: Path, rows: list[data.TaskRow], folder: Path) -> dict:
    """The specialized model alone on `rows` (a sweep trial's validation rows, a learning curve's eval rows):
    the evaluate stage's runtime, prompts, decoding, metrics and cost facts, generations cached in
    folder/generations/ so a killed sweep or curve continues. Returns {"rows", "metrics", cost facts...}."""
    (folder / "generations").mkdir(parents=True, exist_ok=True)
    candidate = _specialized(loaded, run_dir, models.resolve_model(loaded.recipe.model.base))
    generations, cost = candidate_answers(candidate, rows, loaded, folder)
    predictions = [g["prediction"] for g in generations]
    references = [row.target for row in rows]
    settings = loaded.recipe.evaluate
    metrics = {name: scorer(name)(predictions, references, settings.ignore_case) for name in settings.metrics}
    return {"rows": len(rows), "metrics": metrics, "predictions": predictions, "references": references, **cost}


def reference_deferred_only(recipe) -> bool:
    """The reference answers only the eval rows a cascade defers (the cascade stage asks it), not all of them."""
    return recipe.cascade is not None and recipe.cascade.reference_answers == "deferred_rows"


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str:
    settings = loaded.recipe.evaluate.model_dump()
    deferred_only = ["reference: deferred rows only"] if reference_deferred_only(loaded.recipe) else []
    return stage_fingerprint(
        STAGE,
        stage_done(run_dir, "quantize"),
        {**settings, "reference": answer_identity(settings["reference"])},
        [c.fingerprint() for c in candidates(loaded, run_dir)],
        *deferred_only,
    )


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    recipe = loaded.recipe
    if stage_done(run_dir, "train") is None:
        raise PipelineError(
            f"{run_dir}: no finished train stage to evaluate; run `make train RECIPE={loaded.path}` first"
        )
    if recipe.quantize and stage_done(run_dir, "quantize") is None:
        raise PipelineError(f"{run_dir}: no finished quantize stage; run `make quantize RECIPE={loaded.path}` first")
    stage_dir = start_stage(RunLayout(run_dir).stage(STAGE))
    (stage_dir / "generations").mkdir(parents=True, exist_ok=True)
    scorers = {name: scorer(name) for name in recipe.evaluate.metrics}

    results = {}
    rows_by_prompt: dict[str | None, list[data.TaskRow]] = {}  # read and render the data once per prompt template
    for candidate in candidates(loaded, run_dir):
        if candidate.role == "reference" and reference_deferred_only(recipe):
            log(STAGE, "reference: asked only for the eval rows a cascade defers (cascade.reference_answers)")
            continue
        if candidate.prompt_template not in rows_by_prompt:
            rows_by_prompt[candidate.prompt_template] = data.load_rows(
                recipe.data, "eval", candidate.prompt_template, "evaluate.reference.prompt"
            )
        rows = rows_by_prompt[candidate.prompt_template]
        generations, cost = candidate_answers(candidate, rows, loaded, stage_dir)
        predictions = [g["prediction"] for g in generations]
        references = [row.target for row in rows]
        scores = {
            name: scorer(predictions, references, recipe.evaluate.ignore_case) for name, scorer in scorers.items()
        }
        results[candidate.name] = {"role": candidate.role, "metrics": scores, **cost}
        log(STAGE, f"{candidate.name}: " + ", ".join(f"{k}={v['value']:.3f}" for k, v in scores.items()))

    own_rows = rows_by_prompt.get(None) or data.load_rows(recipe.data, "eval")
    # What was evaluated, row by row: compare pairs runs on these, whatever the eval file holds by then.
    write_jsonl_atomic(RunLayout(run_dir).eval_rows, [evaluated_row(row) for row in own_rows])
    out = {"eval_rows": len(references), "candidates": results}
    write_json_atomic(RunLayout(run_dir).eval_results, result_types.check(result_types.EvalResults, out))
    mark_done(stage_dir, fingerprint(loaded, run_dir))
    return out


def candidate_answers(
    candidate: Candidate,
    rows: list[data.TaskRow],
    loaded: LoadedRecipe,
    stage_dir: Path,
    time_single_requests: bool = True,
):
    """Generations and cost facts for one candidate, from the cache where it is complete. time_single_requests:
    also time evaluate.latency_rows of the rows one request at a time (off where no figure needs them)."""
    settings = loaded.recipe.evaluate
    latency_rows = latency_sample(len(rows), settings.latency_rows) if time_single_requests else []
    local = candidate.endpoint is None  # an API's answers do not depend on how this machine batches or computes
    # the specialist's and its variants' probability of each answer: what a cascade defers on
    confidence = local and candidate.role in ("specialized", "quantized")
    cache_key = stage_fingerprint(
        candidate.fingerprint(),
        [r.prompt for r in rows],
        [r.messages for r in rows] if rows and rows[0].messages else None,
        settings.max_new_tokens,
        settings.batch_size if local else None,
        settings.threads if local else None,
        latency_rows,
        loaded.recipe.data.chat_template,
        _text_of(loaded.recipe.data.chat_template_file) if candidate.role != "reference" else None,
        _dtype_key(loaded, candidate) if local else None,
        confidence,
    )
    cache = stage_dir / "generations" / f"{candidate.name}.jsonl"
    cost_path = stage_dir / "generations" / f"{candidate.name}.cost.json"
    cached = _read_cache(cache, cache_key)
    if len(cached) == len(rows) and cost_path.is_file() and json.loads(cost_path.read_text())["cache_key"] == cache_key:
        log(STAGE, f"{candidate.name}: {len(rows)} generations from cache")
        cost = json.loads(cost_path.read_text())
        cost.pop("cache_key")
        return [cached[i] for i in range(len(rows))], cost

    if not cached:
        write_jsonl_atomic(cache, [{"cache_key": cache_key}])
    if candidate.endpoint is not None:  # the server applies the model's chat template
        prompts = endpoint_runtime.prompts_for(rows, candidate.endpoint.chat, candidate.system)
    else:
        tokenizer = _tokenizer(candidate)
        if candidate.role != "reference":  # the reference keeps its own chat template
            data.apply_chat_template_file(tokenizer, loaded.recipe.data)
        chat = data.uses_chat_template(tokenizer, candidate.chat_template or loaded.recipe.data.chat_template)
        prompts = runtimes.prompts_for(tokenizer, rows, chat, candidate.system)
        too_long = runtimes.over_context(
            [len(p.ids) for p in prompts], rows, settings.max_new_tokens, _context(candidate), candidate.name
        )
        if too_long:
            raise PipelineError(f"evaluate: {too_long}")
    job = runtimes.GenerationJob(
        prompts=prompts,
        todo=[i for i in range(len(rows)) if i not in cached],
        latency_rows=latency_rows,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        threads=settings.threads or torch.get_num_threads(),
        confidence=confidence,
    )

    def keep(batch: list[dict]) -> None:
        append_jsonl(cache, batch)
        cached.update((entry["row"], entry) for entry in batch)

    log(STAGE, f"{candidate.name}: generating {len(job.todo)} answers ({len(cached)} cached)")
    if candidate.endpoint is not None:
        facts = endpoint_runtime.run(candidate.endpoint, job, keep)
    elif candidate.gguf_file is not None:
        llamacpp_install.ensure()  # built once per machine; a reference may be the run's only GGUF
        facts = llamacpp.run(candidate.gguf_file, job, keep, torch.cuda.is_available(), candidate.lora_file)
    else:
        dtype = candidate_dtype(loaded, candidate)
        facts = transformers_runtime.run(
            candidate.source,
            candidate.adapter_dir,
            dtype,
            candidate.trust_remote_code,
            tokenizer,
            job,
            keep,
            candidate.name,
        )
    generations = [cached[i] for i in range(len(rows))]
    cost = _cost(candidate, facts, generations)
    write_json_atomic(cost_path, {"cache_key": cache_key, **cost})
    return generations, cost


def candidate_dtype(loaded: LoadedRecipe, candidate: Candidate) -> torch.dtype:
    """The precision a PyTorch candidate computes in (evaluate.dtype; auto probes its own linear shapes)."""
    settings = loaded.recipe
    config = None
    if settings.evaluate.dtype == "auto":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            candidate.source.location, revision=candidate.source.revision, trust_remote_code=candidate.trust_remote_code
        )
    return precision.evaluation_dtype(settings.evaluate.dtype, settings.model.dtype, config)


def _dtype_key(loaded: LoadedRecipe, candidate: Candidate) -> str:
    """What precision the answers depend on: model.dtype as before evaluate.dtype existed, else the one resolved."""
    if loaded.recipe.evaluate.dtype == "model" or candidate.gguf_file is not None:
        return loaded.recipe.model.dtype
    return str(candidate_dtype(loaded, candidate))


def latency_sample(rows: int, count: int) -> list[int]:
    """Rows timed as single requests: `count` of them spread evenly over the eval file."""
    if count <= 0:
        return []
    step = max(1, rows // count)
    return list(range(0, rows, step))[:count]


def _context(candidate: Candidate) -> int | None:
    """The candidate's context in tokens, from its transformers config (None where there is none to read)."""
    if not candidate.source.is_local:
        return None
    try:
        config = json.loads((Path(candidate.source.location) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    return config.get("max_position_embeddings") if isinstance(config, dict) else None


def _tokenizer(candidate: Candidate):
    if candidate.adapter_dir is not None:
        return models.load_tokenizer(models.ModelSource(str(candidate.adapter_dir), None, True))
    return models.load_tokenizer(candidate.source, candidate.trust_remote_code)


def _cost(candidate: Candidate, facts: dict, generations: list[dict]) -> dict:
    seconds = [g["seconds"] for g in generations]
    counted = all(g.get("generated_tokens") is not None for g in generations)  # an API may not report usage
    tokens = sum(g["generated_tokens"] for g in generations) if counted else None
    prompt_tokens = facts["prompt_tokens"] or [g.get("prompt_tokens") for g in generations]  # API: per answer
    single = facts["single_request_seconds"]
    shared_base = None
    if candidate.lora_file is not None:  # what one more specialist adds: its adapter; the base is shared
        size, shared_base = candidate.lora_file.stat().st_size, candidate.gguf_file.stat().st_size
    elif candidate.gguf_file is not None:
        size = candidate.gguf_file.stat().st_size  # the file a user deploys; the tokenizer files beside it are not
    else:
        size = dir_size_bytes(Path(candidate.source.location)) if candidate.source.is_local else None
    adapter_size = dir_size_bytes(candidate.adapter_dir) if candidate.adapter_dir else None
    if size is not None and adapter_size is not None:
        size += adapter_size  # deployed as base + adapter
    return {
        "model": str(candidate.gguf_file or candidate.source.location),
        **({"adapter_file": str(candidate.lora_file), "shared_base_bytes": shared_base} if candidate.lora_file else {}),
        "runtime": facts["runtime"],
        "dtype": facts.get("dtype"),  # transformers: the compute dtype; llama.cpp: the GGUF's type; an API: None
        "adapter_size_bytes": adapter_size,
        "size_on_disk_bytes": size,
        "parameters": _parameters(candidate, facts),
        "weights_memory_bytes": facts["weights_memory_bytes"],
        "peak_memory_bytes": facts["peak_memory_bytes"],
        "process_peak_memory_bytes": facts.get("process_peak_memory_bytes"),  # the whole process's (not an API's)
        "load_seconds": facts["load_seconds"],
        "seconds_per_example_p50": statistics.median(seconds),
        "seconds_per_example_p95": runtimes.percentile(seconds, 95),
        "single_request_seconds_p50": runtimes.percentile(single, 50),
        "single_request_seconds_p95": runtimes.percentile(single, 95),
        "single_request_rows": len(single),
        "single_request_seconds": single,  # the samples: a cascade's latency mixes two models' (stages/cascade.py)
        # what answering costs the device, one request at a time (local runtimes; an API's is its server's)
        "cpu_seconds_per_1000_answers": _per_1000(facts.get("single_request_cpu_seconds"), len(single)),
        "joules_per_1000_answers": _per_1000(facts.get("single_request_energy_joules"), len(single)),
        "energy_counter": facts.get("energy_counter"),
        "generation_seconds": sum(seconds),
        "generated_tokens_per_second": tokens / sum(seconds) if tokens is not None and sum(seconds) else None,
        "generated_tokens": tokens,
        "generated_tokens_per_example": tokens / len(generations) if tokens is not None else None,
        "stopped_at_end_token": sum(bool(g.get("stopped")) for g in generations) / len(generations),
        "prompt_tokens_per_example": None if None in prompt_tokens else sum(prompt_tokens) / len(prompt_tokens),
        "device": facts["device"],
        "threads": facts["threads"],
    }


def _per_1000(total: float | None, answers: int) -> float | None:
    return None if total is None or not answers else 1000 * total / answers


def _parameters(candidate: Candidate, facts: dict) -> int:
    """Parameter count; for a quantized variant, that of the merged model it was made from (bitsandbytes
    packs several 4-bit weights into one stored element, so counting its tensors would undercount)."""
    if candidate.quantized:
        merged = json.loads(RunLayout(candidate.variant_dir.parent.parent).quantize_result.read_text())
        return merged["variants"]["merged"]["parameters"]
    return facts["parameters"]


def _read_cache(cache: Path, cache_key: str) -> dict[int, dict]:
    """Completed generations of an earlier (maybe interrupted) run with the same key; else nothing."""
    records = read_jsonl_records(cache)
    if not records or records[0].get("cache_key") != cache_key:
        return {}
    return {entry["row"]: entry for entry in records[1:] if "row" in entry}


def evaluated_row(row: data.TaskRow) -> dict:
    """An eval row as the run keeps it: what it asked (key: the prompt or conversation) and the expected answer."""
    return {"key": row.exact_key(), "input": row.input_text(), "expected": row.target}


def read_generations(cache: Path) -> list[dict]:
    """A candidate's cached generations in row order (the report reads them without generating)."""
    return sorted((entry for entry in read_jsonl_records(cache)[1:] if "row" in entry), key=lambda e: e["row"])


def _text_of(path: Path | None) -> str | None:
    return Path(path).read_text(encoding="utf-8") if path is not None else None


def _file_stats(folder: Path) -> list:
    if not folder.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())
