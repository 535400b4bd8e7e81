"""What the train and evaluate stages hand on, as data: train/result.json and evaluate/results.json, typed like
report.json (report_types.py). Each stage checks what it writes against its model; the stages and tools that read
them (cascade, report, sweep, compare, publish) read through `read_train_result` / `read_eval_results`, which
name the file and the fix where one is cut short or from another version; recipes/train-result.schema.json and
recipes/eval-results.schema.json are generated from these models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import PipelineError
from pipeline.report_types import Open
from pipeline.run_layout import RunLayout


class Precision(Open):
    """How the frozen base's precision was chosen."""

    dtype: str = Field(description="the frozen product's dtype: float32, bfloat16, float16")
    why: str = Field(description="in words: the recipe's setting, or what the probe measured")
    probe: dict[str, Any] | None = Field(
        None, description="the probe's figures where it measured: `gflops` per dtype, `chosen`, `why`, `cpu`, `torch`"
    )


class TrainValidation(Open):
    """Which adapter training kept, chosen on the validation rows (never the eval rows)."""

    source: str | None = Field(None, description="how the validation rows were chosen")
    rows: int = Field(description="validation rows (0: none, the last adapter is kept)")
    select: Literal["best", "last"]
    chosen_step: int
    chosen_value: float | None = None
    why: str = Field(description="the choice in words")
    metric: str | None = None
    curve: list[dict[str, Any]] | None = Field(
        None, description="per pass: `step`, `epoch`, `value`, `loss`, `seconds`, `generated_rows`"
    )


class TrainRefit(Open):
    """train.refit: the second training, on the training and validation rows, whose adapter the run ships."""

    refitted: bool = Field(description="false where no validation rows were held out (nothing to add)")
    why: str = Field(description="the chosen step, and where the refit stopped, in words")
    rows: int | None = Field(None, description="rows the refit trained on: the training rows and the validation rows")
    validation_rows_added: int | None = None
    sequences: int | None = None
    schedule_steps: int | None = Field(None, description="the first pass's schedule stretched over the added rows")
    steps: int | None = Field(None, description="where the refit stopped: the chosen step, scaled the same way")
    train_loss: float | None = None
    final_loss: float | None = None
    train_seconds: float | None = None
    resumed_from: str | None = None


class TrainResult(BaseModel):
    """train/result.json: what the train stage trained, on which rows, how, and which adapter it kept."""

    # Fields later versions added are optional, so a run trained by an earlier version is still read; a key this
    # version does not know is kept as it is.
    model_config = ConfigDict(extra="allow")

    rows: int = Field(description="training rows after tokenizing")
    rows_teacher_labelled: int | None = Field(None, description="of the rows before tokenizing, labelled by a teacher")
    rows_synthesized: int | None = Field(None, description="of the rows before tokenizing, written by a teacher")
    rows_before_tokenizing: int | None = None
    rows_dropped_too_long: int | None = None
    rows_truncated: int | None = None
    rows_dropped_empty: int | None = None
    duplicates_in_train: int | None = None
    eval_overlap_exact: int | None = Field(None, description="training rows whose input is an eval row's")
    eval_overlap_normalized: int | None = Field(None, description="... after lowercasing and collapsing whitespace")
    sequences: int | None = Field(None, description="sequences trained per epoch (rows, or packed sequences)")
    tokens_per_epoch: int | None = None
    target_tokens_per_epoch: int | None = Field(None, description="tokens that carry a label (answers, end tokens)")
    steps: int
    schedule_steps: int | None = Field(None, description="the steps the schedule planned (patience may stop sooner)")
    processes: int | None = None
    effective_batch_size: int | None = None
    train_loss: float | None = Field(None, description="the Trainer's mean training loss")
    final_loss: float | None = Field(None, description="the mean of the last logged losses")
    trainable_parameters: int
    total_parameters: int | None = None
    frozen_dtype: str | None = None
    precision: Precision | None = None
    train_seconds: float = Field(description="wall time of training, validation passes included")
    resumed_from: str | None = Field(None, description="the checkpoint a resumed run continued from")
    validation: TrainValidation
    refit: TrainRefit | None = Field(
        None, description="train.refit: the shipped adapter's training; the fields above describe the first pass"
    )


class Score(Open):
    """A metric on the eval rows, row by row (json_match adds its object rates and `per_field`)."""

    value: float | None
    per_row: list[float | None] = Field(description="each eval row's score, in the order of evaluate/eval_rows.jsonl")
    mean_of_rows: bool | None = Field(None, description="whether `value` is the mean of `per_row` (corpus metrics: no)")


class Answered(Open):
    """One candidate's answers to the eval rows: its scores and what answering cost (report.json's candidate
    fields, before intervals)."""

    role: Literal["base", "specialized", "quantized", "reference", "seed_only", "before_refit"]
    metrics: dict[str, Score]
    runtime: str | None = None
    device: str | None = None


class EvalResults(BaseModel):
    """evaluate/results.json: every candidate's per-row scores and costs on the eval rows."""

    model_config = ConfigDict(extra="allow")

    eval_rows: int
    candidates: dict[str, Answered]


def check(model: type[BaseModel], found: dict) -> dict:
    """What a stage is about to write, checked against its contract (a bug if not)."""
    model.model_validate(found)
    return found


def read_train_result(run_dir: Path) -> dict:
    return _read(RunLayout(run_dir).train_result, TrainResult, "make train")


def read_eval_results(run_dir: Path) -> dict:
    return _read(RunLayout(run_dir).eval_results, EvalResults, "make eval")


def _read(path: Path, model: type[BaseModel], fix: str) -> dict:
    try:
        found = json.loads(path.read_text())
    except OSError as e:
        raise PipelineError(f"{path}: cannot read it ({e.strerror}); run the stage (`{fix} RECIPE=...`)") from None
    except ValueError:
        raise PipelineError(f"{path} is not JSON (cut short?); `{fix} RECIPE=...` writes it again") from None
    try:
        model.model_validate(found)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PipelineError(
            f"{path}: {where}: {first['msg']} (written by another version?); `{fix} RECIPE=...` in a new run folder, "
            "or this version's, writes it again"
        ) from None
    return found


def json_schemas() -> dict[str, str]:
    """The generated schemas, by file name under recipes/."""
    return {
        "train-result.schema.json": json.dumps(TrainResult.model_json_schema(), indent=2) + "\n",
        "eval-results.schema.json": json.dumps(EvalResults.model_json_schema(), indent=2) + "\n",
    }
