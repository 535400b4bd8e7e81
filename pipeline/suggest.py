"""`specialist suggest`: which unlabelled inputs are most worth labelling next, for a finished run's specialist.

The inputs (any source the data stage reads, in data.format with data.columns applied) are answered by the run's
specialist, with its probability of each answer, and, where the recipe has a reference, by that reference (the
teacher: its own prompt, through the runtime the evaluation runs it in). Inputs already among the training,
validation or eval rows are left out. The ranking, as the output says per row:
  1. the specialist and the teacher disagree (the teacher's answer is a label; on a label task a teacher's answer
     outside the set does not count as disagreeing), least confident first;
  2. then the rest, least confident first; where the run has a cascade, rows below its threshold are those it
     would defer to the reference, and say so.
Taken in that order in turn across the teacher's answers (its label; the specialist's where there is no teacher):
the best of each label, then the second of each, so K suggestions are not K rows of one confusable label. Each is
skipped when its embedding (the synthesize checks' encoder) is within `near` cosine similarity of a row already
picked, so K suggestions are K different requests, not K near-copies of one.

The answers are cached in the run folder's suggest/ (the specialist's, as the evaluation caches them) and in
runs/<name>/suggest-answers.jsonl (the teacher's): a second call with another K or `near` asks nothing again.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import data, teacher
from pipeline.embeddings import Encoder
from pipeline.errors import PipelineError
from pipeline.files import write_jsonl_atomic
from pipeline.logs import log
from pipeline.recipe import LoadedRecipe
from pipeline.row_checks import normalized, unit_rows
from pipeline.run_layout import RunLayout
from pipeline.runs import stage_done
from pipeline.stages import evaluate

DEFAULT_ENCODER = "packaged:all-minilm-l6-v2"


def suggest(
    loaded: LoadedRecipe,
    run_dir: Path,
    inputs: str,
    k: int,
    out: Path | None = None,
    near: float = 0.9,
    split: str = "train",
    ask_teacher: bool = True,
) -> dict:
    """Write the K inputs most worth labelling to `out` (default: the run's suggest/suggestions.jsonl); returns
    {"out", "inputs", "suggested", "disagreeing", "deferred"}."""
    recipe, section = loaded.recipe, loaded.recipe.data
    if stage_done(run_dir, "train") is None:
        raise PipelineError(f"{run_dir}: no trained specialist; run `specialist run {loaded.path}` first")
    field = teacher.answer_field(section)
    splits = data.load_splits(section)  # read once: the inputs already labelled, and the label set
    known = {normalized(row.input_text()) for row in [*splits.train, *splits.validation, *splits.eval]}
    candidates, seen = [], set()
    for where, row in data.read_source(inputs, section, split):
        asked = {**row, field: teacher.blank_answer(section.format, row.get(field), where, field)}
        task_row = data.format_row(section, asked, where, for_eval=True)
        key = normalized(task_row.input_text())
        if key in known or key in seen:  # labelled already, or asked twice in the inputs
            continue
        seen.add(key)
        candidates.append((where, row, asked, task_row))
    if not candidates:
        raise PipelineError(f"suggest: {inputs} has no input that is not already a training, validation or eval row")
    folder = RunLayout(run_dir).suggest
    specialist = evaluate.specialist_answers(loaded, run_dir, [c[3] for c in candidates], folder)
    labels = _label_set(splits)
    teacher_answers = [None] * len(candidates)
    reference = recipe.evaluate.reference
    if ask_teacher and reference is not None:
        asker = teacher.Teacher(reference, "evaluate.reference", recipe.evaluate, recipe.model.dtype, "suggest")
        rows = [
            data.format_row(section, asked, where, reference.prompt, "evaluate.reference.prompt", True)
            for where, _, asked, _ in candidates
        ]
        answers = teacher.ask(
            asker, rows, run_dir.parent / "suggest-answers.jsonl", recipe.evaluate.max_new_tokens, what="inputs"
        )
        teacher_answers = [
            _as_label(a["prediction"], labels) if labels else a["prediction"].strip() for a in answers.answers
        ]
    threshold = _cascade_threshold(run_dir)
    ranked = []
    for i, (answer, told) in enumerate(zip(specialist, teacher_answers, strict=True)):
        confidence = answer.get("confidence")
        disagree = told is not None and told != answer["prediction"].strip()
        deferred = threshold is not None and confidence is not None and confidence < threshold
        why = (
            "the specialist and the teacher disagree"
            if disagree
            else "the cascade would defer it to the reference"
            if deferred
            else "the specialist is unsure"
        )
        order = (0 if disagree else 1, confidence if confidence is not None else 0.0)
        ranked.append((order, i, why, deferred))
    ranked.sort()
    # in turn across the answers the teacher (else the specialist) gives: K rows of one confusable label teach less
    # than the same K spread over the labels (on the demo's round: 0.855 with the turns, 0.815 without, 200 test rows)
    group = [told if told is not None else answer["prediction"].strip()
             for answer, told in zip(specialist, teacher_answers, strict=True)]  # fmt: skip
    order = _in_turn([r[1] for r in ranked], group)
    picked = _spread([c[3].input_text() for c in candidates], order, k, near)
    by_row = {r[1]: r for r in ranked}
    lines = []
    for rank, i in enumerate(picked, 1):
        where, row, _, _ = candidates[i]
        _, _, why, deferred = by_row[i]
        blank = {**row, field: _unanswered(section.format, row.get(field))}
        lines.append(
            {
                **blank,
                "_suggested": {
                    "rank": rank,
                    "why": why,
                    "source": where,
                    "specialist": specialist[i]["prediction"].strip(),
                    "confidence": specialist[i].get("confidence"),
                    "teacher": teacher_answers[i],
                    "deferred": deferred,
                },
            }
        )
    out = out or folder / "suggestions.jsonl"
    write_jsonl_atomic(out, lines)
    disagreeing = sum(1 for line in lines if line["_suggested"]["why"].startswith("the specialist and"))
    log("suggest", f"{len(lines)} of {len(candidates)} inputs to label next in {out} ({disagreeing} disagreeing)")
    return {
        "out": str(out),
        "inputs": len(candidates),
        "suggested": len(lines),
        "disagreeing": disagreeing,
        "deferred": sum(1 for line in lines if line["_suggested"]["deferred"]),
    }


def _unanswered(format: str, value):
    """The answer a person fills in: empty (a conversation: its turns up to the answer)."""
    if format == "messages" and isinstance(value, list):
        return value[:-1] if value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant" else value
    return None


def _label_set(splits: data.Splits) -> list[str] | None:
    """The answers of the training rows where they form a label set (a closed task), else None."""
    targets = [row.target.strip() for row in splits.train]
    return sorted(set(targets)) if targets and data.is_label_set(targets) else None


def _as_label(answer: str, labels: list[str]) -> str | None:
    answer = answer.strip()
    return answer if answer in labels else teacher.as_choice(answer, labels)


def _cascade_threshold(run_dir: Path) -> float | None:
    path = RunLayout(run_dir).cascade_result
    if not path.is_file():
        return None
    return (json.loads(path.read_text())["candidates"].get("specialized") or {}).get("threshold")


def _in_turn(order: list[int], group: list[str]) -> list[int]:
    """`order` regrouped: the first of each group (groups in the order of their first row), then the second of
    each, and so on; within a group the order is kept."""
    queues: dict[str, list[int]] = {}
    for i in order:
        queues.setdefault(group[i], []).append(i)
    taken = []
    for turn in range(max((len(q) for q in queues.values()), default=0)):
        taken += [q[turn] for q in queues.values() if turn < len(q)]
    return taken


def _spread(texts: list[str], order: list[int], k: int, near: float) -> list[int]:
    """The first k of `order` whose embedding is below `near` cosine similarity to every one picked before."""
    vectors = unit_rows(Encoder(DEFAULT_ENCODER, "suggest --near").embed(texts)) if near < 1 else None
    picked: list[int] = []
    for i in order:
        if len(picked) == k:
            break
        if vectors is not None and picked and float((vectors[picked] @ vectors[i]).max()) >= near:
            continue
        picked.append(i)
    return picked
