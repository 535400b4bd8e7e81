"""Training-time validation: the task metric on the validation rows while training, and the adapter it chooses.

Every `train.eval_every` optimizer steps (twice per epoch by default) and at the last step, the model being
trained answers the validation rows the way the evaluate stage asks every candidate: the same prompts,
greedy decoding, end tokens and left-padded batches (runtimes.transformers.generate_batches, one code
path), scored with the gating metric (the first of evaluate.metrics); a row whose expected answer the model
already gives token by token in the teacher-forced pass that measures the validation loss is not generated
again (greedy decoding would give exactly that answer). Each score goes to metrics.jsonl,
the trackers and the terminal, with the validation loss (teacher-forced answer tokens), which breaks ties
of the score. With `train.select: best` the best adapter so far is kept in train/best-adapter/, and
`train.patience` stops training after that many passes in a row without a better one. Each pass also
saves a checkpoint, and train/validation.json is rewritten after it, so a killed run resumes with its
curve and its best so far. Only validation rows are read here: the eval rows the report is judged by
never choose anything.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline.answer_loss import accepts_logits_to_keep, answer_loss_and_matches
from pipeline.data import IGNORE_INDEX, pad_batch
from pipeline.files import append_jsonl, replace_dir, temp_dir_for, write_json_atomic
from pipeline.logs import log
from pipeline.run_layout import RunLayout
from pipeline.runtimes.transformers import eos_token_ids, generate_batches

STATE_FILE = "validation.json"
BEST_ADAPTER = "best-adapter"


def default_every(sequences: int, batch_per_step: int, max_steps: int | None) -> int:
    """Twice per epoch (or twice over max_steps when that is shorter), at least every step."""
    steps_per_epoch = max(1, math.ceil(sequences / batch_per_step))
    return max(1, math.ceil(min(steps_per_epoch, max_steps or steps_per_epoch) / 2))


def better(entry: dict, best: dict) -> bool:
    if entry["value"] != best["value"]:
        return entry["value"] > best["value"]
    return entry.get("loss") is not None and best.get("loss") is not None and entry["loss"] < best["loss"]


@dataclass
class ValidationState:
    """What the passes found so far: the curve, the best pass, and how many passes since it."""

    metric: str
    rows: int
    curve: list[dict] = field(default_factory=list)  # {"step", "epoch", "value", "seconds"} per pass
    best: dict | None = None
    passes_since_best: int = 0
    stopped_early: bool = False

    def add(self, entry: dict) -> bool:
        """Record a pass; True when it is the best so far: a higher score, or the same score at a lower
        validation loss (a task metric saturates on easy rows while the answers still get surer)."""
        self.curve.append(entry)
        if self.best is None or better(entry, self.best):
            self.best, self.passes_since_best = entry, 0
            return True
        self.passes_since_best += 1
        return False

    def until(self, step: int) -> ValidationState:
        """The state as it was at `step` (a resumed run continues from there)."""
        state = ValidationState(self.metric, self.rows)
        for entry in self.curve:
            if entry["step"] <= step:
                state.add(entry)
        return state


class ValidationCallback(TrainerCallback):
    """Scores the validation rows during training, keeps the best adapter, stops early."""

    def __init__(
        self,
        *,
        tokenizer,
        prompts: list[list[int]],
        targets: list[str],
        examples: list[dict],
        metric: str,
        score,
        every: int,
        patience: int | None,
        keep_best: bool,
        batch_size: int,
        max_new_tokens: int,
        ignore_case: bool,
        stage_dir: Path,
        main_process: bool,
    ):
        self.tokenizer, self.prompts, self.targets, self.examples = tokenizer, prompts, targets, examples
        self.metric, self.score = metric, score
        self.every, self.patience, self.keep_best = every, patience, keep_best
        self.batch_size, self.max_new_tokens, self.ignore_case = batch_size, max_new_tokens, ignore_case
        self.stage_dir, self.main_process = stage_dir, main_process
        self.state = ValidationState(metric, len(prompts))
        self.trainer = None  # set after the Trainer exists: scores go to the trackers through trainer.log

    def on_train_begin(self, args, state, control, **kwargs):
        saved = self.stage_dir / STATE_FILE
        if not saved.is_file():
            return
        before = json.loads(saved.read_text())
        restored = ValidationState(self.metric, len(self.prompts), curve=before.get("curve", []))
        self.state = restored.until(state.global_step)
        best_dir = self.stage_dir / BEST_ADAPTER
        kept = json.loads((best_dir / STATE_FILE).read_text())["step"] if (best_dir / STATE_FILE).is_file() else None
        if self.state.best is not None and kept != self.state.best["step"]:
            # killed between saving a best adapter and the checkpoint of its step: that adapter is from a step
            # this run has not reached again; start the best over from here rather than keep a wrong one
            log("train", f"validation: the kept best adapter (step {kept}) is not from this run's curve; reset")
            self.state.best = None
        if self.state.curve:
            log("train", f"validation: {len(self.state.curve)} passes kept from before the resume")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every and step < state.max_steps:
            return control
        self._validate(model, state)
        control.should_save = True  # resuming after a kill starts right after this pass: its curve and best kept
        if self.patience and self.state.passes_since_best >= self.patience:
            self.state.stopped_early = True
            control.should_training_stop = True
            log("train", f"validation: no better {self.metric} in {self.patience} passes; stopping at step {step}")
        self._write()
        return control

    def _validate(self, model, state) -> None:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        self.eos_ids = eos_token_ids(model, self.tokenizer)
        with torch.inference_mode():
            loss, answers = self._teacher_forced(model)
            todo = [i for i in range(len(self.prompts)) if i not in answers]
            for batch in generate_batches(
                model, self.tokenizer, self.prompts, todo, self.max_new_tokens, self.batch_size, desc="validation"
            ):
                answers.update((entry["row"], entry["prediction"]) for entry in batch)
        if was_training:
            model.train()
        predictions = [answers[i] for i in range(len(self.prompts))]
        value = float(self.score(predictions, self.targets, self.ignore_case)["value"])
        entry = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "value": value,
            "loss": round(loss, 6),
            "seconds": round(time.perf_counter() - started, 3),
            "generated_rows": len(todo),
        }
        best = self.state.add(entry)
        if best and self.keep_best and self.main_process:
            self._keep(model, entry)
        if self.main_process:
            row = {"step": entry["step"], "validation": {self.metric: value, "loss": entry["loss"]}}
            append_jsonl(RunLayout(self.stage_dir.parent).train_metrics, [row])
            log(
                "train",
                f"validation {self.metric} {value:.4f} (loss {entry['loss']:.4f}) on {len(self.prompts)} rows at "
                f"step {entry['step']} ({entry['seconds']:.1f}s; {len(self.prompts) - len(todo)} answers read "
                f"from the teacher-forced pass, {len(todo)} generated){'; best so far' if best else ''}",
            )
        if self.trainer is not None:
            self.trainer.log({f"validation/{self.metric}": value, "validation/loss": entry["loss"]})

    def _teacher_forced(self, model) -> tuple[float, dict[int, str]]:
        """Mean cross-entropy of the validation rows' answer tokens (and end token), teacher-forced: how sure
        the model is of the right answers, which breaks ties of the task metric. From the same pass, the rows
        whose greedy answer it already gives: where the most likely token is the expected one at every answer
        position, the end token included, greedy decoding would generate exactly the expected answer, so only
        the other rows need generating (the same answers as generating every row, to float rounding)."""
        device = next(model.parameters()).device
        keeps_logits = accepts_logits_to_keep(model)
        total, count = 0.0, 0
        known: dict[int, str] = {}
        for start in range(0, len(self.examples), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(self.examples)))
            batch = pad_batch([self.examples[i] for i in rows], self.tokenizer.pad_token_id, left=True)
            labels = batch.pop("labels").to(device)
            features = {k: v.to(device) for k, v in batch.items()}
            loss, matches = answer_loss_and_matches(model, features, labels, keeps_logits)
            total += float(loss)
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
            for i, matched in zip(rows, matches.tolist(), strict=True):
                answer = self._greedy_answer(i) if matched else None
                if answer is not None:
                    known[i] = answer
        return total / max(count, 1), known

    def _greedy_answer(self, i: int) -> str | None:
        """Row i's expected answer as greedy decoding would return it, where its example is its prompt followed by
        every trained token, ending at an end token within max_new_tokens; else None (generate it)."""
        example, prompt = self.examples[i], self.prompts[i]
        ids, labels = example["input_ids"], example["labels"]
        answer = ids[len(prompt) :]
        if (
            ids[: len(prompt)] != prompt
            or labels[len(prompt) :] != answer
            or any(label != IGNORE_INDEX for label in labels[: len(prompt)])
            or not answer
            or answer[-1] not in self.eos_ids
            or len(answer) > self.max_new_tokens
            or any(token in self.eos_ids for token in answer[:-1])
        ):
            return None
        return self.tokenizer.decode(answer[:-1], skip_special_tokens=True).strip()

    def _keep(self, model, entry: dict) -> None:
        folder = self.stage_dir / BEST_ADAPTER
        tmp = temp_dir_for(folder)
        model.save_pretrained(tmp)
        write_json_atomic(tmp / STATE_FILE, entry)
        replace_dir(tmp, folder)

    def _write(self) -> None:
        if self.main_process:
            write_json_atomic(self.stage_dir / STATE_FILE, self.summary())

    def summary(self) -> dict:
        s = self.state
        return {
            "metric": s.metric,
            "rows": s.rows,
            "every_steps": self.every,
            "curve": s.curve,
            "best": s.best,
            "passes_since_best": s.passes_since_best,
            "stopped_early": s.stopped_early,
            "seconds": round(sum(entry["seconds"] for entry in s.curve), 3),
        }


def choose(summary: dict | None, select: str, last_step: int) -> dict:
    """Which adapter the run keeps, and why, in words (result.json and the report say it)."""
    if summary is None or not summary["curve"]:
        return {"select": "last", "chosen_step": last_step, "why": "no validation rows: the last adapter"}
    best, metric = summary["best"], summary["metric"]
    last = summary["curve"][-1]
    if select == "last" or best is None:
        why = f"train.select: last (validation {metric} {last['value']:.4f} at step {last['step']})"
        return {"select": "last", "chosen_step": last_step, "chosen_value": last["value"], "why": why}
    tied = [e for e in summary["curve"] if e["value"] == best["value"]]
    tie = (
        f", the lowest validation loss ({best['loss']:.4f}) of {len(tied)} passes at that score"
        if len(tied) > 1
        else ""
    )
    why = (
        f"the best validation {metric}, {best['value']:.4f} at step {best['step']} of {last_step}{tie} "
        f"(the last pass: {last['value']:.4f})"
    )
    if summary["stopped_early"]:
        why += f"; stopped early after {summary['passes_since_best']} passes without a better score"
    return {"select": "best", "chosen_step": best["step"], "chosen_value": best["value"], "why": why}
