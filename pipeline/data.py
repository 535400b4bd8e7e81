"""The data stage: read rows, format them, tokenize with the loss on the right tokens, check for leaks.

Sources: .jsonl / .json / .csv / .parquet files and Hub datasets (`hub:org/name`). Formats:
prompt_completion (templates), alpaca, and messages (the chat template; assistant turns trained).
Training and evaluation build prompts with the same functions (`prompt_ids` / `training_example`),
so what the model saw in training is exactly what it is asked at evaluation.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.recipe import DataSection

IGNORE_INDEX = -100  # label value the loss skips
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass(frozen=True)
class TaskRow:
    """One formatted row. prompt_completion and alpaca fill `prompt`; messages fills `messages`."""

    target: str  # the expected answer: what evaluation compares against
    source: str  # file:line (or file row N) the row came from
    prompt: str | None = None  # the prompt text, before any chat template
    messages: tuple[dict, ...] | None = None  # the whole conversation; the last turn is the assistant's answer
    plain: bool = False  # format text: never wrapped in a chat template

    def exact_key(self) -> str:
        """What 'the same row' means for overlap counts: the prompt; for format text, the whole text."""
        if self.messages is not None:
            return json.dumps(self.messages[:-1])
        return f"{self.prompt} {self.target}".strip() if self.plain else self.prompt

    def dedup_key(self) -> str:
        """exact_key after lowercasing and collapsing whitespace."""
        return re.sub(r"\s+", " ", self.exact_key()).strip().lower()


# --- reading ------------------------------------------------------------------------------------


def read_source(source: str, section: DataSection, split: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a file or Hub dataset, columns renamed as the recipe says."""
    if source.startswith("hub:"):
        rows = _read_hub(source.removeprefix("hub:"), section, split)
    else:
        rows = _read_file(Path(source))
    if not rows:
        raise PipelineError(f"{source}: no rows (the file is empty)")
    if section.columns:
        rows = [(where, {section.columns.get(k, k): v for k, v in row.items()}) for where, row in rows]
    return rows


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; bad lines are errors naming file and line."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
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


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise PipelineError(f"{path}: data file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None


def _read_file(path: Path) -> list[tuple[str, dict]]:
    if path.suffix not in FILE_TYPES:
        raise PipelineError(f"{path}: unsupported data file type {path.suffix!r}; use one of {', '.join(FILE_TYPES)}")
    if path.suffix == ".jsonl":
        return [(f"{path}:{n}", row) for n, row in read_jsonl(path)]
    if path.suffix == ".json":
        text = _read_text(path)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PipelineError(f"{path}: expected a JSON array of objects (or use .jsonl, one object a line)")
        return [(f"{path} row {i}", row) for i, row in enumerate(rows, start=1)]
    if not path.is_file():
        raise PipelineError(f"{path}: data file not found")
    import datasets

    builder = "csv" if path.suffix == ".csv" else "parquet"
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad file; all mean the same to a user
        raise PipelineError(f"{path}: could not read as {builder}: {str(e).splitlines()[0][:300]}") from None
    # csv: header is line 1, so row i is on line i + 1
    where = (lambda i: f"{path}:{i + 1}") if builder == "csv" else (lambda i: f"{path} row {i}")
    return [(where(i), row) for i, row in enumerate(table, start=1)]


def _read_hub(ref: str, section: DataSection, split: str) -> list[tuple[str, dict]]:
    import datasets

    name, _, revision = ref.partition("@")
    split_name = section.train_split if split == "train" else section.eval_split
    try:
        table = datasets.load_dataset(name, section.hub_config, split=split_name, revision=revision or None)
    except Exception as e:  # noqa: BLE001 - network, missing split, missing config: all reported the same way
        raise PipelineError(
            f"hub:{ref}: could not load split {split_name!r} ({str(e).splitlines()[0][:300]}). If this machine is "
            "offline, export the dataset to a .jsonl or .parquet file where you have the Hub and use that file."
        ) from None
    return [(f"hub:{ref}[{split_name}] row {i}", row) for i, row in enumerate(table, start=1)]


# --- formatting ---------------------------------------------------------------------------------


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


def format_row(
    section: DataSection,
    row: dict[str, Any],
    where: str,
    prompt_template: str | None = None,
    prompt_field: str = "data.prompt",
    for_eval: bool = False,
) -> TaskRow:
    if section.format == "text":
        text = row.get(section.text_field)
        if not isinstance(text, str) or not text.strip():
            raise PipelineError(f"{where}: format text needs a non-empty text column {section.text_field!r}")
        if not for_eval:
            return TaskRow(prompt="", target=text, source=where, plain=True)
        words = text.split()
        if len(words) < 2:
            raise PipelineError(f"{where}: an eval text needs at least two words (the first half is the prompt)")
        half = len(words) // 2
        return TaskRow(prompt=" ".join(words[:half]), target=" ".join(words[half:]), source=where, plain=True)
    if section.format == "prompt_completion":
        return TaskRow(
            prompt=render(prompt_template or section.prompt, row, where, prompt_field),
            target=render(section.target, row, where, "data.target"),
            source=where,
        )
    if section.format == "alpaca":
        for column in ("instruction", "output"):
            if not isinstance(row.get(column), str):
                raise PipelineError(
                    f"{where}: format alpaca needs a text column {column!r}; this row has {', '.join(row)}"
                )
        extra = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if extra else "",
            instruction=row["instruction"],
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return TaskRow(prompt=prompt, target=row["output"], source=where)
    return _messages_row(row.get(section.messages_field), section.messages_field, where)


def _messages_row(turns: Any, column: str, where: str) -> TaskRow:
    if not isinstance(turns, list) or not turns:
        raise PipelineError(f"{where}: column {column!r} must be a non-empty list of {{role, content}} turns")
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("content"), str)
            or turn.get("role")
            not in (
                "system",
                "user",
                "assistant",
            )
        ):
            raise PipelineError(f"{where}: {column}[{i}] must be {{role: system|user|assistant, content: text}}")
    if turns[-1]["role"] != "assistant":
        raise PipelineError(f"{where}: the last turn must be the assistant's answer (it is {turns[-1]['role']!r})")
    messages = tuple({"role": t["role"], "content": t["content"]} for t in turns)
    return TaskRow(target=messages[-1]["content"], source=where, messages=messages)


@dataclass(frozen=True)
class Splits:
    train: list[TaskRow]
    eval: list[TaskRow]
    duplicates_in_train: int  # rows whose normalized prompt occurs earlier in train
    overlap_exact: int  # eval rows whose prompt occurs verbatim in train
    overlap_normalized: int  # ... after lowercasing and collapsing whitespace


def load_splits(
    section: DataSection,
    prompt_template: str | None = None,
    prompt_field: str = "data.prompt",
    distilled: Path | None = None,
) -> Splits:
    """Train and eval rows, formatted; eval carved from train (seeded) when the recipe gives none.

    distilled: the distill stage's labelled rows, trained on after data.train's gold rows.
    """
    train_raw = read_source(section.train, section, "train") if section.train is not None else []
    if section.eval is None:
        shuffled = train_raw[:]
        random.Random(section.split_seed).shuffle(shuffled)
        held_out = max(1, round(len(shuffled) * section.eval_fraction))
        eval_raw, train_raw = shuffled[:held_out], shuffled[held_out:]
    else:
        eval_raw = read_source(section.eval, section, "eval")
    train_raw = train_raw[: section.max_train_rows]
    if distilled is not None:
        train_raw = train_raw + _read_file(distilled)  # written with data.columns already applied
    train = [format_row(section, row, where) for where, row in train_raw]
    eval_rows = [
        format_row(section, row, where, prompt_template, prompt_field, for_eval=True)
        for where, row in eval_raw[: section.max_eval_rows]
    ]
    seen: set[str] = set()
    duplicates = 0
    for row in train:
        key = row.dedup_key()
        duplicates += key in seen
        seen.add(key)
    # overlap is about the prompts the model is evaluated on, so compare with the recipe's own prompts
    own_eval = (
        eval_rows
        if prompt_template is None
        else [format_row(section, row, where, for_eval=True) for where, row in eval_raw[: section.max_eval_rows]]
    )
    exact_train = {r.exact_key() for r in train}
    exact = sum(r.exact_key() in exact_train for r in own_eval)
    normalized = sum(r.dedup_key() in seen for r in own_eval)
    return Splits(train, eval_rows, duplicates, exact, normalized)


def load_rows(
    section: DataSection, split: str, prompt_template: str | None = None, prompt_field: str = "data.prompt"
) -> list[TaskRow]:
    splits = load_splits(section, prompt_template, prompt_field)
    return splits.train if split == "train" else splits.eval


def data_fingerprint(section: DataSection) -> str:
    """Hash of the source bytes plus the data section: same fingerprint, same training data."""
    digest = hashlib.sha256(json.dumps(section.model_dump(mode="json"), sort_keys=True).encode())
    for source in (section.train, section.eval, section.chat_template_file):
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


# --- tokenization -------------------------------------------------------------------------------


def apply_chat_template_file(tokenizer, section: DataSection) -> None:
    """Use the recipe's chat template file instead of the tokenizer's own (training and evaluation alike)."""
    if section.chat_template_file is not None:
        tokenizer.chat_template = Path(section.chat_template_file).read_text(encoding="utf-8")


def uses_chat_template(tokenizer, setting: str) -> bool:
    return setting == "auto" and bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, row: TaskRow, chat: bool, system: str | None = None) -> tuple[str, bool]:
    """What a candidate is asked at evaluation for this row, as text, and whether the tokenizer adds its
    special tokens (BOS) to it: a plain prompt gets them, a chat-rendered one carries its own."""
    if row.messages is None:
        if not chat or row.plain:
            return row.prompt, True
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": row.prompt})
    else:
        messages = list(row.messages[:-1])
        if system and messages and messages[0]["role"] == "system":
            messages = messages[1:]
        messages = ([{"role": "system", "content": system}] if system else []) + messages
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False


def prompt_ids(tokenizer, row: TaskRow, chat: bool, system: str | None = None) -> list[int]:
    """What a candidate is asked at evaluation for this row: everything before the answer, as token ids."""
    text, add_special = prompt_text(tokenizer, row, chat, system)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def training_example(tokenizer, row: TaskRow, chat: bool) -> dict[str, list[int]]:
    """input_ids and labels; only answer tokens and the EOS that ends them carry labels."""
    if row.messages is not None:
        return _messages_example(tokenizer, row)
    prompt = prompt_ids(tokenizer, row, chat)
    target = tokenizer(row.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def _messages_example(tokenizer, row: TaskRow) -> dict[str, list[int]]:
    """Render turn by turn with the chat template; each assistant turn (with its end-of-turn) is trained.

    Segments are the differences between successive renders, tokenized separately, so the labels line
    up with exactly the assistant's tokens whatever the template looks like.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    messages = list(row.messages)
    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            _extend(tokenizer, before, rendered, row, input_ids, labels, trained=False)
            rendered = before
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        _extend(tokenizer, upto, rendered, row, input_ids, labels, trained=turn["role"] == "assistant")
        rendered = upto
    if tokenizer.eos_token_id not in input_ids[-3:]:  # templates that end turns with another token
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return {"input_ids": input_ids, "labels": labels}


def _extend(tokenizer, text: str, previous: str, row: TaskRow, input_ids: list, labels: list, trained: bool) -> None:
    if not text.startswith(previous):
        raise PipelineError(
            f"{row.source}: the chat template renders earlier turns differently once later turns are added, so "
            "the trained tokens cannot be located; use data.chat_template_file with a template that does not"
        )
    ids = tokenizer(text[len(previous) :], add_special_tokens=False)["input_ids"]
    input_ids.extend(ids)
    labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))


@dataclass(frozen=True)
class Tokenized:
    examples: list[dict[str, list[int]]]
    lengths: list[int]  # tokens per row before any truncation
    dropped: int
    truncated: int


def training_examples(tokenizer, rows: list[TaskRow], chat: bool, section: DataSection) -> Tokenized:
    """Tokenized rows, with those longer than max_seq_len dropped or truncated as the recipe says."""
    limit = section.max_seq_len
    examples, lengths, dropped, truncated = [], [], 0, 0
    for row in rows:
        ex = training_example(tokenizer, row, chat)
        lengths.append(len(ex["input_ids"]))
        if len(ex["input_ids"]) > limit:
            if section.too_long == "drop":
                dropped += 1
                continue
            ex = {key: value[:limit] for key, value in ex.items()}
            truncated += 1
            if all(label == IGNORE_INDEX for label in ex["labels"]):
                dropped += 1  # nothing left to learn from
                continue
        examples.append(ex)
    return Tokenized(examples, lengths, dropped, truncated)


def pack(examples: list[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate rows into sequences of at most max_seq_len tokens.

    position_ids restart at 0 for each row; with no attention mask, transformers reads the restarts as
    sequence boundaries and keeps attention inside each row.
    """
    packed: list[dict[str, list[int]]] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        if current["input_ids"] and len(current["input_ids"]) + len(ex["input_ids"]) > max_seq_len:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += [IGNORE_INDEX] + ex["labels"][1:]  # never predict a row's start from the previous row
        current["position_ids"] += list(range(len(ex["input_ids"])))
    if current["input_ids"]:
        packed.append(current)
    return packed


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a training batch; padded positions get no attention and no labels.

    Packed rows (with position_ids) are padded with position 0 and no attention mask, so the padding
    reads as one more sequence of its own.
    """
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    packed = "position_ids" in examples[0]
    batch: dict[str, list] = {"input_ids": [], "labels": [], ("position_ids" if packed else "attention_mask"): []}
    for ex in examples:
        pad = width - len(ex["input_ids"])
        batch["input_ids"].append(ex["input_ids"] + [pad_id] * pad)
        batch["labels"].append(ex["labels"] + [IGNORE_INDEX] * pad)
        if packed:
            batch["position_ids"].append(ex["position_ids"] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(ex["input_ids"]) + [0] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}
