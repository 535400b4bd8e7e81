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

from pipeline import data, teacher
from pipeline.errors import PipelineError
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.logs import log
from pipeline.recipe import LoadedRecipe, Recipe, answer_identity, data_fingerprint
from pipeline.run_layout import RunLayout
from pipeline.runs import mark_done, stage_fingerprint, start_stage

STAGE = "distill"


def labelled_file(run_dir: Path) -> Path:
    return RunLayout(run_dir).labelled_rows


def answers_file(run_dir: Path) -> Path:
    """The teacher's answers, shared by every run of the recipe (runs/<name>/): keyed, so sharing is safe."""
    return run_dir.parent / "distill-answers.jsonl"


def the_teacher(recipe: Recipe) -> teacher.Teacher:
    return teacher.Teacher(recipe.teacher(), teacher_field(recipe), recipe.evaluate, recipe.model.dtype, STAGE)


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str | None:
    recipe = loaded.recipe
    if recipe.distill is None:
        return None
    return stage_fingerprint(
        STAGE,
        recipe.distill.model_dump(),
        answer_identity(recipe.teacher().model_dump()),
        the_teacher(recipe).identity(),
        data_fingerprint(recipe.data),
        _source_bytes_digest(recipe.distill.inputs),
        recipe.evaluate.max_new_tokens,
        recipe.evaluate.batch_size,
    )


def teacher_field(recipe: Recipe) -> str:
    """Where the recipe names the teacher: errors point there."""
    return "distill.teacher" if recipe.distill.teacher else "evaluate.reference"


def teacher_rows(recipe: Recipe) -> list[tuple[str, dict, data.TaskRow]]:
    """(where, input row, the row as the teacher is asked it) for each input, sampled as the recipe says.

    A gold answer in the input is blanked before rendering: the teacher must not see it.
    """
    distill, section, asked_with = recipe.distill, recipe.data, recipe.teacher()
    raw = data.read_source(distill.inputs, section, distill.split)
    if distill.max_inputs and distill.max_inputs < len(raw):
        picked = sorted(random.Random(section.split_seed).sample(range(len(raw)), distill.max_inputs))
        raw = [raw[i] for i in picked]
    field = teacher.answer_field(recipe.data)
    prompt_field = "distill.teacher.prompt" if distill.teacher else "evaluate.reference.prompt"
    rows, dropped = [], []
    for where, row in raw:
        asked = {**row, field: teacher.blank_answer(section.format, row.get(field), where, field)}
        try:
            asked_row = data.format_row(section, asked, where, asked_with.prompt, prompt_field, for_eval=True)
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
    distill = recipe.distill
    stage_dir = start_stage(RunLayout(run_dir).stage(STAGE))
    inputs = teacher_rows(recipe)
    answer_set = choices(recipe)
    asker = the_teacher(recipe)
    asked = teacher.ask(asker, [row for _, _, row in inputs], answers_file(run_dir), recipe.evaluate.max_new_tokens,
                        answer_set, what="inputs to label")  # fmt: skip
    answers, from_cache, peak, runtime = asked.answers, asked.from_cache, asked.peak_memory_bytes, asked.runtime
    field = teacher.answer_field(recipe.data)
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
        "teacher": asker.section.model,
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
        "teacher_generated_tokens": teacher.total(a.get("generated_tokens") for a in answers),
        "teacher_peak_memory_bytes": peak,
        "teacher_prompt_tokens": teacher.total(a.get("prompt_tokens") for a in answers),
        "teacher_runtime": runtime,
        "answers_from_cache": from_cache,
    }
    write_json_atomic(RunLayout(run_dir).distill_result, result)
    mark_done(stage_dir, fingerprint(loaded, run_dir))
    log(STAGE, f"{len(kept)} rows labelled, {dropped} dropped; teacher time {result['teacher_seconds']:.1f}s")
    return result


def _kept_rows(recipe: Recipe, inputs: list, answers: list[dict], answer_set: list[str] | None):
    """The inputs with the teacher's answer as their target, less those the recipe's filters drop:
    (kept rows, (gold, label) of each kept row, dropped, dropped outside the choices, respelled to a choice)."""
    distill, field = recipe.distill, teacher.answer_field(recipe.data)
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
            label = teacher.as_choice(label, answer_set)
            if label is None:
                dropped += 1
                outside += 1
                continue
            respelled += 1
        kept_gold.append((_gold_answer(row.get(field)), label))
        kept.append({**row, field: teacher.filled_answer(recipe.data.format, row.get(field), label)})
    return kept, kept_gold, dropped, outside, respelled


def _agreement(pairs: list[tuple[str | None, str]]) -> float | None:
    scored = [gold == answer for gold, answer in pairs if gold]
    return sum(scored) / len(scored) if scored else None


def _gold_answer(value) -> str | None:
    if isinstance(value, list):  # messages: the last assistant turn, if the conversation has one
        last = value[-1] if value and isinstance(value[-1], dict) else {}
        value = last.get("content") if last.get("role") == "assistant" else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _source_bytes_digest(source: str) -> str:
    if source.startswith("hub:") or not Path(source).is_file():
        return source
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()
