"""Evaluate stage: every candidate answers the same eval rows with the same greedy decoding.

Candidates: the general base, the specialized model (base + adapter), each quantized variant, and the
reference. Per candidate it records the generations (evaluate/generations/<name>.jsonl, a cache that
lets an interrupted evaluation continue and `make report` rebuild without generating), the task
metrics from the shipped `evaluate` modules, and what running it cost: load time, peak memory,
seconds per example, generated tokens per second, prompt tokens per example, size.
"""

from __future__ import annotations

import gc
import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import evaluate as hf_evaluate
import psutil
import torch
from tqdm.auto import tqdm

from pipeline import data, models
from pipeline.errors import PipelineError
from pipeline.metrics import metric_path, user_metric
from pipeline.recipe import LoadedRecipe
from pipeline.runs import (
    dir_size_bytes,
    done_fingerprint,
    log,
    mark_done,
    stage_fingerprint,
    write_json_atomic,
)

STAGE = "evaluate"


@dataclass(frozen=True)
class Candidate:
    name: str
    role: str  # base | specialized | quantized | reference
    source: models.ModelSource
    adapter_dir: Path | None = None
    quantized: bool = False  # weights already quantized on disk (bnb serialization)
    prompt_template: str | None = None  # None: data.prompt
    system: str | None = None  # system message, where the chat template is used
    chat_template: str | None = None  # None: data.chat_template
    trust_remote_code: bool = False

    def fingerprint(self) -> str:
        adapter = _file_stats(self.adapter_dir) if self.adapter_dir else None
        return stage_fingerprint(
            self.source.fingerprint, adapter, self.prompt_template, self.system, self.chat_template
        )


def candidates(loaded: LoadedRecipe, run_dir: Path) -> list[Candidate]:
    recipe = loaded.recipe
    base = models.resolve_model(recipe.model.base)
    trust = recipe.model.trust_remote_code
    found = [
        Candidate("base", "base", base, trust_remote_code=trust),
        Candidate(
            "specialized",
            "specialized",
            base,
            adapter_dir=run_dir / "train" / "adapter",
            trust_remote_code=trust,
        ),
    ]
    for variant in recipe.quantize:
        folder = run_dir / "quantize" / variant.label
        found.append(Candidate(variant.label, "quantized", models.ModelSource(str(folder), None, True), quantized=True))
    reference = recipe.evaluate.reference
    if reference:
        source = models.resolve_model(reference.model, "evaluate.reference.model")
        found.append(
            Candidate(
                "reference",
                "reference",
                source,
                prompt_template=reference.prompt,
                system=reference.system,
                chat_template=reference.chat_template,
            )
        )
    return found


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str:
    return stage_fingerprint(
        STAGE,
        done_fingerprint(run_dir / "quantize"),
        loaded.recipe.evaluate.model_dump(),
        [c.fingerprint() for c in candidates(loaded, run_dir)],
    )


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    recipe = loaded.recipe
    if done_fingerprint(run_dir / "train") is None:
        raise PipelineError(
            f"{run_dir}: no finished train stage to evaluate; run `make train RECIPE={loaded.path}` first"
        )
    if recipe.quantize and done_fingerprint(run_dir / "quantize") is None:
        raise PipelineError(f"{run_dir}: no finished quantize stage; run `make quantize RECIPE={loaded.path}` first")
    stage_dir = run_dir / STAGE
    (stage_dir / "generations").mkdir(parents=True, exist_ok=True)
    scorers = {name: _scorer(name) for name in recipe.evaluate.metrics}

    results = {}
    rows_by_prompt: dict[str | None, list[data.TaskRow]] = {}  # read and render the data once per prompt template
    for candidate in candidates(loaded, run_dir):
        if candidate.prompt_template not in rows_by_prompt:
            rows_by_prompt[candidate.prompt_template] = data.load_rows(
                recipe.data, "eval", candidate.prompt_template, "evaluate.reference.prompt"
            )
        rows = rows_by_prompt[candidate.prompt_template]
        generations, cost = _generations(candidate, rows, loaded, stage_dir)
        predictions = [g["prediction"] for g in generations]
        references = [row.target for row in rows]
        scores = {
            name: scorer(predictions, references, recipe.evaluate.ignore_case) for name, scorer in scorers.items()
        }
        results[candidate.name] = {"role": candidate.role, "metrics": scores, **cost}
        log(STAGE, f"{candidate.name}: " + ", ".join(f"{k}={v['value']:.3f}" for k, v in scores.items()))

    out = {"eval_rows": len(references), "candidates": results}
    write_json_atomic(stage_dir / "results.json", out)
    mark_done(stage_dir, fingerprint(loaded, run_dir))
    return out


def _scorer(name: str):
    """A function (predictions, references, ignore_case) -> {"value", "per_row", "mean_of_rows", ...}."""
    if ":" in name:
        function = user_metric(name, Path.cwd())

        def score_user(predictions, references, ignore_case):
            per_row = [float(x) for x in function(predictions, references)]
            if len(per_row) != len(predictions):
                raise PipelineError(
                    f"evaluate.metrics: {name} returned {len(per_row)} scores for {len(predictions)} rows"
                )
            return {"value": sum(per_row) / len(per_row), "per_row": per_row, "mean_of_rows": True}

        return score_user
    module = hf_evaluate.load(metric_path(name))

    def score_shipped(predictions, references, ignore_case):
        computed = module.compute(predictions=predictions, references=references, ignore_case=ignore_case)
        return {"value": computed.pop(name), **computed}

    return score_shipped


def _generations(candidate: Candidate, rows: list[data.TaskRow], loaded: LoadedRecipe, stage_dir: Path):
    """Generations and cost facts for one candidate, from the cache where it is complete."""
    settings = loaded.recipe.evaluate
    cache_key = stage_fingerprint(
        candidate.fingerprint(),
        [r.prompt for r in rows],
        [r.messages for r in rows] if rows and rows[0].messages else None,
        settings.max_new_tokens,
        settings.batch_size,
        loaded.recipe.data.chat_template,
        _text_of(loaded.recipe.data.chat_template_file) if candidate.role != "reference" else None,
        loaded.recipe.model.dtype,
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
        cache.write_text(json.dumps({"cache_key": cache_key}) + "\n")
    dtype = models.compute_dtype(loaded.recipe.model.dtype)
    with PeakMemory() as memory:
        started = time.perf_counter()
        model, tokenizer = _load_candidate(candidate, dtype)
        load_seconds = time.perf_counter() - started
        if candidate.role != "reference":  # the reference keeps its own chat template
            data.apply_chat_template_file(tokenizer, loaded.recipe.data)
        chat = data.uses_chat_template(tokenizer, candidate.chat_template or loaded.recipe.data.chat_template)
        prompts = [data.prompt_ids(tokenizer, row, chat, candidate.system) for row in rows]
        todo = [i for i in range(len(rows)) if i not in cached]
        log(STAGE, f"{candidate.name}: generating {len(todo)} answers ({len(cached)} cached)")
        for batch in generate_batches(
            model, tokenizer, prompts, todo, settings.max_new_tokens, settings.batch_size, desc=candidate.name
        ):
            with cache.open("a") as f:
                for entry in batch:
                    f.write(json.dumps(entry) + "\n")
                    cached[entry["row"]] = entry
    generations = [cached[i] for i in range(len(rows))]
    cost = _cost(candidate, model, generations, prompts, load_seconds, memory.peak_bytes)
    del model
    gc.collect()
    write_json_atomic(cost_path, {"cache_key": cache_key, **cost})
    return generations, cost


def generate_batches(
    model,
    tokenizer,
    prompts: list[list[int]],
    row_ids: list[int],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
):
    """Greedy, left-padded batched generation; yields one list of cache entries per batch.

    Rows are grouped by prompt length so batches carry little padding.
    """
    from transformers import GenerationConfig

    eos_ids = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    order = sorted(row_ids, key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        ids = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in ids)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in ids])
        attention = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in ids])
        _sync()
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
            )
        _sync()
        seconds_per_row = (time.perf_counter() - started) / len(ids)
        entries = []
        for i, sequence in zip(ids, output[:, width:].tolist(), strict=True):
            answer = _until_eos(sequence, eos_ids)
            entries.append(
                {
                    "row": i,
                    "prediction": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                    "generated_tokens": min(len(answer) + 1, len(sequence)),  # the EOS, where there was one, counts
                    "seconds": seconds_per_row,
                }
            )
        yield entries


def _until_eos(sequence: list[int], eos_ids: list[int]) -> list[int]:
    for position, token in enumerate(sequence):
        if token in eos_ids:
            return sequence[:position]
    return sequence


def _eos_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _load_candidate(candidate: Candidate, dtype: torch.dtype):
    if candidate.adapter_dir is not None:
        from peft import PeftModel

        if not candidate.adapter_dir.is_dir():
            raise PipelineError(f"{candidate.adapter_dir}: no adapter; run the train stage first")
        base = models.load_model(candidate.source, dtype, trust_remote_code=candidate.trust_remote_code)
        model = PeftModel.from_pretrained(base, candidate.adapter_dir)
        tokenizer = models.load_tokenizer(models.ModelSource(str(candidate.adapter_dir), None, True))
    else:
        # Quantized variants carry their bitsandbytes config in config.json; from_pretrained restores it.
        model = models.load_model(candidate.source, dtype, trust_remote_code=candidate.trust_remote_code)
        tokenizer = models.load_tokenizer(candidate.source, candidate.trust_remote_code)
    model.eval()
    return model, tokenizer


def _cost(
    candidate: Candidate,
    model,
    generations: list[dict],
    prompts: list[list[int]],
    load_seconds: float,
    peak_bytes: int,
) -> dict:
    seconds = [g["seconds"] for g in generations]
    tokens = sum(g["generated_tokens"] for g in generations)
    size = dir_size_bytes(Path(candidate.source.location)) if candidate.source.is_local else None
    adapter_size = dir_size_bytes(candidate.adapter_dir) if candidate.adapter_dir else None
    if size is not None and adapter_size is not None:
        size += adapter_size  # deployed as base + adapter
    return {
        "model": candidate.source.location,
        "adapter_size_bytes": adapter_size,
        "size_on_disk_bytes": size,
        "parameters": _parameters(candidate, model),
        "weights_memory_bytes": model.get_memory_footprint(),
        "peak_memory_bytes": peak_bytes,
        "load_seconds": round(load_seconds, 3),
        "seconds_per_example_p50": statistics.median(seconds),
        "seconds_per_example_p95": _percentile(seconds, 95),
        "generation_seconds": sum(seconds),
        "generated_tokens_per_second": tokens / sum(seconds) if sum(seconds) else None,
        "generated_tokens": tokens,
        "prompt_tokens_per_example": sum(len(p) for p in prompts) / len(prompts),
        "device": str(models.device()),
    }


def _parameters(candidate: Candidate, model) -> int:
    """Parameter count; for a quantized variant, that of the merged model it was made from (bitsandbytes
    packs several 4-bit weights into one stored element, so counting its tensors would undercount)."""
    if candidate.quantized:
        merged = json.loads((Path(candidate.source.location).parent / "result.json").read_text())
        return merged["variants"]["merged"]["parameters"]
    return sum(p.numel() for p in model.parameters())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _read_cache(cache: Path, cache_key: str) -> dict[int, dict]:
    """Completed generations of an earlier (maybe interrupted) run with the same key; else nothing.

    A line cut short by a kill is dropped, and the file is rewritten clean so appends can follow.
    """
    if not cache.is_file():
        return {}
    lines = cache.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]).get("cache_key") != cache_key:
            return {}
    except json.JSONDecodeError:
        return {}
    entries = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break
        entries[entry["row"]] = entry
    if len(entries) != len(lines) - 1:
        cache.write_text("".join(json.dumps(x) + "\n" for x in [{"cache_key": cache_key}, *entries.values()]))
    return entries


def _text_of(path: Path | None) -> str | None:
    return Path(path).read_text(encoding="utf-8") if path is not None else None


def _file_stats(folder: Path) -> list:
    if not folder.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory used while loading and running one candidate.

    CUDA: the allocator's peak. CPU: the highest process RSS sampled every 5 ms, minus the RSS before
    loading, so models evaluated earlier in the same process do not count.
    """

    def __init__(self, interval_seconds: float = 0.005):
        self.interval_seconds = interval_seconds
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._baseline = torch.cuda.memory_allocated()
        self._process = psutil.Process()
        self._rss_baseline = self._process.memory_info().rss
        self._rss_peak = self._rss_baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_seconds):
            self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._baseline
        else:
            self.peak_bytes = self._rss_peak - self._rss_baseline
        return False
