"""`make bench`: batched evaluation against naive one-row-at-a-time generation, side by side.

Both ways run the recipe's base model on the same eval rows with the same greedy settings, in one
process, one after the other; the benchmark prints tokens/s, seconds per example and peak memory of
each, the ratios, and how many answers agree (left padding may flip a near-tie in float arithmetic).
"""

from __future__ import annotations

import time

import torch

from pipeline import data, models
from pipeline.recipe import LoadedRecipe
from pipeline.runtimes import PeakMemory
from pipeline.runtimes.transformers import eos_token_ids, generate_batches, until_eos


def naive_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """One model.generate call per row, no padding: what a first evaluation script usually does."""
    eos_ids = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    answers = []
    for prompt in prompts:
        with torch.inference_mode():
            output = model.generate(
                input_ids=torch.tensor([prompt], device=device),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(until_eos(output[0, len(prompt) :].tolist(), eos_ids))
    return answers


def run(loaded: LoadedRecipe, rows: int = 64) -> dict:
    recipe = loaded.recipe
    source = models.resolve_model(recipe.model.base)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    data.apply_chat_template_file(tokenizer, recipe.data)
    model = models.load_model(source, models.compute_dtype(recipe.model.dtype), None, recipe.model.trust_remote_code)
    model.eval()
    chat = data.uses_chat_template(tokenizer, recipe.data.chat_template)
    eval_rows = data.load_rows(recipe.data, "eval")[:rows]
    prompts = [data.prompt_ids(tokenizer, row, chat) for row in eval_rows]
    settings = recipe.evaluate
    # one untimed warm-up row each, so neither way pays for first-call allocations
    naive_generate(model, tokenizer, prompts[:1], settings.max_new_tokens)

    results = {}
    with PeakMemory() as memory:
        started = time.perf_counter()
        batched = {}
        for batch in generate_batches(
            model,
            tokenizer,
            prompts,
            list(range(len(prompts))),
            settings.max_new_tokens,
            settings.batch_size,
            desc="batched",
        ):
            batched.update({entry["row"]: entry for entry in batch})
        seconds = time.perf_counter() - started
    tokens = sum(e["generated_tokens"] for e in batched.values())
    results["batched"] = {"seconds": seconds, "tokens": tokens, "peak_memory_bytes": memory.peak_bytes}

    with PeakMemory() as memory:
        started = time.perf_counter()
        naive = naive_generate(model, tokenizer, prompts, settings.max_new_tokens)
        seconds = time.perf_counter() - started
    tokens = sum(min(len(a) + 1, settings.max_new_tokens) for a in naive)
    results["naive"] = {"seconds": seconds, "tokens": tokens, "peak_memory_bytes": memory.peak_bytes}

    same = sum(
        tokenizer.decode(a, skip_special_tokens=True).strip() == batched[i]["prediction"] for i, a in enumerate(naive)
    )
    for way in results.values():
        way["tokens_per_second"] = way["tokens"] / way["seconds"]
        way["seconds_per_example"] = way["seconds"] / len(prompts)
    ratio = results["batched"]["tokens_per_second"] / results["naive"]["tokens_per_second"]
    print(
        f"{recipe.model.base}: {len(prompts)} rows, batch {settings.batch_size}, max_new_tokens "
        f"{settings.max_new_tokens}, {models.device()}"
    )
    print(f"{'':8} {'tokens/s':>10} {'s/example':>10} {'peak MB':>9}")
    for name, way in results.items():
        print(
            f"{name:8} {way['tokens_per_second']:10.1f} {way['seconds_per_example']:10.4f} "
            f"{way['peak_memory_bytes'] / 1e6:9.1f}"
        )
    print(f"batched / naive tokens/s: {ratio:.2f}x; identical answers: {same}/{len(prompts)}")
    return {"ratio": ratio, "identical": same, "rows": len(prompts), **results}
