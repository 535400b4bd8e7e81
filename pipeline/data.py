"""Task rows: read, render through the recipe's templates, tokenize with the loss on target tokens only.

Training and evaluation build prompts with the same functions (`prompt_token_ids`), so what the model
saw in training is exactly what it is asked at evaluation.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.recipe import DataSection

IGNORE_INDEX = -100  # label value the loss skips


@dataclass(frozen=True)
class TaskRow:
    prompt: str  # rendered prompt template (before any chat template)
    target: str  # rendered target template: the expected answer
    source: str  # file:line the row came from, for error messages and flipped-row reports


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; bad lines are errors naming file and line."""
    if not path.is_file():
        raise PipelineError(f"{path}: data file not found")
    if path.suffix != ".jsonl":
        raise PipelineError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl (one JSON object a line)")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise PipelineError(f"{path}: no rows (the file is empty)")
    return rows


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def render(template: str, row: dict[str, Any], where: str, field: str) -> str:
    try:
        return template.format_map(row)
    except KeyError as e:
        raise PipelineError(
            f"{where}: row has no field {e.args[0]!r}, which {field} uses; fields in this row: {', '.join(row)}"
        ) from None
    except (ValueError, IndexError) as e:
        raise PipelineError(f"{field}: bad template {template!r}: {e} (write literal braces as {{{{ }}}})") from None


def load_rows(
    section: DataSection, split: str, prompt_template: str | None = None, prompt_field: str = "data.prompt"
) -> list[TaskRow]:
    """Rows of the train or eval split, rendered; prompt_template overrides data.prompt (the reference's)."""
    path = Path(section.train if split == "train" else section.eval)
    limit = section.max_train_rows if split == "train" else section.max_eval_rows
    prompt_template = prompt_template or section.prompt
    rows = []
    for number, row in read_jsonl(path)[:limit]:
        where = f"{path}:{number}"
        rows.append(
            TaskRow(
                prompt=render(prompt_template, row, where, prompt_field),
                target=render(section.target, row, where, "data.target"),
                source=where,
            )
        )
    return rows


def data_fingerprint(section: DataSection) -> str:
    """Hash of the source bytes plus the data section: same fingerprint, same training data."""
    digest = hashlib.sha256(json.dumps(section.model_dump(mode="json"), sort_keys=True).encode())
    for path in (section.train, section.eval):
        digest.update(Path(path).read_bytes() if Path(path).is_file() else b"<missing>")
    return digest.hexdigest()


# --- tokenization -------------------------------------------------------------------------------


def uses_chat_template(tokenizer, setting: str) -> bool:
    return setting == "auto" and bool(getattr(tokenizer, "chat_template", None))


def prompt_token_ids(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt as the model sees it, ending where the answer starts."""
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def training_example(tokenizer, row: TaskRow, chat: bool) -> dict[str, list[int]]:
    """Prompt + target + EOS; only target and EOS carry labels, so the model learns to answer and stop."""
    prompt_ids = prompt_token_ids(tokenizer, row.prompt, chat)
    target_ids = tokenizer(row.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + target_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def training_examples(tokenizer, rows: list[TaskRow], chat: bool, max_seq_len: int) -> tuple[list[dict], int]:
    """Tokenized rows that fit max_seq_len, and how many were dropped for being longer."""
    examples = [training_example(tokenizer, row, chat) for row in rows]
    kept = [ex for ex in examples if len(ex["input_ids"]) <= max_seq_len]
    return kept, len(examples) - len(kept)


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a training batch; padded positions get no attention and no labels."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ex in examples:
        pad = width - len(ex["input_ids"])
        batch["input_ids"].append(ex["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append(ex["attention_mask"] + [0] * pad)
        batch["labels"].append(ex["labels"] + [IGNORE_INDEX] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}
