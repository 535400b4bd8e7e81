"""The data stage: read rows, format them, tokenize with the loss on the right tokens, check for leaks.

Sources: .jsonl / .json / .csv / .tsv / .parquet files and Hub datasets (`hub:org/name`). Formats:
prompt_completion (templates), alpaca, and messages (the chat template; assistant turns trained).
Training and evaluation build prompts with the same functions (`prompt_ids` / `training_example`),
so what the model saw in training is exactly what it is asked at evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError, RemoteError
from pipeline.remote import hub_failure_in_chain

if TYPE_CHECKING:  # annotations only: the recipe module imports this one (the run id hashes the data)
    from pipeline.recipe import DataSection
from pipeline.templates import template_fields

IGNORE_INDEX = -100  # label value the loss skips
FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

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

    def input_text(self) -> str:
        """What the row asked: the prompt, or the last user turn of a conversation."""
        if self.messages is None:
            return self.prompt
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

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
    # split on newlines only: str.splitlines also splits at U+2028 and friends, which JSON strings may hold
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = _format_hint(path, line) if number == 1 or not rows else ""
            raise PipelineError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno}){hint}") from None
        if not isinstance(row, dict):
            hint = "; a JSON array of objects goes in a .json file" if isinstance(row, list) else ""
            raise PipelineError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}{hint}")
        rows.append((number, row))
    if not rows:
        raise PipelineError(f"{path}: no rows (the file is empty)")
    return rows


def _read_text(path: Path) -> str:
    """A text data file as the user meant it: UTF-8 with or without a byte-order mark (Excel writes
    one), any line ends; anything else is an error naming the file and what to do."""
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PipelineError(
            f"{path}:{line}: not UTF-8 text (undecodable byte at offset {e.start}); re-save the file as UTF-8"
        ) from None
    return text


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise PipelineError(f"{path}: data file not found")
    raw = path.read_bytes()
    if raw.startswith(b"PK\x03\x04") and path.suffix != ".parquet":
        raise PipelineError(
            f"{path}: this is a zip archive (an Excel .xlsx workbook?), not {path.suffix} text; "
            "export it as CSV UTF-8 (or JSON lines)"
        )
    if path.suffix == ".parquet" and not raw.startswith(b"PAR1"):
        raise PipelineError(f"{path}: not a Parquet file (no PAR1 header); check the file or its extension")
    return raw


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _format_hint(path: Path, text: str) -> str:
    """When a file's content does not match its extension, say what it looks like."""
    first = _first_line(text).lstrip()
    if path.suffix == ".jsonl" and first.startswith("["):
        return "; it looks like one JSON array: name the file .json"
    if path.suffix == ".json" and first.startswith("{"):
        return "; it looks like one JSON object per line: name the file .jsonl"
    if path.suffix in (".json", ".jsonl") and not first.startswith(("{", "[")) and ("," in first or "\t" in first):
        return "; it looks like a table with a header row: name the file .csv (or .tsv)"
    return ""


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
            hint = _format_hint(path, text)
            raise PipelineError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}){hint}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PipelineError(f"{path}: expected a JSON array of objects (or use .jsonl, one object a line)")
        return [(f"{path} row {i}", row) for i, row in enumerate(rows, start=1)]
    import datasets

    if path.suffix == ".parquet":
        _read_bytes(path)
        builder, options = "parquet", {}
    else:
        text = _read_text(path)
        separator = "\t" if path.suffix == ".tsv" else ","
        header = _first_line(text)
        if separator not in header:
            for other, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"), (",", "comma")):
                if other != separator and other in header:
                    raise PipelineError(
                        f"{path}:1: the header is {name}-separated, not {path.suffix[1:].upper()}; "
                        + ("name the file .tsv" if other == "\t" else "save it with commas as separators")
                        + f" (header: {header[:80]!r})"
                    )
        if header.lstrip().startswith(("{", "[")):
            raise PipelineError(f"{path}:1: this looks like JSON, not a table; name the file .jsonl or .json")
        builder, options = "csv", {"sep": separator, "encoding": "utf-8-sig"}
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
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
    except Exception as e:  # noqa: BLE001 - network, missing split, missing config: each a clear message
        failure = hub_failure_in_chain(e, f"hub:{ref}")
        if isinstance(failure, RemoteError):  # retry later (exit 3), not a recipe to fix
            raise RemoteError(
                f"{failure} (split {split_name!r}). If this machine is offline, export the dataset to a .jsonl or "
                ".parquet file where you have the Hub and use that file."
            ) from None
        raise PipelineError(
            f"hub:{ref}: could not load split {split_name!r} ({str(e).splitlines()[0][:300]}). If this machine is "
            "offline, export the dataset to a .jsonl or .parquet file where you have the Hub and use that file."
        ) from None
    return [(f"hub:{ref}[{split_name}] row {i}", row) for i, row in enumerate(table, start=1)]


# --- formatting ---------------------------------------------------------------------------------


class EmptyField(PipelineError):
    """A row whose field that a template or format uses holds no text (null, "", only spaces)."""

    def __init__(self, where: str, column: str, field: str):
        self.where, self.column = where, column
        super().__init__(
            f'{where}: column {column!r} is empty (null, "" or only spaces) and {field} uses it; fill it in, '
            "or set data.empty_rows: drop to leave such rows out (they are counted in validate and the report)"
        )


def text_value(value: Any, where: str, column: str, field: str) -> str:
    """A row's value as the text a template inserts. Strings as written; numbers as their digits, booleans as
    true/false, and lists and objects as compact JSON in the file's key order (as JSON spells them: a JSON target
    such as {"intent": ..., "slots": {...}} needs no flattening); nothing is an error."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise EmptyField(where, column, field)
    if isinstance(value, str):
        if not value.strip():
            raise EmptyField(where, column, field)
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False)
    raise PipelineError(
        f"{where}: column {column!r} holds a {type(value).__name__} ({json.dumps(value, default=str)[:60]}), "
        f"not text; {field} inserts text, a number, or a list or object (as JSON) here. Convert the column, or "
        "pick another one"
    )


def render(template: str, row: dict[str, Any], where: str, field: str) -> str:
    try:
        names = template_fields(template)
    except ValueError as e:
        raise PipelineError(f"{field}: bad template {template!r}: {e} (write literal braces as {{{{ }}}})") from None
    for name in names:
        if name not in row:
            raise PipelineError(
                f"{where}: row has no field {name!r}, which {field} uses; fields in this row: {', '.join(row)}"
            )
    values = {name: text_value(row[name], where, name, field) for name in names}
    try:
        return template.format_map(values)
    except (ValueError, IndexError, KeyError, AttributeError) as e:
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
        if section.text_field not in row:
            raise PipelineError(
                f"{where}: format text needs a text column {section.text_field!r}; this row has {', '.join(row)}"
            )
        text = text_value(row[section.text_field], where, section.text_field, "format text")
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
            if column not in row:
                raise PipelineError(
                    f"{where}: format alpaca needs a text column {column!r}; this row has {', '.join(row)}"
                )
        instruction = text_value(row["instruction"], where, "instruction", "format alpaca")
        output = text_value(row["output"], where, "output", "format alpaca")
        extra = row.get("input")  # optional: absent, null or blank means no input block
        if extra is None or (isinstance(extra, str) and not extra.strip()):
            extra = ""
        else:
            extra = text_value(extra, where, "input", "format alpaca")
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if extra else "",
            instruction=instruction,
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return TaskRow(prompt=prompt, target=output, source=where)
    return _messages_row(row.get(section.messages_field), section.messages_field, where)


def placeholder_row(section: DataSection, row: TaskRow) -> TaskRow:
    """`row` with the data's text replaced by <field> placeholders: the prompt's shape, none of its content
    (for what is published where rows of the data must not go)."""
    if row.messages is not None:
        turns = tuple({"role": turn["role"], "content": f"<{turn['role']} message>"} for turn in row.messages)
        return dataclasses.replace(row, messages=turns, target="<answer>")
    if section.format == "text":
        return dataclasses.replace(row, prompt="<the beginning of a text>", target="<its continuation>")
    if section.format == "alpaca":
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context",
            instruction="<instruction>",
            input_block="### Input:\n<input>\n\n",
        )
        return dataclasses.replace(row, prompt=prompt, target="<output>")
    fields = {name: f"<{name}>" for name in template_fields(section.prompt)}
    return dataclasses.replace(row, prompt=section.prompt.format_map(fields), target="<answer>")


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
    for i, turn in enumerate(turns):
        if not turn["content"].strip() and turn["role"] != "system":
            raise EmptyField(where, f"{column}[{i}].content", f"format messages ({turn['role']} turn)")
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
    dropped_empty: dict[str, list[str]] = field(default_factory=dict)  # split -> file:line of rows left out
    sampled_from: dict[str, int] = field(default_factory=dict)  # split -> rows before max_*_rows sampling
    validation: list[TaskRow] = field(default_factory=list)  # scored while training, never trained on
    validation_source: str = ""  # how the validation rows were chosen, in words (validate prints it)
    train_fraction_of: dict[str, int] = field(default_factory=dict)  # gold / distilled -> rows before the fraction
    distilled_rows: int = 0  # of train, the rows the distill stage's teacher labelled (after the gold rows)
    synthesized_rows: int = 0  # of train, the rows the synthesize stage's teacher wrote (after the gold rows)


VALIDATION_SHARE = 0.1  # the default validation split: this share of the training rows,
VALIDATION_MAX_ROWS = 300  # at most this many (enough to tell checkpoints apart, cheap to generate),
VALIDATION_MIN_ROWS = 20  # and none when fewer than this would be held out


def validation_count(setting: str | int | float | None, train_rows: int) -> int:
    """How many training rows data.validation holds out (a file holds out none)."""
    if isinstance(setting, str):
        return 0
    if setting is None:
        count = min(VALIDATION_MAX_ROWS, round(train_rows * VALIDATION_SHARE))
        return count if count >= VALIDATION_MIN_ROWS else 0
    count = round(train_rows * setting) if isinstance(setting, float) else setting
    if count and count >= train_rows:
        raise PipelineError(
            f"data.validation: {setting} would hold out {count} of the {train_rows} training rows, leaving none to "
            "train on; give a smaller share or count, or a validation file"
        )
    return count


def load_splits(
    section: DataSection,
    prompt_template: str | None = None,
    prompt_field: str = "data.prompt",
    distilled: Path | None = None,
    synthesized: Path | None = None,
) -> Splits:
    """Train and eval rows, formatted; eval carved from train (seeded) when the recipe gives none.

    Every row of the files is formatted (so a bad row anywhere is found), then max_train_rows /
    max_eval_rows draw their samples. distilled: the distill stage's labelled rows, synthesized: the synthesize
    stage's rows, each trained on after data.train's gold rows (never sampled away).
    """
    train_raw = read_source(section.train, section, "train") if section.train is not None else []
    if section.eval is None:
        shuffled = train_raw[:]
        random.Random(section.split_seed).shuffle(shuffled)
        held_out = max(1, round(len(shuffled) * section.eval_fraction))
        eval_raw, train_raw = shuffled[:held_out], shuffled[held_out:]
    else:
        eval_raw = read_source(section.eval, section, "eval")
    dropped: dict[str, list[str]] = {}
    train_all = _format_rows(section, train_raw, dropped.setdefault("train", []))
    eval_all = _format_rows(section, eval_raw, dropped.setdefault("eval", []), for_eval=True)
    eval_pairs = sample_rows([r for _, r in eval_all], section.max_eval_rows, section.split_seed)
    own_eval = [row for _, row in eval_pairs]
    # Validation rows first, from the whole training file, never a row whose input is an eval row's; then
    # max_train_rows draws from the rest: every sample size (a sweep over it) is chosen on the same rows.
    rest, validation, validation_source = _hold_out_validation(
        section,
        [row for _, row in train_all],
        [train_raw[i] for i, _ in train_all],
        {r.dedup_key() for r in own_eval},
        dropped,
        prompt_template,
        prompt_field,
    )
    sampled_from = {"train": len(rest), "eval": len(eval_all)}
    train = [row for _, row in sample_rows(rest, section.max_train_rows, section.split_seed)]
    labelled = [format_row(section, row, where) for where, row in _read_file(distilled)] if distilled else []
    written = [format_row(section, row, where) for where, row in _read_file(synthesized)] if synthesized else []
    fraction_of = {}
    if section.train_fraction is not None and section.train_fraction_of == "synthesized":  # the gold rows whole
        fraction_of = {"synthesized": len(written)}
        written = nested_fraction(written, section.train_fraction, section.split_seed)
    elif section.train_fraction is not None:  # gold, teacher-labelled and teacher-written rows each by the same share
        fraction_of = {"gold": len(train), "distilled": len(labelled), "synthesized": len(written)}
        train = nested_fraction(train, section.train_fraction, section.split_seed)
        labelled = nested_fraction(labelled, section.train_fraction, section.split_seed)
        written = nested_fraction(written, section.train_fraction, section.split_seed)
    train += labelled + written
    if prompt_template is None:
        eval_rows = own_eval
    else:  # the same sampled rows, asked with another prompt (a reference's)
        raw = [eval_raw[eval_all[k][0]] for k, _ in eval_pairs]
        eval_rows = [
            format_row(section, row, where, prompt_template, prompt_field, for_eval=True) for where, row in raw
        ]
    seen: set[str] = set()
    duplicates = 0
    for row in train:
        key = row.dedup_key()
        duplicates += key in seen
        seen.add(key)
    # overlap is about the prompts the model is evaluated on, so compare with the recipe's own prompts
    exact_train = {r.exact_key() for r in train}
    exact = sum(r.exact_key() in exact_train for r in own_eval)
    normalized = sum(r.dedup_key() in seen for r in own_eval)
    dropped = {split: wheres for split, wheres in dropped.items() if wheres}
    return Splits(
        train,
        eval_rows,
        duplicates,
        exact,
        normalized,
        dropped,
        sampled_from,
        validation,
        validation_source,
        fraction_of,
        len(labelled),
        len(written),
    )


def nested_fraction(rows: list[TaskRow], fraction: float, seed: int) -> list[TaskRow]:
    """The first `fraction` of the rows in a seeded order (file order kept among those chosen), so a smaller
    share is always part of a larger one: a learning curve adds rows, it never swaps them. For label sets
    the order is stratified: each label's rows, shuffled, are spread evenly over the order (systematic
    sampling), so any prefix holds every label at its share, give or take one row."""
    count = round(len(rows) * fraction)
    if count >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    targets = [row.target for row in rows]
    if is_label_set(targets):
        groups: dict[str, list[int]] = {}
        for i, target in enumerate(targets):
            groups.setdefault(target, []).append(i)
        keys: dict[int, float] = {}
        for members in groups.values():
            rng.shuffle(members)
            offset = rng.random()
            keys.update((i, (position + offset) / len(members)) for position, i in enumerate(members))
        order = sorted(range(len(rows)), key=lambda i: (keys[i], i))
    else:
        order = list(range(len(rows)))
        rng.shuffle(order)
    return [rows[i] for i in sorted(order[:count])]


def _hold_out_validation(
    section: DataSection,
    train: list[TaskRow],
    raw_of: list[tuple[str, dict]],
    eval_keys: set[str],
    dropped: dict,
    prompt_template: str | None = None,
    prompt_field: str = "data.prompt",
) -> tuple[list[TaskRow], list[TaskRow], str]:
    """(the rows left to train on, the validation rows, how the latter were chosen, in words).

    Held-out rows are a seeded sample of the training rows, stratified by target for label sets, and are
    formatted as the evaluate stage formats its rows (format text: the first half asks for the rest), with
    `prompt_template` where given (a reference's prompt: the same rows, asked as the reference is asked).
    A row whose input is an eval row's (eval_keys: normalized prompts) is never a validation row: what is
    chosen on validation rows is judged on the eval rows. Rows are compared, not file names.
    """
    if isinstance(section.validation, str):
        raw = read_source(section.validation, section, "validation")
        formatted = _format_rows(section, raw, dropped.setdefault("validation", []), for_eval=True)
        if not formatted:
            raise PipelineError(f"data.validation: {section.validation} has no rows")
        kept = [(i, row) for i, row in formatted if row.dedup_key() not in eval_keys]
        shared = len(formatted) - len(kept)
        if shared * 2 >= len(formatted):
            raise PipelineError(
                f"data.validation: {shared} of the {len(formatted)} rows of {section.validation} have the input of an "
                "eval row: the checkpoint, a cascade's threshold and a sweep's winner would be chosen on the rows "
                "the report then judges. Give validation rows that are not eval rows (or leave data.validation "
                "out to hold rows out of the training data)"
            )
        rows = [
            format_row(section, raw[i][1], raw[i][0], prompt_template, prompt_field, for_eval=True)
            if prompt_template
            else row
            for i, row in kept
        ]
        left_out = f"; {shared} rows with an eval row's input left out" if shared else ""
        return train, rows, f"{len(rows)} rows of {section.validation}{left_out}"
    count = validation_count(section.validation, len(train))
    if count == 0:
        if section.validation == 0:
            return train, [], "none (data.validation: 0)"
        return (
            train,
            [],
            (
                f"none: {len(train)} training rows are too few for the default split ({VALIDATION_SHARE:.0%} would be "
                f"under {VALIDATION_MIN_ROWS} rows); set data.validation to hold some out anyway"
            ),
        )
    candidates = [k for k, row in enumerate(train) if row.dedup_key() not in eval_keys]
    if count >= len(candidates):
        raise PipelineError(
            f"data.validation: {section.validation} would hold out {count} of the {len(candidates)} training rows "
            "whose input is not an eval row's, leaving none to train on; give a smaller share or count, or a "
            "validation file"
        )
    held = {candidates[k] for k, _ in sample_rows([train[k] for k in candidates], count, section.split_seed)}
    validation = [
        format_row(section, raw_of[k][1], raw_of[k][0], prompt_template, prompt_field, for_eval=True)
        for k in sorted(held)
    ]
    kind = "stratified by target" if is_label_set([r.target for r in train]) else "at random"
    setting = "the default" if section.validation is None else f"data.validation: {section.validation}"
    skipped = len(train) - len(candidates)
    never = f"; none of the {skipped} with an eval row's input" if skipped else ""
    sampled = "; data.max_train_rows samples the rest" if section.max_train_rows is not None else ""
    source = f"{count} of {len(train)} training rows ({setting}), seeded (split_seed {section.split_seed}), {kind}"
    source += never + sampled
    return [row for k, row in enumerate(train) if k not in held], validation, source


def _format_rows(
    section: DataSection, raw: list[tuple[str, dict]], dropped: list[str], for_eval: bool = False
) -> list[tuple[int, TaskRow]]:
    """(index in raw, row) of every row that formats; rows with an empty field dropped where the recipe says."""
    rows = []
    for i, (where, row) in enumerate(raw):
        try:
            rows.append((i, format_row(section, row, where, for_eval=for_eval)))
        except EmptyField as e:
            if section.empty_rows != "drop":
                raise
            dropped.append(f"{e.where} ({e.column})")
    return rows


def is_label_set(targets: list[str]) -> bool:
    """Whether the targets are labels (few values, each repeated) rather than free text."""
    distinct = len(set(targets))
    return len(targets) >= 2 and distinct <= max(2, len(targets) // 4)


def sample_rows(rows: list[TaskRow], limit: int | None, seed: int) -> list[tuple[int, TaskRow]]:
    """(index, row) of a seeded sample of `limit` rows in file order; stratified by target for label
    sets (each label's share as in the file, and every label at least once where `limit` allows)."""
    indexed = list(enumerate(rows))
    if limit is None or len(rows) <= limit:
        return indexed
    rng = random.Random(seed)
    targets = [row.target for row in rows]
    if not is_label_set(targets):
        return sorted(rng.sample(indexed, limit), key=lambda pair: pair[0])
    groups: dict[str, list[int]] = {}
    for i, target in enumerate(targets):
        groups.setdefault(target, []).append(i)
    exact = {t: limit * len(members) / len(rows) for t, members in groups.items()}
    quota = {t: int(share) for t, share in exact.items()}
    if limit >= len(groups):
        for t in quota:
            quota[t] = max(quota[t], 1)
    order = sorted(groups, key=lambda t: (exact[t] - int(exact[t]), rng.random()), reverse=True)
    while sum(quota.values()) < limit:  # the remainder to the largest fractional parts
        for t in order:
            if sum(quota.values()) < limit and quota[t] < len(groups[t]):
                quota[t] += 1
    while sum(quota.values()) > limit:  # the at-least-once rule overshot: take back from the largest
        largest = max(quota, key=lambda t: quota[t])
        quota[largest] -= 1
    chosen = [i for t, members in groups.items() for i in rng.sample(members, quota[t])]
    return [(i, rows[i]) for i in sorted(chosen)]


def target_stats(splits: Splits) -> dict:
    """Distinct targets in train and eval, and eval targets training never shows (labels only)."""
    train_targets = [row.target for row in splits.train]
    eval_targets = [row.target for row in splits.eval]
    labels = is_label_set(train_targets + eval_targets)
    unseen = sorted(set(eval_targets) - set(train_targets)) if labels else []
    unseen_set = set(unseen)
    return {
        "label_set": labels,
        "train_distinct": len(set(train_targets)),
        "eval_distinct": len(set(eval_targets)),
        "eval_unseen_in_train": unseen,
        "eval_rows_unseen_in_train": sum(t in unseen_set for t in eval_targets),
    }


def load_rows(
    section: DataSection, split: str, prompt_template: str | None = None, prompt_field: str = "data.prompt"
) -> list[TaskRow]:
    splits = load_splits(section, prompt_template, prompt_field)
    return splits.train if split == "train" else splits.eval


# --- tokenization -------------------------------------------------------------------------------


def apply_chat_template_file(tokenizer, section: DataSection) -> None:
    """Use the recipe's chat template file instead of the tokenizer's own (training and evaluation alike)."""
    if section.chat_template_file is not None:
        tokenizer.chat_template = read_chat_template(Path(section.chat_template_file))


def read_chat_template(path: Path) -> str:
    """A Jinja chat template file's text, refused with its line where it does not parse."""
    import jinja2

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"data.chat_template_file: no such file {path}") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"data.chat_template_file: {path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise PipelineError(f"data.chat_template_file: {path} is empty; write the Jinja template in it")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise PipelineError(
            f"data.chat_template_file: {path}:{e.lineno}: not a valid Jinja template: {e.message}"
        ) from None
    return text


def apply_chat_template(tokenizer, messages: list[dict], row: TaskRow, **kwargs) -> str:
    """The tokenizer's apply_chat_template, as text; a template that fails on a row is named with that row."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except jinja2.TemplateError as e:  # a template's raise_exception(), an undefined filter, ...
        raise PipelineError(
            f"{row.source}: the chat template (data.chat_template_file, else the tokenizer's own) failed on this "
            f"row: {type(e).__name__}: {e}"
        ) from None


def uses_chat_template(tokenizer, setting: str) -> bool:
    return setting == "auto" and bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(row: TaskRow, chat: bool, system: str | None = None) -> list[dict] | None:
    """What a candidate is asked for this row as chat turns (the system message first, where given), or
    None where it is asked the plain prompt: without a chat template, or for format text."""
    if row.messages is None:
        if not chat or row.plain:
            return None
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": row.prompt}]
    messages = list(row.messages[:-1])
    if system and messages and messages[0]["role"] == "system":
        messages = messages[1:]
    return ([{"role": "system", "content": system}] if system else []) + messages


def prompt_text(tokenizer, row: TaskRow, chat: bool, system: str | None = None) -> tuple[str, bool]:
    """What a candidate is asked at evaluation for this row, as text, and whether the tokenizer adds its
    special tokens (BOS) to it: a plain prompt gets them, a chat-rendered one carries its own."""
    messages = prompt_messages(row, chat, system)
    if messages is None:
        return row.prompt, True
    return apply_chat_template(tokenizer, messages, row, add_generation_prompt=True), False


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
            before = apply_chat_template(tokenizer, messages[:i], row, add_generation_prompt=True)
            _extend(tokenizer, before, rendered, row, input_ids, labels, trained=False)
            rendered = before
        upto = apply_chat_template(tokenizer, messages[: i + 1], row)
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


def pack_batch(examples: list[dict[str, list[int]]], pad_id: int, capacity: int) -> dict[str, Any]:
    """One training batch with no padding to compute: its rows packed into as few sequences of at most
    max(capacity, its longest row) tokens as first-fit-decreasing finds, each row attending only to itself
    (position ids restart at 0: see pack), the sequences padded to the longest.

    The same rows as the padded batch, each computed exactly as alone, and the same labelled tokens, so
    a step learns what the padded batch's step learns (to float rounding); what it drops is the padding's
    share of every product. The capacity bounds each sequence's attention (quadratic in its length).
    """
    size = max(capacity, max(len(ex["input_ids"]) for ex in examples))
    bins: list[list[dict[str, list[int]]]] = []
    free: list[int] = []
    for ex in sorted(examples, key=lambda ex: -len(ex["input_ids"])):
        n = len(ex["input_ids"])
        target = next((i for i, room in enumerate(free) if room >= n), None)
        if target is None:
            bins.append([])
            free.append(size)
            target = len(bins) - 1
        bins[target].append(ex)
        free[target] -= n
    return pad_batch([pack(rows, size)[0] for rows in bins], pad_id)


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, Any]:
    """Pad a training batch; padded positions get no attention and no labels.

    left=True puts the padding first, so every row's answer ends at the last column and the answers of
    a batch share a few columns (the train stage computes logits there only). Position ids then count
    from each row's first real token, so the model computes exactly what it would on the row alone.
    Packed rows (with position_ids) are padded on the right with position 0 and no attention mask, so
    the padding reads as one more sequence of its own.
    """
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    packed = "position_ids" in examples[0]
    left = left and not packed

    def padded(values: list[int], filler: int) -> list[int]:
        pad = [filler] * (width - len(values))
        return pad + values if left else values + pad

    batch: dict[str, list] = {"input_ids": [], "labels": []}
    for ex in examples:
        n = len(ex["input_ids"])
        batch["input_ids"].append(padded(ex["input_ids"], pad_id))
        batch["labels"].append(padded(ex["labels"], IGNORE_INDEX))
        if packed:  # the padding continues as a sequence of its own
            batch.setdefault("position_ids", []).append(ex["position_ids"] + list(range(width - n)))
            continue
        batch.setdefault("attention_mask", []).append(padded([1] * n, 0))
        if left:
            batch.setdefault("position_ids", []).append(padded(list(range(n)), 0))
    return {key: torch.tensor(value) for key, value in batch.items()}
