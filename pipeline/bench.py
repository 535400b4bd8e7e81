"""Benchmarks a user runs by hand, each comparing two ways side by side in one invocation.

`make bench`: batched evaluation against naive one-row-at-a-time generation.
`make bench-train`: the train stage against the stock transformers Trainer and a plain peft + AdamW loop (below).


Both ways run the recipe's base model on the same eval rows with the same greedy settings, each in a
process of its own, one after the other; the benchmark prints tokens/s, seconds per example and peak memory of
each, the ratios, and how many answers agree (left padding may flip a near-tie in float arithmetic).
"""

from __future__ import annotations

import time

import torch

from pipeline import data, models, precision
from pipeline.files import read_jsonl_records, write_json_atomic
from pipeline.machine import cpu_description, git_changed, git_commit
from pipeline.recipe import LoadedRecipe, load_recipe
from pipeline.run_layout import RunLayout
from pipeline.runtimes import PeakMemory
from pipeline.runtimes.transformers import eos_token_ids, generate_batches, until_eos
from pipeline.stages import train as train_stage


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
    """Each way in a process of its own, one after the other: the model loaded there, so each way's peak
    memory is its own and means what a candidate's does in the report (the process's peak above its
    memory before loading: weights, activations, KV cache)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    recipe = loaded.recipe
    results = {}
    for way in ("batched", "naive"):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results[way] = pool.submit(_generate_way, loaded, rows, way).result()
    batched, naive = results["batched"], results["naive"]
    same = sum(a == b for a, b in zip(batched.pop("answers"), naive.pop("answers"), strict=True))
    for way in results.values():
        way["tokens_per_second"] = way["tokens"] / way["seconds"]
        way["seconds_per_example"] = way["seconds"] / way["rows"]
    ratio = batched["tokens_per_second"] / naive["tokens_per_second"]
    print(
        f"{recipe.model.base}: {batched['rows']} rows, batch {recipe.evaluate.batch_size}, max_new_tokens "
        f"{recipe.evaluate.max_new_tokens}, {batched['device']}, {batched['threads']} threads, each way in its own "
        "process (peak MB: the process's peak above its memory before loading the model)"
    )
    print(f"{'':8} {'tokens/s':>10} {'s/example':>10} {'peak MB':>9}")
    for name, way in results.items():
        print(
            f"{name:8} {way['tokens_per_second']:10.1f} {way['seconds_per_example']:10.4f} "
            f"{way['peak_memory_bytes'] / 1e6:9.1f}"
        )
    print(f"batched / naive tokens/s: {ratio:.2f}x; identical answers: {same}/{batched['rows']}")
    return {"ratio": ratio, "identical": same, "rows": batched["rows"], **results}


def _generate_way(loaded: LoadedRecipe, rows: int, way: str) -> dict:
    """One way, in this (fresh) process: load the base, warm up on one row untimed, generate every row."""
    recipe = loaded.recipe
    settings = recipe.evaluate
    if settings.threads:
        torch.set_num_threads(settings.threads)
    source = models.resolve_model(recipe.model.base)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    data.apply_chat_template_file(tokenizer, recipe.data)
    chat = data.uses_chat_template(tokenizer, recipe.data.chat_template)
    eval_rows = data.load_rows(recipe.data, "eval")[:rows]
    prompts = [data.prompt_ids(tokenizer, row, chat) for row in eval_rows]
    dtype = models.compute_dtype(recipe.model.dtype)
    with PeakMemory() as memory:
        model = models.load_model(source, dtype, None, recipe.model.trust_remote_code)
        model.eval()
        naive_generate(model, tokenizer, prompts[:1], settings.max_new_tokens)  # warm-up, untimed
        started = time.perf_counter()
        if way == "batched":
            found = {}
            every_row = list(range(len(prompts)))
            for batch in generate_batches(
                model, tokenizer, prompts, every_row, settings.max_new_tokens, settings.batch_size, desc="batched"
            ):
                found.update({entry["row"]: entry for entry in batch})
            seconds = time.perf_counter() - started
            answers = [found[i]["prediction"] for i in every_row]
            tokens = sum(entry["generated_tokens"] for entry in found.values())
        else:
            generated = naive_generate(model, tokenizer, prompts, settings.max_new_tokens)
            seconds = time.perf_counter() - started
            answers = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in generated]
            tokens = sum(min(len(a) + 1, settings.max_new_tokens) for a in generated)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "rows": len(prompts),
        "answers": answers,
        "peak_memory_bytes": memory.peak_bytes,
        "device": str(models.device()),
        "threads": torch.get_num_threads(),
    }


def where_now() -> dict:
    """The code and machine a benchmark runs on, taken before it starts (the tree may change while it runs)."""
    import datetime
    import os

    return {
        "commit": (git_commit() or "")[:7] or None,
        "changed": git_changed(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }


def write_figures(path, kind: str, invocation: str, where: dict, figures: dict) -> None:
    """A benchmark's figures with where and when they were measured (`where_now()` before it ran), for
    `specialist results --add FILE --as NAME` (the manual shows a benchmark only from such a file)."""
    write_json_atomic(path, {"kind": kind, "invocation": invocation, **where, "figures": figures})


# --- make bench-train ---------------------------------------------------------------------------

TRAIN_WAYS = ("train stage", "stock Trainer", "plain loop")


def run_train(recipe_path, overrides: list[str], rows: int = 320, repeats: int = 1) -> dict:
    """The train stage against what users of other tools get on the same rows, LoRA config, batch size, schedule
    and seed: transformers' stock Trainer with the model's own loss over right-padded batches (what axolotl and
    LLaMA-Factory run on a CPU) and a plain peft + AdamW loop; each in its own process (clean peak memory), one
    after the other. Prints real (unpadded) tokens/s, losses, memory, and each way's share of the matmul limit:
    the tokens/s the probe's rate for its frozen dtype would allow if a step were nothing but the 4 FLOP per
    weight per token that LoRA's forward and backward products of the decoder's linear layers cost.

    repeats: every way that many times, in turn (stage, stock, loop, stage, ...), each figure the way's median run:
    a shared machine that speeds up or slows down for a minute then moves every way alike, not one of them."""
    import multiprocessing
    import statistics
    from concurrent.futures import ProcessPoolExecutor

    overrides = [*overrides, f"data.max_train_rows={rows}", "train.save_steps=100000", "train.processes=1"]
    runs: dict[str, list[dict]] = {way: [] for way in TRAIN_WAYS}
    for _ in range(repeats):
        for way in TRAIN_WAYS:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs[way].append(pool.submit(_train_way, str(recipe_path), overrides, way).result())
    results = {}
    for way, done in runs.items():
        rates = sorted(run["tokens_per_second"] for run in done)
        median = statistics.median_low(rates)
        results[way] = {
            **next(run for run in done if run["tokens_per_second"] == median),
            "runs_tokens_per_second": rates,
        }
    stage, stock, loop = (results[way] for way in TRAIN_WAYS)
    probe = stage["probe"]
    print(
        f"{stage['base']}: {stage['rows']} rows, {stage['tokens']:,} real tokens ({stage['target_tokens']:,} trained), "
        f"batch {stage['batch_size']}, {stage['steps']} steps, LoRA r={stage['r']}, {stage['device']}, "
        f"{stage['threads']} threads; frozen base weights: train stage {stage['frozen_dtype']}, the others "
        f"{loop['frozen_dtype']}"
    )
    if probe:
        rates = ", ".join(f"{d} {r:.0f}" for d, r in probe["gflops"].items() if r)
        print(
            f"matmul probe ({probe['cpu']}, torch {probe['torch']}, {probe['threads']} threads), GFLOP/s at this "
            f"model's shapes: {rates}; chosen: {probe['chosen']} ({probe['why']})"
        )
    header = (
        f"{'seconds':>8} {'tokens/s':>9} {'first loss':>10} {'final loss':>10} {'eval loss':>9} {'peak MB':>8} "
        f"{'of limit':>8}" + ("   tokens/s of each run" if repeats > 1 else "")
    )
    print(f"{'':13} {header}" + (f" (median of {repeats} runs per way, in turn)" if repeats > 1 else ""))
    for name, way in results.items():
        share = f"{way['share_of_limit']:8.0%}" if way["share_of_limit"] is not None else f"{'—':>8}"
        each = "   " + " ".join(f"{r:.1f}" for r in way["runs_tokens_per_second"]) if repeats > 1 else ""
        print(
            f"{name:13} {way['seconds']:8.1f} {way['tokens_per_second']:9.1f} {way['first_loss']:10.4f} "
            f"{way['final_loss']:10.4f} {way['eval_loss']:9.4f} {way['peak_memory_bytes'] / 1e6:8.0f} {share}{each}"
        )
    ratio = stage["tokens_per_second"] / loop["tokens_per_second"]
    over_stock = stage["tokens_per_second"] / stock["tokens_per_second"]
    if stage.get("validation_seconds"):
        print(f"(the train stage's {stage['validation_seconds']:.1f} s of validation passes are not counted above)")
    print(f"train stage / plain loop, real tokens/s: {ratio:.2f}x; train stage / stock Trainer: {over_stock:.2f}x")
    return {"ratio": ratio, "ratio_over_stock_trainer": over_stock, **results}


def _train_way(recipe_path: str, overrides: list[str], way: str) -> dict:
    import tempfile
    from pathlib import Path

    loaded = load_recipe(recipe_path, overrides)
    recipe = loaded.recipe
    source = models.resolve_model(recipe.model.base)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    data.apply_chat_template_file(tokenizer, recipe.data)
    chat = data.uses_chat_template(tokenizer, recipe.data.chat_template)
    splits = data.load_splits(recipe.data)
    examples = data.training_examples(tokenizer, splits.train, chat, recipe.data).examples
    eval_examples = data.training_examples(tokenizer, splits.eval[:64], chat, recipe.data).examples
    validation_seconds = 0.0
    with PeakMemory() as memory:
        if way == "train stage":
            from peft import PeftModel

            with tempfile.TemporaryDirectory() as folder:
                run_dir = Path(folder)
                result = train_stage.run(loaded, run_dir)
                losses = [row["loss"] for row in read_jsonl_records(RunLayout(run_dir).train_metrics) if "loss" in row]
                base = models.load_model(source, models.compute_dtype(recipe.model.dtype))
                model = PeftModel.from_pretrained(base, RunLayout(run_dir).adapter)
            validation_seconds = result["validation"].get("seconds") or 0.0  # scoring checkpoints is not training
            seconds, steps = result["train_seconds"] - validation_seconds, result["steps"]
            frozen, probe = result["frozen_dtype"], result["precision"]["probe"]
        else:
            train_loop = _stock_trainer if way == "stock Trainer" else _plain_loop
            model, losses, seconds = train_loop(recipe, source, examples, tokenizer)
            steps, frozen = len(losses), str(models.compute_dtype(recipe.model.dtype)).removeprefix("torch.")
            probe = None
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    epochs = recipe.train.epochs
    tokens_per_second = tokens * epochs / seconds
    return {
        "base": recipe.model.base,
        "rows": len(examples),
        "tokens": tokens,
        "target_tokens": sum(sum(label != data.IGNORE_INDEX for label in ex["labels"]) for ex in examples),
        "batch_size": recipe.train.batch_size,
        "r": recipe.lora.r,
        "steps": steps,
        "seconds": seconds,
        "validation_seconds": validation_seconds,
        "tokens_per_second": tokens_per_second,
        "share_of_limit": _share_of_limit(model, tokens_per_second, probe, frozen),
        "first_loss": losses[0],
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "eval_loss": _eval_loss(model, eval_examples, tokenizer.pad_token_id),
        "peak_memory_bytes": memory.peak_bytes,
        "device": str(models.device()),
        "threads": torch.get_num_threads(),
        "frozen_dtype": frozen,
        "probe": probe,
    }


def _share_of_limit(model, tokens_per_second: float, probe: dict | None, frozen: str) -> float | None:
    """tokens/s x 4 FLOP x the decoder's linear weights, over the probe's rate for the frozen dtype (CPU only)."""
    if probe is None:
        probe = (
            precision.probe(precision.layer_shapes(model.get_base_model().config))
            if not torch.cuda.is_available()
            else None
        )
    rate = probe and probe["gflops"].get(frozen)
    if not rate:
        return None
    config = model.get_base_model().config
    weights = sum(fan_in * fan_out * count for fan_in, fan_out, count in precision.layer_shapes(config))
    return tokens_per_second * 4 * weights * config.num_hidden_layers / (rate * 1e9)


def _optimizer_and_schedule(train, parameters, examples):
    import math

    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / train.batch_size)
    total = train.max_steps or math.ceil(steps_per_epoch * train.epochs)
    warmup = math.ceil(total * train.warmup_ratio) if train.warmup_ratio < 1 else int(train.warmup_ratio)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total), total


def _peft_model(recipe, source):
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(recipe.train.seed)
    model = models.load_model(source, models.compute_dtype(recipe.model.dtype))
    model.config.use_cache = False
    return get_peft_model(model, train_stage.lora_config(recipe.lora))  # the train stage's own LoRA settings


def _plain_loop(recipe, source, examples, tokenizer):
    """What a user writes in an afternoon: peft, AdamW, shuffled padded batches, the model's own loss."""
    train = recipe.train
    model = _peft_model(recipe, source)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule, total = _optimizer_and_schedule(train, parameters, examples)
    generator = torch.Generator().manual_seed(train.seed)
    losses = []
    started = time.perf_counter()
    while len(losses) < total:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order), train.batch_size):
            batch = data.pad_batch([examples[j] for j in order[i : i + train.batch_size]], tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)  # as the Trainer does by default
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if len(losses) == total:
                break
    return model, losses, time.perf_counter() - started


def _stock_trainer(recipe, source, examples, tokenizer):
    """transformers' Trainer as the fine-tuning tools call it on a CPU: its default optimizer and sampler, the
    model's own loss over every position, batches right-padded by DataCollatorForSeq2Seq."""
    import tempfile

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    train = recipe.train
    model = _peft_model(recipe, source)
    tokenizer.padding_side = "right"
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(
            output_dir=folder,
            num_train_epochs=train.epochs,
            max_steps=train.max_steps or -1,
            per_device_train_batch_size=train.batch_size,
            learning_rate=train.lr,
            warmup_steps=train.warmup_ratio,
            weight_decay=train.weight_decay,
            lr_scheduler_type="linear",
            seed=train.seed,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE_INDEX)
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses, seconds


def _eval_loss(model, examples, pad_id) -> float:
    """Mean loss on the answer tokens of eval rows (teacher-forced): the two adapters on equal terms."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(examples), 16):
            batch = data.pad_batch(examples[i : i + 16], pad_id)
            n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / max(count, 1)
