"""Distill stage: the teacher (by default the evaluation reference) answers unlabelled inputs once.

The inputs are read like any data source and rendered with the teacher's prompt by the same code
evaluation uses. Answers are generated in batches (greedy; constrained token by token to a closed answer
set where the recipe gives one) and appended as each batch finishes to runs/<recipe name>/distill-answers.jsonl,
keyed by the teacher and the exact prompt: a killed run continues where it stopped, and no run of the recipe
(another min_confidence, other training settings) asks the teacher the same thing twice, while a changed
teacher or prompt asks again. The labelled rows go to
distill/labelled.jsonl (the inputs with data.columns applied, the teacher's answer in the answer field),
which the train stage reads after data.train's gold rows.

A teacher behind an OpenAI-compatible API (teacher.endpoint) is asked row by row through the endpoint
runtime, each answer appended as it arrives. An API cannot be constrained token by token: with choices, its
answers outside the set are dropped (and counted), and its confidence is the probability of the tokens it
gave (their logprobs, where the server returns them), not renormalized over the choices.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from pipeline import data, models, runtimes
from pipeline.errors import PipelineError
from pipeline.files import append_jsonl, read_jsonl_records, write_json_atomic, write_text_atomic
from pipeline.logs import log
from pipeline.processes import shared_lock
from pipeline.recipe import LoadedRecipe, Recipe, answer_identity, data_fingerprint
from pipeline.run_layout import RunLayout
from pipeline.runs import mark_done, stage_fingerprint, start_stage
from pipeline.runtimes import endpoint as endpoint_runtime
from pipeline.runtimes import transformers as transformers_runtime
from pipeline.templates import template_fields

STAGE = "distill"


def labelled_file(run_dir: Path) -> Path:
    return RunLayout(run_dir).labelled_rows


def answers_file(run_dir: Path) -> Path:
    """The teacher's answers, shared by every run of the recipe (runs/<name>/): keyed, so sharing is safe."""
    return run_dir.parent / "distill-answers.jsonl"


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str | None:
    recipe = loaded.recipe
    if recipe.distill is None:
        return None
    teacher = recipe.teacher()
    if teacher.endpoint is not None:
        weights = endpoint_runtime.Endpoint.from_recipe(teacher, teacher_field(recipe)).identity
    else:
        weights = models.resolve_model(teacher.model, "distill.teacher.model").fingerprint
    return stage_fingerprint(
        STAGE,
        recipe.distill.model_dump(),
        answer_identity(teacher.model_dump()),
        weights,
        data_fingerprint(recipe.data),
        _source_bytes_digest(recipe.distill.inputs),
        recipe.evaluate.max_new_tokens,
        recipe.evaluate.batch_size,
    )


def teacher_field(recipe: Recipe) -> str:
    """Where the recipe names the teacher: errors point there."""
    return "distill.teacher" if recipe.distill.teacher else "evaluate.reference"


def answer_field(recipe: Recipe) -> str:
    """The field of an input row the teacher's answer goes into."""
    section = recipe.data
    if section.format == "prompt_completion":
        (field,) = template_fields(section.target)
        return field
    if section.format == "alpaca":
        return "output"
    return section.messages_field


def teacher_rows(recipe: Recipe) -> list[tuple[str, dict, data.TaskRow]]:
    """(where, input row, the row as the teacher is asked it) for each input, sampled as the recipe says.

    A gold answer in the input is blanked before rendering: the teacher must not see it.
    """
    distill, section, teacher = recipe.distill, recipe.data, recipe.teacher()
    raw = data.read_source(distill.inputs, section, distill.split)
    if distill.max_inputs and distill.max_inputs < len(raw):
        picked = sorted(random.Random(section.split_seed).sample(range(len(raw)), distill.max_inputs))
        raw = [raw[i] for i in picked]
    field = answer_field(recipe)
    prompt_field = "distill.teacher.prompt" if distill.teacher else "evaluate.reference.prompt"
    rows, dropped = [], []
    for where, row in raw:
        asked = {**row, field: _blank_answer(section.format, row.get(field), where, field)}
        try:
            asked_row = data.format_row(section, asked, where, teacher.prompt, prompt_field, for_eval=True)
        except data.EmptyField as e:
            if section.empty_rows != "drop":
                raise
            dropped.append(e.where)
            continue
        rows.append((where, row, asked_row))
    if dropped:
        log(STAGE, f"{len(dropped)} inputs left out for an empty field (data.empty_rows: drop), e.g. {dropped[0]}")
    if not rows:
        raise PipelineError(f"distill.inputs: {distill.inputs} has no rows")
    return rows


def choices(recipe: Recipe) -> list[str] | None:
    setting = recipe.distill.choices
    if setting == "eval_labels":
        return sorted({row.target.strip() for row in data.load_rows(recipe.data, "eval")})
    return setting


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    recipe = loaded.recipe
    if recipe.distill is None:
        raise PipelineError(f"{loaded.path}: the recipe has no distill: section, so there is nothing to label")
    distill, teacher = recipe.distill, recipe.teacher()
    stage_dir = start_stage(RunLayout(run_dir).stage(STAGE))
    inputs = teacher_rows(recipe)
    answer_set = choices(recipe)
    answers, from_cache, peak, runtime = _teacher_answers(recipe, run_dir, [row for _, _, row in inputs], answer_set)
    field = answer_field(recipe)
    if distill.min_confidence is not None and any(a.get("confidence") is None for a in answers):
        raise PipelineError(
            "distill.min_confidence: the teacher's endpoint returned no token log-probabilities, so there is no "
            "confidence to filter on; remove min_confidence, or use a server that returns logprobs"
        )
    kept, kept_gold, dropped, outside, respelled = _kept_rows(recipe, inputs, answers, answer_set)
    if not kept:
        raise PipelineError(
            f"distill: none of the teacher's {len(answers)} answers was kept (min_confidence "
            f"{distill.min_confidence}, {outside} outside distill.choices); lower distill.min_confidence or check "
            "the teacher's prompt"
        )
    write_text_atomic(labelled_file(run_dir), "".join(json.dumps(row) + "\n" for row in kept))
    confidences = sorted(a["confidence"] for a in answers if a.get("confidence") is not None)
    gold = [(_gold_answer(row.get(field)), a["prediction"]) for (_, row, _), a in zip(inputs, answers, strict=True)]
    result = {
        "teacher": teacher.model,
        "inputs": len(inputs),
        "labelled": len(kept),
        "dropped": dropped,
        "min_confidence": distill.min_confidence,
        "choices": answer_set,
        "confidence_median": confidences[len(confidences) // 2] if confidences else None,
        "dropped_outside_choices": outside,
        "respelled_to_choices": respelled,
        # where the inputs carry gold answers (ignored for training): how often the teacher gave them, over all
        # inputs and over the rows kept for training
        "gold_answers": sum(1 for g, _ in gold if g),
        "teacher_gold_agreement": _agreement(gold),
        "kept_gold_agreement": _agreement(kept_gold),
        "teacher_seconds": sum(a["seconds"] for a in answers),
        "teacher_seconds_per_input": sum(a["seconds"] for a in answers) / len(answers),
        "teacher_generated_tokens": _total(a.get("generated_tokens") for a in answers),
        "teacher_peak_memory_bytes": peak,
        "teacher_prompt_tokens": _total(a.get("prompt_tokens") for a in answers),
        "teacher_runtime": runtime,
        "answers_from_cache": from_cache,
    }
    write_json_atomic(RunLayout(run_dir).distill_result, result)
    mark_done(stage_dir, fingerprint(loaded, run_dir))
    log(STAGE, f"{len(kept)} rows labelled, {dropped} dropped; teacher time {result['teacher_seconds']:.1f}s")
    return result


def _teacher_answers(recipe: Recipe, run_dir: Path, asked: list, answer_set: list[str] | None):
    """The teacher's answer to every input, from the shared cache where it was asked before, else asked now
    (a local model constrained to the choices, or an endpoint): (answers, how many came from the cache, the local
    teacher's peak memory, its runtime)."""
    teacher, settings = recipe.teacher(), recipe.evaluate
    endpoint = None
    if teacher.endpoint is not None:
        endpoint = endpoint_runtime.Endpoint.from_recipe(teacher, teacher_field(recipe))
        prompts = endpoint_runtime.prompts_for(asked, endpoint.chat, teacher.system)
        identity = endpoint.identity
    else:
        source = models.resolve_model(teacher.model, "distill.teacher.model")
        tokenizer = models.load_tokenizer(source)
        chat = data.uses_chat_template(tokenizer, teacher.chat_template)
        prompts = runtimes.prompts_for(tokenizer, asked, chat, teacher.system)
        identity = source.fingerprint
    teacher_key = stage_fingerprint(identity, answer_set, settings.max_new_tokens)
    keys = [hashlib.sha256(f"{teacher_key}\n{p.text}".encode()).hexdigest()[:32] for p in prompts]
    cache_path = answers_file(run_dir)
    # Every run of the recipe shares the answers: while one labels, another waits and then reads its answers,
    # so no teacher is asked the same thing twice and no append is lost.
    with shared_lock(cache_path.with_name(cache_path.name + ".lock"), "labelling with this recipe's teacher"):
        cached = _read_answers(cache_path)
        todo = [i for i, key in enumerate(keys) if key not in cached]
        log(
            STAGE,
            f"teacher {teacher.model}: {len(todo)} of {len(asked)} inputs to label ({len(asked) - len(todo)} cached)",
        )

        def keep(entry: dict) -> None:
            record = {"key": keys[entry["row"]], **{k: v for k, v in entry.items() if k != "row"}}
            append_jsonl(cache_path, [record])
            cached[record["key"]] = record

        peak = None
        if todo and endpoint is not None:
            client = endpoint_runtime.Client(endpoint)
            client.check()
            endpoint_runtime.ask_all(client, prompts, todo, settings.max_new_tokens, keep, logprobs=True)
        elif todo:
            peak = _label_locally(recipe, source, tokenizer, prompts, todo, answer_set, keep)
    runtime = "endpoint" if endpoint else "transformers"
    return [cached[key] for key in keys], len(asked) - len(todo), peak, runtime


def _kept_rows(recipe: Recipe, inputs: list, answers: list[dict], answer_set: list[str] | None):
    """The inputs with the teacher's answer as their target, less those the recipe's filters drop:
    (kept rows, (gold, label) of each kept row, dropped, dropped outside the choices, respelled to a choice)."""
    distill, field = recipe.distill, answer_field(recipe)
    kept, kept_gold, dropped, outside, respelled = [], [], 0, 0, 0
    for (_, row, _), answer in zip(inputs, answers, strict=True):
        if distill.min_confidence is not None and answer["confidence"] < distill.min_confidence:
            dropped += 1
            continue
        if not answer["prediction"]:
            dropped += 1  # an empty answer teaches nothing
            continue
        label = answer["prediction"]
        if answer_set and label not in answer_set:
            # An API cannot be constrained token by token: an answer that is a choice but for case, quotes or a
            # final period is that choice; any other answer outside the set is left out.
            label = as_choice(label, answer_set)
            if label is None:
                dropped += 1
                outside += 1
                continue
            respelled += 1
        kept_gold.append((_gold_answer(row.get(field)), label))
        kept.append({**row, field: _filled_answer(recipe.data.format, row.get(field), label)})
    return kept, kept_gold, dropped, outside, respelled


def as_choice(answer: str, answer_set: list[str]) -> str | None:
    """The one choice an answer spells loosely (case, surrounding quotes or backticks, a final period), or None."""

    def loose(text: str) -> str:
        return text.strip().strip("`'\".").strip().lower()

    matches = [choice for choice in answer_set if loose(choice) == loose(answer)]
    return matches[0] if len(matches) == 1 else None


def _label_locally(recipe: Recipe, source, tokenizer, prompts, todo, answer_set, keep) -> int:
    """The teacher through the transformers runtime (a process of its own), constrained to the answer set
    where there is one; returns its peak memory."""
    settings = recipe.evaluate
    dtype = models.compute_dtype(recipe.model.dtype)
    trie = AnswerTrie.for_choices(tokenizer, answer_set) if answer_set else None
    job = runtimes.GenerationJob(
        prompts=prompts,
        todo=todo,
        latency_rows=[],
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        threads=settings.threads or torch.get_num_threads(),
        confidence=True,
    )

    def keep_batch(batch: list[dict]) -> None:
        for entry in batch:
            keep(entry)

    facts = transformers_runtime.run(
        source,
        None,
        dtype,
        False,
        tokenizer,
        job,
        keep_batch,
        "teacher",
        allowed_tokens=trie.allowed if trie else None,
    )
    return facts["peak_memory_bytes"]


def _total(values) -> int | None:
    values = list(values)
    return None if None in values else sum(values)


class AnswerTrie:
    """The token sequences of a closed answer set, for decoding that can only produce one of them.

    Each answer is tokenized as it follows a prompt, with and without a leading space, and ends with the
    end token; at every step the teacher may only continue some answer's sequence.
    """

    def __init__(self, sequences: list[list[int]], finished: list[int]):
        self.finished = finished  # what a row that has ended may still emit (generate pads finished rows)
        self.root: dict = {}
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(token, {})

    @classmethod
    def for_choices(cls, tokenizer, answers: list[str]) -> AnswerTrie:
        end = tokenizer.eos_token_id
        sequences = []
        for answer in answers:
            for text in (answer, " " + answer):
                sequences.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [end])
        return cls(sequences, sorted({end, tokenizer.pad_token_id}))

    def allowed(self, generated: list[int]) -> list[int]:
        node = self.root
        for token in generated:
            node = node.get(token)
            if node is None:  # past the end of an answer
                return self.finished
        return list(node) or self.finished


UNLABELLED = "(unlabelled)"  # stands in for the answer the teacher must not see; never part of its prompt


def _blank_answer(format: str, value, where: str, field: str):
    if format == "messages":
        if not isinstance(value, list) or not value:
            raise PipelineError(f"{where}: column {field!r} must be a non-empty list of {{role, content}} turns")
        turns = value[:-1] if isinstance(value[-1], dict) and value[-1].get("role") == "assistant" else value
        return [*turns, {"role": "assistant", "content": UNLABELLED}]
    return UNLABELLED


def _filled_answer(format: str, value, answer: str):
    if format == "messages":
        turns = value[:-1] if value and value[-1].get("role") == "assistant" else value
        return [*turns, {"role": "assistant", "content": answer}]
    return answer


def _agreement(pairs: list[tuple[str | None, str]]) -> float | None:
    scored = [gold == answer for gold, answer in pairs if gold]
    return sum(scored) / len(scored) if scored else None


def _gold_answer(value) -> str | None:
    if isinstance(value, list):  # messages: the last assistant turn, if the conversation has one
        last = value[-1] if value and isinstance(value[-1], dict) else {}
        value = last.get("content") if last.get("role") == "assistant" else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _read_answers(path: Path) -> dict[str, dict]:
    """Answers of earlier (maybe killed) runs by key."""
    return {record["key"]: record for record in read_jsonl_records(path) if "key" in record}


def _source_bytes_digest(source: str) -> str:
    if source.startswith("hub:") or not Path(source).is_file():
        return source
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()
