"""The report as data (report.json): typed, so its contract lives in code. The report stage checks what it writes
against these models, readers (compare, publish, results, the run list) read through `read_report`, and the
manual's report.json page and recipes/report.schema.json are generated from them.

Sections hold the nested facts their stage produced; a model names each section and what it holds, and lets
the section's own keys through (`extra="allow"`) where they are listed in its description rather than typed
one by one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import PipelineError
from pipeline.run_layout import RunLayout

REPORT_SCHEMA_VERSION = 6
# 2: `validation`, the adapter training kept and the curve that chose it; 3: `sweep`, `learning_curve`, `confidence`;
# 4: `labels`, json_match inside the object; 5: `answers` (lengths, cut off at max_new_tokens, not JSON); 6: the
# report and its plots live in the report stage's own folder (report/, was evaluate/): an older run rebuilds it there


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class MetricValue(Open):
    """A metric on the eval rows: its value and a 95% bootstrap interval (json_match adds `json_valid`,
    `exact_object`, `field_precision` / `_recall` / `_f1`, `per_field`)."""

    value: float | None
    ci95: list[float | None] = Field(min_length=2, max_length=2)


class Candidate(Open):
    """One model that answered the eval rows, with what it cost. Besides the typed keys: `dtype`, `threads` (as
    used; an API: requests in flight), `device`, `model`, `adapter_size_bytes`, `weights_memory_bytes`,
    `load_seconds`, `seconds_per_example_p95`, `single_request_seconds_p95`, `single_request_rows`,
    `generation_seconds`, `generated_tokens`, `generated_tokens_per_second`, `stopped_at_end_token` (share of answers
    that ended at the end token, not at `max_new_tokens`), `prompt_tokens_per_example` (as that runtime tokenized
    them; an API: its server's count), `generated_tokens_per_example`, `price`, `cpu_seconds_per_1000_answers`,
    `joules_per_1000_answers` and `energy_counter` (rapl / nvml / null: over the single requests)."""

    role: Literal["base", "specialized", "quantized", "reference", "seed_only", "before_refit"]
    metrics: dict[str, MetricValue] = Field(description="per metric of the recipe: value and interval")
    runtime: str | None = Field(None, description="transformers / llama.cpp / endpoint, with its precision")
    parameters: int | None = None
    size_on_disk_bytes: int | None = Field(
        None,
        description="specialized: base + adapter; GGUF: the file; adapter GGUF: the adapter (`shared_base_bytes` "
        "and `adapter_file` apart)",
    )
    peak_memory_bytes: int | None = Field(
        None, description="its own process's peak above its memory before loading (CUDA: the allocator's peak)"
    )
    process_peak_memory_bytes: int | None = Field(None, description="that process's whole peak; null for an API")
    seconds_per_example_p50: float | None = Field(None, description="amortized over a batch (`_p95` beside it)")
    single_request_seconds_p50: float | None = Field(
        None, description="one request at a time after a warm-up (`_p95`, `single_request_rows` beside it)"
    )
    cost_per_1000_answers: float | None = Field(None, description="a priced reference; null elsewhere (`price`)")


class Comparison(Open):
    """The specialized model against one other candidate on the gating metric, row by row."""

    wins: int
    losses: int
    test: str = Field(description="`mcnemar_exact` for 0/1 rows, else `paired_bootstrap`")
    p_value: float | None


class Gate(Open):
    threshold: float | None
    value: float | None
    passed: bool


class Gates(BaseModel):
    passed: bool
    checks: dict[str, Gate] = Field(
        description="per gate: `specialized_min`, `min_gap_closed`, `quantized_max_drop`, `max_latency_ratio`, "
        "`cascade_min`"
    )


class Report(BaseModel):
    """report.json: everything report.md, report.html, compare, publish and the results pages show."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[REPORT_SCHEMA_VERSION] = Field(  # type: ignore[valid-type]
        description="what this contract is; a reader refuses another (`make report` rebuilds an older run's report)"
    )
    recipe: str = Field(description="the recipe's name")
    run_id: str = Field(description="the run folder's name: the hash of the resolved recipe and its data")
    metric: str = Field(description="the gating metric (the recipe's first)")
    eval_rows: int = Field(description="rows every candidate answered")
    candidates: dict[str, Candidate] = Field(description="per candidate name: a Candidate (below)")
    comparisons: dict[str, Comparison] = Field(
        description=(
            "specialized vs that candidate on the gating metric: `wins`, `losses`, `test` (`mcnemar_exact` "
            "for 0/1 rows, else `paired_bootstrap`), `p_value`, `won_rows`, `lost_rows` (row indices)"
        ),
    )
    gap_closed: float | None = Field(
        description="(specialized − base) / (reference − base); null without a reference or when they tie",
    )
    gates: Gates = Field(
        description=(
            "`passed`, and `checks.<gate>` = `{threshold, value, passed}` for `specialized_min`, "
            "`min_gap_closed`, `quantized_max_drop`, `max_latency_ratio`"
        ),
    )
    fidelity: dict[str, Any] = Field(
        description=(
            "`merge`: `{rows, positions, top1_agreement, max_abs_logit_diff}` of the merged model against "
            "base + adapter; per GGUF variant: `type`, `tensor_types` (count per type actually written), "
            "`export` = `{top1_agreement, nll, nll_merged}` against the merged model on the same tokens, "
            "`token_parity` = `{prompts, identical, mismatched_rows, first_mismatch}`, `end_token` = "
            "`{trained, gguf, same}`"
        ),
    )
    savings: dict[str, Any] | None = Field(
        description=(
            "where the reference has a price: `currency`, `reference_per_1000_answers`, "
            "`specialized_per_1000_answers` (0: no per-token charge), `saved_per_1000_answers`, "
            "`specialized_seconds_per_answer`, `prompt_tokens_saved_per_answer`"
        ),
    )
    synthesis: dict[str, Any] | None = Field(
        None,
        description=(
            "where a teacher wrote training rows (synthesize:): synthesize/result.json (`teacher`, `teacher_score` "
            "{`on`, `rows`, `accuracy`, `interval`}, `labels`, `seed_rows`, `asks`, `rows_asked`, `rows_written`, "
            "`rows_kept`, `dropped` {reason: rows}, `dropped_examples`, `label_check` {`mode`, `agreement`, "
            "`per_label`, `relabelled`}, `balance`, `lengths`, `diversity`, `sample`, `proposed_variations`, "
            "`teacher_cost`), plus "
            "`gold_rows`, `teacher_seconds` and `cost` (a priced teacher behind an API: `currency`, `total`, "
            "`prompt_tokens`, `generated_tokens`)"
        ),
    )
    distillation: dict[str, Any] | None = Field(
        None,
        description=(
            "where a distillation ran: `teacher`, `inputs`, `labelled_rows`, `dropped_rows`, `gold_rows`, "
            "`teacher_seconds` (`_per_input`), `teacher_gold_agreement` (where the inputs carried gold "
            "answers), `train_seconds`, `agreement_with_teacher` (the student's answers equal to the "
            "teacher's on the eval rows), `break_even_answers` (answers after which the student's lower "
            "seconds per answer paid back the labelling; `_with_training` adds the training time), "
            "`labelling_cost` (a priced teacher behind an API: `currency`, `total`, `prompt_tokens`, "
            "`generated_tokens`)"
        ),
    )
    validation: dict[str, Any] | None = Field(
        None,
        description=(
            "which adapter training kept, from `train/result.json`: `source` (how the validation rows were "
            "chosen), `metric`, `rows`, `curve` (step, epoch, value, seconds per pass), `chosen_step`, "
            "`chosen_value`, `select`, `why`, `stopped_early`, `seconds` (all passes); with train.refit, `refit` "
            "(train/result.json's: the second training on the training and validation rows, which ships)"
        ),
    )
    sweep: dict[str, Any] | None = Field(
        None,
        description=(
            "where a sweep chose this run: `metric`, `validation_rows`, `method`, `params`, `ship`, "
            "`time_budget_minutes`, `trials` (per trial: `index`, `settings`, `run_id`, `status`, `value`, "
            "`ci95`, `validation_loss`, `chosen_step`, `steps`, `stopped_early`, `train_seconds`, "
            "`scoring_seconds`, `parameters`, `size_bytes`, `peak_memory_bytes`, `latency_p50`, "
            "`latency_kind`, `runtime`, `device`, `threads`; all on the validation rows), `chosen`, "
            "`chosen_settings`, `chosen_run_id`, `why`, `seconds`"
        ),
    )
    learning_curve: dict[str, Any] | None = Field(
        None,
        description=(
            "where the recipe has one: `points` (`fraction`, `rows`, `gold_rows`, `teacher_labels`, `value`, "
            "`ci95` on the eval rows, `validation_value`, `chosen_step`, `train_seconds`; distillation: "
            "`teacher_seconds`, `teacher_cost`), `fit` (`a`, `b`, `c` of error = a·rows^-b + c), `floor`, "
            "`predicted_at_double`, `last_doubling_gain`, `flattened`, `target`, `projection` (`rows`, "
            "`interval`, `already_reached`, `share_of_refits_reaching_target`), `labelling`"
        ),
    )
    confidence: dict[str, Any] | None = Field(
        None,
        description=(
            "per candidate that reports confidences (specialized and quantized variants): `mean`, "
            "`mean_when_right`, `mean_when_wrong` (by the gating metric's per-row score), and for variants "
            "`versus_specialized` = `{same_answer, median_abs_difference, p95_abs_difference}`"
        ),
    )
    next_steps: list[dict[str, Any]] | None = Field(
        None,
        description="what would most likely help next, from this run's evidence: per point `kind`, `advice` (what to "
        "do, naming the recipe field), `evidence` (the figure behind it); `kind` nothing where nothing stands out",
    )
    flipped_rows: list[dict[str, Any]] | None = Field(
        None,
        description=(
            "up to 5 won and 5 lost rows against the base and against the reference: `source`, `input` (the "
            "prompt, or the last user turn), `expected`, `versus`, `other`, `specialized`, `kind`"
        ),
    )
    labels: dict[str, Any] | None = Field(
        None,
        description=(
            "label tasks (the training and eval targets form a label set): `train_rows` (rows per label the "
            "training had), and per candidate `per_label.<label>` = `{precision, recall, f1, support, "
            "predicted}` and `confusions` (`expected`, `answered`, `rows`; most rows first). report.md's "
            "**Errors by label** lists the specialist's labels worst first beside the reference's F1 and each"
            " label's training rows; a public bundle replaces an answer outside the label set, which may "
            "quote a row, with a placeholder"
        ),
    )
    answers: dict[str, Any] | None = Field(
        None,
        description=(
            "every task: `json_task` (scored by `json_match` / `json_top_level`, or every expected answer is "
            "a JSON object), `max_new_tokens`, `rows`, `length_bin_edges_chars`, `expected` = `{chars: {mean,"
            " p50, p95, max}, histogram}`, and per candidate `chars` and `histogram` (answer lengths in "
            "characters, on the shared bins), `generated_tokens` (mean, p50, p95, max), `median_length_ratio`"
            " (answer / expected length), `empty_rows`, `cut_off` = `{count, share, rows}` (generation "
            "reached `max_new_tokens` before the end token), and for a JSON task `invalid_json` = `{count, "
            "share, cut_off, rows, examples}` (answers that do not parse as a JSON object; how many of them "
            "were cut off; the first 5 with their text, which a public bundle leaves out). report.md's and "
            "report.html's **Answers** section shows it for tasks that are not a label set"
        ),
    )
    shared_base: dict[str, Any] | None = Field(
        None,
        description=(
            "per adapter GGUF (`gguf-lora`): `base_type`, `base_bytes`, `adapter_bytes`, `merged_variant` "
            "(the recipe's gguf file of the same type, or null), `merged_bytes` (`merged_bytes_measured`: "
            "false where it is the base file's size), `peak_memory_bytes`, `merged_peak_memory_bytes`, "
            "`answer_agreement_with_merged`, and `specialists` (for N = 1, 3, 10: `disk_merged_bytes`, "
            "`disk_shared_bytes`, `memory_merged_bytes`, `memory_shared_bytes`)"
        ),
    )
    cascade: dict[str, Any] | None = Field(
        None,
        description=(
            'where the recipe has one: see "Cascade" (per cascade `threshold`, `why`, `value`, `ci95`, '
            "`share_local`, `latency_seconds` {mean, p50, p95}, `versus_reference`, `curve`, `curve_rows`, "
            "`calibration`, `confident_wrong`, ...; `fallback`, `reference_eval_rows`)"
        ),
    )
    rows_left_out_empty: dict[str, int] | None = Field(
        None,
        description="rows left out of a split because their input or answer was empty, per split",
    )


def check(report: dict) -> dict:
    """The report as the report stage is about to write it, checked against the contract (a bug if not)."""
    Report.model_validate(report)
    return report


def has_report(run_dir: Path) -> bool:
    """Whether the run has a report to read: its report.json, or an older version's, of which read_report says
    how to rebuild it."""
    layout = RunLayout(run_dir)
    return layout.report_json.is_file() or layout.legacy_report_json.is_file()


def read_report(path: Path) -> dict:
    """A run's report.json, refused with the file and the fix where it is cut short or of another schema."""
    try:
        report = json.loads(path.read_text())
    except OSError as e:
        if RunLayout(path.parent.parent).legacy_report_json.is_file():
            raise PipelineError(
                f"{path.parent.parent}: its report is from an older version (evaluate/report.json); `make report "
                "RECIPE=...` (or `specialist report`) rebuilds it in report/ without generating again"
            ) from None
        raise PipelineError(f"{path}: cannot read the report ({e.strerror}); finish the run (`make train`)") from None
    except ValueError:
        raise PipelineError(f"{path} is not JSON (cut short?); `make report RECIPE=...` rebuilds it") from None
    version = report.get("schema_version") if isinstance(report, dict) else None
    if version != REPORT_SCHEMA_VERSION:
        raise PipelineError(
            f"{path}: report schema {version}, this version reads {REPORT_SCHEMA_VERSION}; `make report "
            "RECIPE=...` (or `specialist report`) rebuilds it from the run's evaluation without generating again"
        )
    try:
        Report.model_validate(report)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PipelineError(f"{path}: {where}: {first['msg']}; `make report RECIPE=...` rebuilds it") from None
    return report


def json_schema() -> str:
    """report.json's JSON Schema (recipes/report.schema.json)."""
    return json.dumps(Report.model_json_schema(), indent=2) + "\n"
