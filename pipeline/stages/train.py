"""Train stage: LoRA on the recipe's base model with transformers' Trainer.

Writes train/adapter/ (the adapter and tokenizer), train/metrics.jsonl (loss per step) and
train/checkpoints/ (resumable: a killed run continues from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, set_seed

from pipeline import allocator, data, models, precision, result_types, runtimes, tracking, train_validation
from pipeline.answer_loss import accepts_logits_to_keep, answer_loss_sum, grouped_answer_loss_sum
from pipeline.errors import Interrupted, PipelineError, RuntimeFailure
from pipeline.files import (
    append_jsonl,
    read_jsonl_records,
    replace_dir,
    temp_dir_for,
    write_json_atomic,
    write_jsonl_atomic,
)
from pipeline.fused_lora import fuse_lora_layers
from pipeline.logs import log
from pipeline.metrics import scorer
from pipeline.processes import StopSignal, in_launched_process, is_main_process
from pipeline.recipe import LoadedRecipe, data_fingerprint
from pipeline.run_layout import RunLayout
from pipeline.runs import mark_done, stage_done, stage_fingerprint, start_stage
from pipeline.stages import distill as distill_stage

STAGE = "train"


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str:
    r = loaded.recipe
    base = models.resolve_model(r.model.base)
    return stage_fingerprint(
        STAGE,
        r.model.model_dump(),
        r.lora.model_dump(),
        r.train.model_dump(exclude={"report_to"}),
        data_fingerprint(r.data),
        base.fingerprint,
        stage_done(run_dir, "distill") if r.distill else None,  # relabelled rows: train again
        stage_done(run_dir, "synthesize") if r.synthesize else None,  # rewritten rows: train again
        # how validation passes generate and score: they choose the adapter
        [r.evaluate.metrics[0], r.evaluate.max_new_tokens, r.evaluate.batch_size, r.evaluate.ignore_case],
    )


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    train = loaded.recipe.train
    main_process = is_main_process()
    layout = RunLayout(run_dir)
    stage_dir = layout.stage(STAGE)
    if main_process:  # the launching process, or rank 0 after it: no other rank writes
        start_stage(stage_dir)
    if train.processes > 1 and not in_launched_process():
        return _launch(loaded, run_dir)
    stage_fp = fingerprint(loaded, run_dir)
    if main_process:
        _discard_stale_checkpoints(stage_dir, stage_fp)

    rows = _training_rows(loaded, run_dir)
    # a refit killed part-way continues after its first pass, which it does not train again
    result = _validated(layout, stage_fp) if train.refit else None
    if result is None:
        result = _train_and_choose(loaded, run_dir, rows, stage_fp)
    if train.refit:
        # every rank refits to the step rank 0's validation chose (a resumed refit: each read it from validated.json)
        if train.processes > 1 and torch.distributed.is_initialized():
            result = _from_rank_0(result)
        result["refit"] = _refit(loaded, run_dir, rows, result)
    if not main_process:  # rank 0 writes the adapter and the results; the others only trained
        return {"steps": result["steps"]}
    write_json_atomic(layout.train_result, result_types.check(result_types.TrainResult, result))
    (stage_dir / "checkpoints.owner").unlink(missing_ok=True)
    mark_done(stage_dir, stage_fp)
    last = result["refit"] if result.get("refit", {}).get("refitted") else result
    final = "—" if last["final_loss"] is None else f"{last['final_loss']:.4f}"  # none logged in very short runs
    log(STAGE, f"done: {last['steps']} steps, final loss {final}, {last['train_seconds']:.1f}s")
    return result


def _from_rank_0(value):
    """Rank 0's value on every rank (the launched ranks share a process group)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train_and_choose(loaded: LoadedRecipe, run_dir: Path, rows: TrainingRows, stage_fp: str) -> dict:
    """Train on the training rows, validating as it goes; keep the adapter validation chose (train/adapter, or
    train/validated-adapter where a refit follows). Rank 0 returns the result; the other ranks its steps."""
    recipe, train = loaded.recipe, loaded.recipe.train
    main_process = is_main_process()
    layout = RunLayout(run_dir)
    stage_dir = layout.stage(STAGE)
    model, dtype, chosen = _adapter_model(recipe, rows.source)
    effective_batch = train.batch_size * train.processes * train.grad_accum
    if main_process:
        log(
            STAGE,
            f"effective batch {effective_batch} = {train.batch_size} per process x {train.processes} "
            f"process{'es' if train.processes > 1 else ''} x {train.grad_accum} accumulated",
        )
    args = _training_arguments(train, layout.checkpoints, dtype, main_process)
    if main_process and train.report_to:
        tracking.start(loaded, run_dir)
    validating = _validation_callback(
        loaded, rows.splits, rows.tokenizer, rows.chat, len(rows.sequences), stage_dir, main_process
    )
    callbacks = [LossLog(layout.train_metrics), *([validating] if validating else [])]
    trainer = _trainer(model, args, rows, callbacks, train.processes)
    if validating:
        validating.trainer = trainer
    if main_process and train.processes > 1:
        kind = trainer.accelerator.distributed_type.value
        log(STAGE, f"distributed: {kind} over {trainer.args.world_size} processes")
    last = _last_checkpoint(layout.checkpoints)
    output, seconds = _train(trainer, last, train.report_to, layout.checkpoints)
    if not main_process:
        log(STAGE, f"rank {args.process_index}/{train.processes}: {trainer.state.global_step} steps")
        return {"steps": trainer.state.global_step}
    if train.processes > 1:
        log(STAGE, f"rank 0/{train.processes}: {trainer.state.global_step} steps")

    summary = validating.summary() if validating else None
    choice = train_validation.choose(summary, train.select, trainer.state.global_step)
    kept = layout.validated_adapter if train.refit else layout.adapter
    _save_adapter(model, rows.tokenizer, stage_dir, kept, choice, trainer.state.global_step)
    log(STAGE, f"adapter: step {choice['chosen_step']}, {choice['why']}")
    trainable, total = model.get_nb_trainable_parameters()
    result = {
        **rows.facts(),
        "steps": trainer.state.global_step,
        "schedule_steps": trainer.state.max_steps,
        "processes": train.processes,
        "effective_batch_size": effective_batch,
        "train_loss": output.training_loss,
        "final_loss": _last_loss(layout.train_metrics),
        "trainable_parameters": trainable,
        "frozen_dtype": chosen["dtype"],
        "precision": chosen,  # how frozen_dtype was chosen, with the probe's figures where it measured
        "total_parameters": total,
        "train_seconds": round(seconds, 3),
        "resumed_from": last,
        "validation": {"source": rows.splits.validation_source, **(summary or {"rows": 0}), **choice},
    }
    if train.refit:  # the first pass is final: a refit killed after this point starts from here
        write_json_atomic(layout.validated_result, {"fingerprint": stage_fp, "result": result})
    # The adapter is final; checkpoints only served resuming.
    shutil.rmtree(layout.checkpoints, ignore_errors=True)
    return result


def _validated(layout: RunLayout, stage_fp: str) -> dict | None:
    """The first pass of a refit that was killed after it, where it trained this recipe on these rows."""
    if not layout.validated_result.is_file() or not layout.validated_adapter.is_dir():
        return None
    kept = json.loads(layout.validated_result.read_text())
    if kept.get("fingerprint") != stage_fp:
        return None
    log(STAGE, f"the first pass is trained already ({layout.validated_adapter}); refitting")
    return kept["result"]


def _refit(loaded: LoadedRecipe, run_dir: Path, rows: TrainingRows, first: dict) -> dict:
    """train.refit: train again from the start on the training and validation rows, with the recipe's settings,
    and stop at the point of the schedule validation chose; its adapter becomes train/adapter."""
    recipe, train = loaded.recipe, loaded.recipe.train
    layout = RunLayout(run_dir)
    main_process = is_main_process()
    validation = rows.splits.validation
    if not validation:
        # nothing was held out (too few rows for the default share): the first pass trained on every row already
        why = "no validation rows were held out, so the first pass already trained on every row"
        log(STAGE, f"refit: {why}")
        if main_process:  # the first pass's adapter is the run's: no before-refit candidate, it would be the same
            replace_dir(layout.validated_adapter, layout.adapter)
        return {"refitted": False, "why": why}
    added = data.training_examples(rows.tokenizer, validation, rows.chat, recipe.data)
    examples = rows.tokenized.examples + added.examples
    sequences = data.pack(examples, recipe.data.max_seq_len) if recipe.data.packing else examples
    # the same settings over more rows (epochs as they are; max_steps stretched by the rows added), stopped at the
    # point of the schedule validation chose, so the learning rate has decayed as far as it had there
    chosen, planned = first["validation"]["chosen_step"], first["schedule_steps"]
    max_steps = round(train.max_steps * len(sequences) / len(rows.sequences)) if train.max_steps else None
    log(
        STAGE,
        f"refit: validation chose step {chosen} of {planned}; training again from the start on {len(sequences)} "
        f"sequences (the validation rows added) to the same point of the schedule",
    )
    model, dtype, _ = _adapter_model(recipe, rows.source)
    refit_train = train.model_copy(update={"max_steps": max_steps, "report_to": []})
    args = _training_arguments(refit_train, layout.refit_checkpoints, dtype, main_process)
    refit_rows = dataclasses.replace(rows, sequences=sequences)
    stop = StopAt(chosen / planned)
    trainer = _trainer(model, args, refit_rows, [LossLog(layout.refit_metrics), stop], train.processes)
    last = _last_checkpoint(layout.refit_checkpoints)
    output, seconds = _train(trainer, last, [], layout.refit_checkpoints)
    if main_process:
        _save_adapter(model, rows.tokenizer, layout.stage(STAGE), layout.adapter, None, trainer.state.global_step)
        shutil.rmtree(layout.refit_checkpoints, ignore_errors=True)
    schedule = trainer.state.max_steps
    why = (
        f"validation chose step {chosen} of {planned} on {len(rows.sequences)} training sequences; the refit trained "
        f"{len(sequences)} (the validation rows added) and stopped at step {trainer.state.global_step} of {schedule}"
    )
    log(STAGE, f"refit: {why}")
    return {
        "refitted": True,
        "why": why,
        "rows": len(examples),
        "validation_rows_added": len(added.examples),
        "sequences": len(sequences),
        "schedule_steps": schedule,
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "final_loss": _last_loss(layout.refit_metrics),
        "train_seconds": round(seconds, 3),
        "resumed_from": last,
    }


def _trainer(model, args, rows: TrainingRows, callbacks: list, processes: int) -> AnswerLossTrainer:
    return AnswerLossTrainer(
        split_by_length=processes == 1,  # DDP expects one forward per step
        model=model,
        args=args,
        train_dataset=rows.sequences,
        # padding first: every answer ends at the last column, so AnswerLossTrainer computes few logits
        data_collator=lambda batch: data.pad_batch(batch, rows.tokenizer.pad_token_id, left=True),
        callbacks=[*callbacks, CheckpointOnSignal()],
    )


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _train(trainer, last: str | None, report_to: list[str], checkpoints_dir: Path):
    """trainer.train, resumed from the last checkpoint; a stop signal ends it at a step boundary, saved."""
    if last:
        log(STAGE, f"resuming from {last}")
    started = time.perf_counter()
    StopSignal.training = True
    try:
        output = trainer.train(resume_from_checkpoint=last)
    finally:
        StopSignal.training = False
        if report_to:
            tracking.finish_training()
    if StopSignal.requested:
        raise Interrupted(
            f"train: stopped by a signal at step {trainer.state.global_step} after saving a checkpoint in "
            f"{checkpoints_dir}; rerun (or let the scheduler requeue) to resume from it"
        )
    return output, time.perf_counter() - started


@dataclasses.dataclass
class TrainingRows:
    """What the model trains on: the tokenized rows (packed where the recipe says) and where they came from."""

    source: models.ModelSource
    tokenizer: Any
    chat: bool
    splits: data.Splits
    tokenized: data.Tokenized
    sequences: list

    def facts(self) -> dict:
        examples = self.tokenized.examples
        return {
            "rows": len(examples),
            "rows_teacher_labelled": self.splits.distilled_rows,  # of the rows before tokenizing; the rest: gold
            "rows_synthesized": self.splits.synthesized_rows,  # ... and those written by a teacher
            "rows_before_tokenizing": len(self.splits.train),
            "rows_dropped_too_long": self.tokenized.dropped,
            "rows_truncated": self.tokenized.truncated,
            "rows_dropped_empty": len(self.splits.dropped_empty.get("train", [])),
            "duplicates_in_train": self.splits.duplicates_in_train,
            "eval_overlap_exact": self.splits.overlap_exact,
            "eval_overlap_normalized": self.splits.overlap_normalized,
            "sequences": len(self.sequences),
            "tokens_per_epoch": sum(len(ex["input_ids"]) for ex in examples),
            "target_tokens_per_epoch": sum(
                sum(1 for label in ex["labels"] if label != data.IGNORE_INDEX) for ex in examples
            ),
        }


def _training_rows(loaded: LoadedRecipe, run_dir: Path) -> TrainingRows:
    recipe = loaded.recipe
    source = models.resolve_model(recipe.model.base)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    data.apply_chat_template_file(tokenizer, recipe.data)
    chat = data.uses_chat_template(tokenizer, recipe.data.chat_template)
    splits = data.load_splits(
        recipe.data, distilled=_distilled_rows(loaded, run_dir), synthesized=_synthesized_rows(loaded, run_dir)
    )
    tokenized = _tokenized(run_dir, tokenizer, splits, chat, recipe, source)
    examples = tokenized.examples
    if not examples:
        raise PipelineError(
            f"data.max_seq_len: all {len(splits.train)} training rows are longer than {recipe.data.max_seq_len} tokens"
        )
    log(
        STAGE,
        f"{len(examples)} training rows ({tokenized.dropped} dropped, {tokenized.truncated} truncated at "
        f"{recipe.data.max_seq_len} tokens; {splits.duplicates_in_train} duplicates in train; "
        f"{splits.overlap_normalized} eval prompts also in train)",
    )
    sequences = data.pack(examples, recipe.data.max_seq_len) if recipe.data.packing else examples
    if recipe.data.packing:
        log(STAGE, f"packed {len(examples)} rows into {len(sequences)} sequences of up to {recipe.data.max_seq_len}")
    return TrainingRows(source, tokenizer, chat, splits, tokenized, sequences)


def _adapter_model(recipe, source: models.ModelSource):
    """The base with a fresh LoRA adapter, its frozen weights in the precision chosen for this machine:
    (model, compute dtype, how that precision was chosen)."""
    from peft import get_peft_model

    dtype = models.compute_dtype(recipe.model.dtype)
    if models.device().type == "cpu" and allocator.keep_freed_memory():
        log(STAGE, "freed memory kept for the next step (pipeline/allocator.py)")
    # Seed before the adapter exists: its initial weights are drawn in get_peft_model, before the
    # Trainer would seed anything.
    set_seed(recipe.train.seed)
    if recipe.train.qlora:
        from peft import prepare_model_for_kbit_training

        # QLoRA: the frozen base in 4-bit nf4, the adapter in full precision on top of it.
        model = models.load_model(source, dtype, "bnb-nf4", recipe.model.trust_remote_code)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = models.load_model(source, dtype, trust_remote_code=recipe.model.trust_remote_code)
    # No KV cache in training; without one, packed rows (position_ids restarting at 0) attend only within themselves.
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(recipe.lora))
    trainable, total = model.get_nb_trainable_parameters()
    method = "QLoRA (nf4 base)" if recipe.train.qlora else "LoRA"
    log(STAGE, f"{method}: {trainable:,} trainable of {total:,} parameters ({dtype}, {models.device()})")
    chosen = precision.frozen_precision(recipe, dtype, model.get_base_model().config)
    frozen = getattr(torch, chosen["dtype"])
    if frozen != dtype:
        held = hold_frozen_base(model, frozen, dtype)
        log(STAGE, f"the frozen weights of {held} LoRA-wrapped layers held in {frozen} ({chosen['why']})")
    elif chosen["probe"]:
        log(STAGE, f"the frozen weights stay {chosen['dtype']} ({chosen['why']})")
    fused = fuse_lora_layers(model)
    if fused:
        log(STAGE, f"{fused} LoRA layers add the adapter's product inside the base product (pipeline/fused_lora.py)")
    return model, dtype, chosen


def _training_arguments(train, checkpoints_dir: Path, dtype, main_process: bool):
    """transformers' TrainingArguments from the recipe's train section."""
    from transformers import TrainingArguments

    on_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        warmup_steps=train.warmup_ratio,  # a value below 1 is a ratio of all steps
        weight_decay=train.weight_decay,
        lr_scheduler_type="linear",
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        report_to=train.report_to or "none",
        use_cpu=not on_cuda,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        optim="adamw_torch_fused",  # one kernel over every adapter tensor, on CPU too (torch >= 2.4)
        remove_unused_columns=False,
        # rows of like length batched together: little padding to compute (opt-in; see README)
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        disable_tqdm=not main_process,
        # LoRA leaves the frozen base without gradients by design; DDP need not search for unused ones.
        ddp_find_unused_parameters=False if train.processes > 1 else None,
    )


def _validation_callback(loaded, splits, tokenizer, chat, sequences, stage_dir, main_process):
    """The validation passes of this run, or None without validation rows."""
    recipe = loaded.recipe
    if not splits.validation:
        return None
    train, settings = recipe.train, recipe.evaluate
    prompts = runtimes.prompts_for(tokenizer, splits.validation, chat)
    every = train.eval_every or train_validation.default_every(
        sequences, train.batch_size * train.processes * train.grad_accum, train.max_steps
    )
    if main_process:
        log(STAGE, f"validation: {splits.validation_source}; {settings.metrics[0]} every {every} steps")
    return train_validation.ValidationCallback(
        tokenizer=tokenizer,
        prompts=[p.ids for p in prompts],
        targets=[row.target for row in splits.validation],
        examples=[data.training_example(tokenizer, row, chat) for row in splits.validation],
        metric=settings.metrics[0],
        score=scorer(settings.metrics[0]),
        every=every,
        patience=train.patience,
        keep_best=train.select == "best",
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        ignore_case=settings.ignore_case,
        stage_dir=stage_dir,
        main_process=main_process,
    )


def _save_adapter(model, tokenizer, stage_dir: Path, into: Path, choice: dict | None, last_step: int) -> None:
    """`into`: the best validation pass's adapter where that is the choice, else the model as trained."""
    best_dir = stage_dir / train_validation.BEST_ADAPTER
    tmp = temp_dir_for(into)
    if choice is not None and choice["chosen_step"] != last_step:
        shutil.copytree(best_dir, tmp, ignore=shutil.ignore_patterns(train_validation.STATE_FILE))
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, into)
    shutil.rmtree(best_dir, ignore_errors=True)  # chosen: `into` is the run's adapter now


def lora_config(lora):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.dora,
        use_rslora=lora.rslora,
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def hold_frozen_base(model, frozen: torch.dtype, compute: torch.dtype) -> int:
    """Store the frozen base weight of every LoRA layer in `frozen`; everything else computes in `compute`.

    The base matmul takes its input cast to `frozen` and returns its output cast back, so the adapter,
    norms, attention, residual stream and loss keep full precision; only the frozen product is rounded,
    as in bf16 training on a GPU. The adapter file does not depend on it (it holds LoRA weights only).
    """
    from peft.tuners.lora import Linear as LoraLinear

    def cast_input(layer, args):
        return (args[0].to(frozen), *args[1:])

    def cast_output(layer, args, output):
        return output.to(compute)

    held = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and type(module.base_layer) is torch.nn.Linear:
            module.base_layer.to(frozen)
            module.base_layer.register_forward_pre_hook(cast_input)
            module.base_layer.register_forward_hook(cast_output)
            held += 1
    return held


def _launch(loaded: LoadedRecipe, run_dir: Path) -> dict:
    """Train with `processes` ranks under accelerate launch (DDP), then read what rank 0 wrote.

    The ranks load the run's resolved recipe, so they train exactly this run. On CPU the ranks share
    the cores (OMP threads split between them) and talk over gloo; on CUDA each rank gets a GPU.
    """
    import socket

    processes = loaded.recipe.train.processes
    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise PipelineError(
            f"train.processes: {processes} processes need {processes} GPUs; this machine has "
            f"{torch.cuda.device_count()}"
        )
    with socket.socket() as s:  # a free port per launch: two jobs on one machine must not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no",  # the Trainer's bf16/fp16 arguments decide precision
        "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "pipeline", "train", str(RunLayout(run_dir).resolved_recipe),
        "--runs-dir", str(run_dir.parent.parent),
    ]  # fmt: skip
    log(STAGE, f"launching {processes} training processes with accelerate (port {port})")
    child = subprocess.Popen(command, env=env, start_new_session=True)
    StopSignal.training = True  # a stop signal ends the ranks together; they resume from their last checkpoint
    try:
        while child.poll() is None:
            if StopSignal.requested:
                os.killpg(child.pid, signal.SIGTERM)
                child.wait()
                raise Interrupted(
                    f"train: stopped by a signal; rerun (or let the scheduler requeue) to resume from the last "
                    f"checkpoint in {RunLayout(run_dir).checkpoints} (every train.save_steps steps)"
                )
            time.sleep(0.2)
    finally:
        StopSignal.training = False
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    if child.returncode != 0:
        raise RuntimeFailure(
            f"train: the {processes} training processes failed (exit {child.returncode}); their output is above "
            f"(a rank that crashed wrote its traceback to {RunLayout(run_dir).logs}). Rerun to resume from the last "
            f"checkpoint in {RunLayout(run_dir).checkpoints}"
        )
    return result_types.read_train_result(run_dir)


def _distilled_rows(loaded: LoadedRecipe, run_dir: Path) -> Path | None:
    if loaded.recipe.distill is None:
        return None
    if stage_done(run_dir, "distill") is None:
        raise PipelineError(f"{run_dir}: no finished distill stage; run `make train RECIPE={loaded.path}`")
    return distill_stage.labelled_file(run_dir)


def _synthesized_rows(loaded: LoadedRecipe, run_dir: Path) -> Path | None:
    if loaded.recipe.synthesize is None:
        return None
    if stage_done(run_dir, "synthesize") is None:
        raise PipelineError(f"{run_dir}: no finished synthesize stage; run `make train RECIPE={loaded.path}`")
    return RunLayout(run_dir).synthesized_rows


def _tokenized(run_dir: Path, tokenizer, splits, chat: bool, recipe, source) -> data.Tokenized:
    """Tokenized training rows, cached in the run folder under the data fingerprint and the tokenizer."""
    distilled = stage_done(run_dir, "distill") if recipe.distill else None
    written = stage_done(run_dir, "synthesize") if recipe.synthesize else None
    key = stage_fingerprint(data_fingerprint(recipe.data), source.fingerprint, chat, distilled, written)
    cache = RunLayout(run_dir).data_cache / f"train-tokenized-{key[:16]}.json"
    if cache.is_file():
        return data.Tokenized(**json.loads(cache.read_text()))
    tokenized = data.training_examples(tokenizer, splits.train, chat, recipe.data)
    if is_main_process():
        write_json_atomic(cache, dataclasses.asdict(tokenized))
    return tokenized


def _discard_stale_checkpoints(stage_dir: Path, stage_fp: str) -> None:
    """Checkpoints from another recipe or other data must not be resumed."""
    owner = stage_dir / "checkpoints.owner"
    if owner.is_file() and owner.read_text() != stage_fp:
        layout = RunLayout(stage_dir.parent)
        for folder in (layout.checkpoints, layout.refit_checkpoints, stage_dir / train_validation.BEST_ADAPTER):
            shutil.rmtree(folder, ignore_errors=True)
        for file in (layout.train_metrics, layout.refit_metrics, layout.validated_result):
            file.unlink(missing_ok=True)
        (stage_dir / train_validation.STATE_FILE).unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    owner.write_text(stage_fp)


def _last_loss(metrics_path: Path) -> float | None:
    losses = [row["loss"] for row in read_jsonl_records(metrics_path) if "loss" in row]
    return losses[-1] if losses else None


class AnswerLossTrainer(Trainer):
    """transformers' Trainer, with the vocabulary projection computed only where the loss needs it
    (pipeline/answer_loss.py; through the model's own forward, so DDP sees the call), a batch's rows computed
    in groups of like length where that saves padding (split_by_length; one process), and the loss normalized
    as the Trainer normalizes it."""

    def __init__(self, *args, split_by_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keeps_logits = accepts_logits_to_keep(self.model)
        self.split_by_length = split_by_length

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        if self.split_by_length and not return_outputs and "attention_mask" in features:  # packed rows have none
            loss, outputs = grouped_answer_loss_sum(model, features, labels, self.keeps_logits), None
        else:
            loss, outputs = answer_loss_sum(model, features, labels, self.keeps_logits)
        if num_items_in_batch is not None:  # the Trainer's normalization over accumulated (and gathered) batches
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / (labels[:, 1:] != data.IGNORE_INDEX).sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss


class CheckpointOnSignal(TrainerCallback):
    """On a scheduler's stop signal: save a checkpoint at the end of this step and stop training."""

    def on_step_end(self, args, state, control, **kwargs):
        if StopSignal.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class StopAt(TrainerCallback):
    """End training at a share of its schedule, the schedule (learning rate decay) unchanged."""

    def __init__(self, share: float):
        self.share = share

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= max(1, round(self.share * state.max_steps)):
            control.should_training_stop = True


class LossLog(TrainerCallback):
    """Append {"step", "loss", "lr", ...} per logged step to metrics.jsonl; on resume, drop later rows."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.is_file():
            rows = read_jsonl_records(self.path)
            write_jsonl_atomic(self.path, [row for row in rows if row.get("step", 0) <= state.global_step])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            row = {
                "step": state.global_step,
                "epoch": logs.get("epoch"),
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
            }
            append_jsonl(self.path, [row])
