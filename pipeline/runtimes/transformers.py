"""The transformers runtime: a model folder (or a base + adapter), batched greedy generation.

Each candidate runs in a process of its own, so its peak memory is its own (as a llama.cpp candidate's
is): memory an earlier candidate freed in the same process would otherwise be reused, and a specialist
could read less than its own base. The processes are forked from a server that has imported torch,
transformers and peft once (multiprocessing's forkserver), so a candidate's process starts in a fraction
of a second and inherits no model, thread pool or CUDA context.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline import models
from pipeline.errors import PipelineError
from pipeline.fused_lora import fuse_lora_layers
from pipeline.runtimes import DeviceCost, GenerationJob, OnBatch, PeakMemory, Sampling, run_in_child


def run(
    source: models.ModelSource,
    adapter_dir: Path | None,
    dtype: torch.dtype,
    trust_remote_code: bool,
    tokenizer,
    job: GenerationJob,
    on_batch: OnBatch,
    desc: str,
    allowed_tokens=None,
) -> dict:
    """Generate job.todo in batches (reporting each batch), then time job.latency_rows one request at a time,
    with job.threads threads, in a process of its own. allowed_tokens: see generate_batches."""
    args = (source, adapter_dir, dtype, trust_remote_code, tokenizer, job, desc, allowed_tokens)
    return run_in_child(_context(), _generate, args, on_batch, desc)


def _context():
    """Forked from a server with the runtime imported; spawned (a fresh interpreter) where fork is missing."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.runtimes.transformers", "peft", "transformers.generation"])
    return context


def _generate(
    source,
    adapter_dir,
    dtype,
    trust_remote_code,
    tokenizer,
    job: GenerationJob,
    desc,
    allowed_tokens,
    on_batch,
) -> dict:
    torch.set_num_threads(job.threads)  # evaluate.threads, as llama.cpp candidates get it
    with PeakMemory() as memory:
        started = time.perf_counter()
        model = load(source, adapter_dir, dtype, trust_remote_code)
        load_seconds = time.perf_counter() - started
        prompts = [p.ids for p in job.prompts]
        batches = generate_batches(
            model,
            tokenizer,
            prompts,
            job.todo,
            job.max_new_tokens,
            job.batch_size,
            desc,
            allowed_tokens=allowed_tokens,
            confidence=job.confidence,
            sampling=job.sampling,
        )
        for batch in batches:
            on_batch(batch)
        with DeviceCost(cuda=torch.cuda.is_available()) as device_cost:  # what one request at a time costs
            single = single_request_seconds(model, tokenizer, prompts, job.latency_rows, job.max_new_tokens)
    return {
        "runtime": "transformers",
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_memory_bytes": model.get_memory_footprint(),
        "peak_memory_bytes": memory.peak_bytes,
        "process_peak_memory_bytes": memory.process_peak_bytes,
        "load_seconds": round(load_seconds, 3),
        "single_request_seconds": single,
        **device_cost.facts("single_request"),
        "prompt_tokens": [len(p) for p in prompts],
        "device": str(models.device()),
        "threads": torch.get_num_threads(),
    }


def load(source: models.ModelSource, adapter_dir: Path | None, dtype: torch.dtype, trust_remote_code: bool):
    if adapter_dir is not None:
        from peft import PeftModel

        if not adapter_dir.is_dir():
            raise PipelineError(f"{adapter_dir}: no adapter; run the train stage first")
        base = models.load_model(source, dtype, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, adapter_dir)
        fuse_lora_layers(model)  # the adapter's product added inside the base's, as in training
    else:
        # Quantized variants carry their bitsandbytes config in config.json; from_pretrained restores it.
        model = models.load_model(source, dtype, trust_remote_code=trust_remote_code)
    model.eval()
    return model


def single_request_seconds(model, tokenizer, prompts: list[list[int]], rows: list[int], max_new_tokens: int):
    """Seconds per request, one row at a time as a local user sends them, after one untimed warm-up."""
    if not rows:
        return []
    list(generate_batches(model, tokenizer, prompts, rows[:1], max_new_tokens, 1, progress=False))  # warm-up
    seconds = []
    for row in tqdm(rows, desc="single requests", unit="request", leave=False):
        (entry,) = next(generate_batches(model, tokenizer, prompts, [row], max_new_tokens, 1, progress=False))
        seconds.append(entry["seconds"])
    return seconds


def generate_batches(
    model,
    tokenizer,
    prompts: list[list[int]],
    row_ids: list[int],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
    progress: bool = True,
    allowed_tokens=None,
    confidence: bool = False,
    sampling: Sampling | None = None,
):
    """Greedy (or, with sampling, sampled), left-padded batched generation; yields one list of entries per batch.

    Rows are grouped by prompt length so batches carry little padding, and the prompt prefix a batch's rows
    share is computed once for the batch (shared_prefix_length). allowed_tokens(generated ids) ->
    token ids constrains each step (a closed answer set); with confidence, each entry also has the model's
    probability of its answer: the product of its tokens' probabilities after that constraint.
    """
    from transformers import GenerationConfig

    eos_ids = eos_token_ids(model, tokenizer)
    # a tokenizer without pad or end token (some GGUF imports): pad with the model's end token, never attended
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    sampled = {"do_sample": False}
    if sampling is not None:
        sampled = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        **sampled,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        output_scores=confidence,
        return_dict_in_generate=True,
    )
    order = sorted(row_ids, key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False) if progress else starts:
        ids = order[start : start + batch_size]
        rows = [prompts[i] for i in ids]
        width = max(len(p) for p in rows)
        shared = shared_prefix_length(model, rows)
        # the shared prefix first, then each row's padding, then the rest of its prompt: the padding is never
        # attended and position ids count real tokens, so every row is computed as it would be alone
        input_ids = torch.tensor([p[:shared] + [pad_id] * (width - len(p)) + p[shared:] for p in rows])
        attention = torch.tensor([[1] * shared + [0] * (width - len(p)) + [1] * (len(p) - shared) for p in rows])
        if sampling is not None:  # seeded per batch: the same rows in the same batch draw the same answers
            torch.manual_seed(sampling.seeds[ids[0]])
        _sync()
        started = time.perf_counter()
        extra = {}
        if allowed_tokens is not None:
            extra["prefix_allowed_tokens_fn"] = lambda _, sequence, w=width: allowed_tokens(sequence[w:].tolist())
        with torch.inference_mode():
            if shared:
                extra["past_key_values"] = _prefix_cache(model, rows[0][:shared], len(rows), device)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                **extra,
            )
        _sync()
        seconds_per_row = (time.perf_counter() - started) / len(ids)
        entries = []
        for position, (i, sequence) in enumerate(zip(ids, output.sequences[:, width:].tolist(), strict=True)):
            answer = until_eos(sequence, eos_ids)
            stopped = len(answer) < len(sequence)
            entry = {
                "row": i,
                "prediction": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                "generated_tokens": len(answer) + stopped,  # the end token, where there was one, counts
                "seconds": seconds_per_row,
                "stopped": stopped,
            }
            if confidence:
                steps = sequence[: len(answer) + stopped]
                log_p = sum(float(output.scores[t][position].log_softmax(-1)[token]) for t, token in enumerate(steps))
                entry["confidence"] = math.exp(log_p)
            entries.append(entry)
        yield entries


MIN_SHARED_PREFIX = 4  # tokens: below this the extra forward of the prefix costs more than it saves


def shared_prefix_length(model, rows: list[list[int]]) -> int:
    """How many leading tokens every prompt of a batch shares (the template's instructions, a system message),
    computed once for the batch instead of once per row; 0 where not worth it or where the model's cache is not
    transformers' default one. At least one token of every prompt is left to the batch."""
    if len(rows) < 2 or getattr(model.generation_config, "cache_implementation", None):
        return 0
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return 0
    shortest = min(len(p) for p in rows) - 1
    shared = 0
    while shared < shortest and all(p[shared] == rows[0][shared] for p in rows):
        shared += 1
    return shared if shared >= MIN_SHARED_PREFIX else 0


def _prefix_cache(model, prefix: list[int], rows: int, device):
    """The KV cache of `prefix`, computed once and repeated for each row of the batch."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix], device=device), past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(rows)
    return cache


def until_eos(sequence: list[int], eos_ids: list[int]) -> list[int]:
    for position, token in enumerate(sequence):
        if token in eos_ids:
            return sequence[:position]
    return sequence


def eos_token_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
