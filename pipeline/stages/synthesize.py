"""Synthesize stage: the teacher writes new training rows for a label task from a description and a few seed rows.

In order, each step cached (pipeline.teacher) so a killed run continues and a rerun asks nothing again:
1. The teacher is scored first: it labels the gold rows the user has (the validation rows, else the seed rows)
   with its own prompt, constrained to the label set; below synthesize.min_teacher_score nothing is written.
2. Asks: per label, enough asks for synthesize.per_label rows, each showing the task's description, the labels,
   a few seed rows of that label (a seeded sample) and a variation (who writes, tone, length...), sampled from
   its own seed. The teacher's reply is split into one input per line.
3. Checks (pipeline.row_checks): empty rows, exact and near duplicates (cosine similarity of a small encoder's
   embeddings) among the new rows and against the seeds, and contamination (equal or near-equal to an eval or
   validation row: training on it would inflate the very score the report is judged by).
4. The label check: the teacher labels each kept row again, blind to the label it was asked for, constrained to
   the label set; a row whose label differs is dropped, relabelled, or kept, as synthesize.label_check says.

What it writes: synthesize/rows.jsonl (the kept rows, in the data's own columns: the train stage reads them after
data.train's gold rows), synthesize/candidates.jsonl (every row the teacher wrote, what it was asked and its
verdict) and synthesize/result.json (counts by reason with examples, agreement per label, balance, lengths,
diversity, the teacher's score and what it cost), which the report shows.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline import data, row_checks, stats, teacher
from pipeline.embeddings import Encoder
from pipeline.errors import GateFailed, PipelineError
from pipeline.files import write_json_atomic, write_jsonl_atomic
from pipeline.logs import log
from pipeline.metrics import scorer
from pipeline.recipe import LoadedRecipe, Recipe, answer_identity, data_fingerprint, load_recipe
from pipeline.run_layout import RunLayout
from pipeline.runs import mark_done, stage_fingerprint, start_stage
from pipeline.runtimes import Sampling
from pipeline.templates import template_fields

STAGE = "synthesize"
EXAMPLES_PER_REASON = 3  # dropped rows shown per reason in the result and the report
SAMPLE_PER_LABEL = 3  # kept rows shown per label


def answers_file(run_dir: Path) -> Path:
    """The teacher's answers, shared by every run of the recipe (runs/<name>/): keyed, so sharing is safe."""
    return run_dir.parent / "synthesize-answers.jsonl"


def teacher_field(recipe: Recipe) -> str:
    return "synthesize.teacher" if recipe.synthesize.teacher else "evaluate.reference"


def the_teacher(recipe: Recipe) -> teacher.Teacher:
    section = recipe.synthesize.teacher or recipe.evaluate.reference
    return teacher.Teacher(section, teacher_field(recipe), recipe.evaluate, recipe.model.dtype, STAGE)


def seed_only(loaded: LoadedRecipe) -> LoadedRecipe | None:
    """The same recipe without synthesize: (the seed rows alone), where synthesize.seed_only asks for it."""
    if loaded.recipe.synthesize is None or not loaded.recipe.synthesize.seed_only:
        return None
    # an ordinary run beside this one: no curve of its own (a curve over the teacher's rows starts at it)
    return load_recipe(loaded.path, list(loaded.overrides), assign={"synthesize": None, "learning_curve": None})


def seed_only_run(loaded: LoadedRecipe, run_dir: Path) -> Path | None:
    """The seed-only sibling's run folder, beside this run's (runs/<name>/<its id>)."""
    sibling = seed_only(loaded)
    return None if sibling is None else run_dir.parent / sibling.run_id


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str | None:
    recipe = loaded.recipe
    if recipe.synthesize is None:
        return None
    asker = the_teacher(recipe)
    return stage_fingerprint(
        STAGE,
        recipe.synthesize.model_dump(exclude={"seed_only"}),
        answer_identity(asker.section.model_dump()),
        asker.identity(),
        data_fingerprint(recipe.data),
        recipe.evaluate.max_new_tokens,
    )


@dataclass(frozen=True)
class Seed:
    text: str  # the input as the teacher is shown it (the prompt's field, or the last user turn)
    label: str  # the answer as its column holds it (stripped; messages: the assistant's turn): what the checks compare
    source: str


@dataclass(frozen=True)
class Task:
    seeds: list[Seed]  # the training rows (the teacher sees a few per label)
    validation: list[Seed]  # the rows the teacher is scored on first, when there are any
    held_out: list[str]  # eval and validation inputs: no new row may equal or nearly equal one
    labels: list[str]
    input_field: str | None  # prompt_completion: the column the teacher's text goes into
    answer_field: str  # the column (or the messages field) the label goes into
    label_values: dict[str, str]  # label -> the value its column holds
    answers: str = "labels"  # labels | json | text: what the seed answers are (json and text: the teacher answers)
    json_keys: tuple[str, ...] = ()  # json: the keys every seed answer has, which a new answer must have
    json_column: bool = False  # json: the answer column holds the object itself (not a string of JSON)

    @property
    def answered(self) -> bool:
        """The teacher writes inputs and then answers them (a task whose answers are not labels)."""
        return self.answers != "labels"


def task(recipe: Recipe) -> Task:
    """The seed rows, the held-out inputs and the label set, read as the train stage reads the data."""
    section, synth = recipe.data, recipe.synthesize
    splits = data.load_splits(section)
    raw = {}
    validation_file = section.validation if isinstance(section.validation, str) else None
    for split, source in (("train", section.train), ("eval", section.eval), ("validation", validation_file)):
        if source is not None:
            raw.update(dict(data.read_source(source, section, split)))
    input_field = None
    if section.format == "prompt_completion":
        (input_field,) = template_fields(section.prompt)
    answer_field = teacher.answer_field(section)

    def seed(row: data.TaskRow) -> Seed:
        if input_field is None:  # messages: the last user turn, and the assistant's answer
            return Seed(row.input_text(), row.target.strip(), row.source)
        value = raw[row.source][answer_field]
        answer = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value).strip()
        return Seed(str(raw[row.source][input_field]), answer, row.source)

    seeds = [seed(row) for row in splits.train]
    validation = [seed(row) for row in splits.validation]
    held_out = [seed(row).text for row in splits.eval] + [s.text for s in validation]
    values = {}
    for row, s in zip(splits.train, seeds, strict=True):  # the value as the data holds it (its spacing kept)
        values.setdefault(s.label, str(raw[row.source][answer_field]) if input_field else row.target)
    answers = "labels" if synth.labels is not None else answer_kind(section, [s.label for s in seeds])
    if answers != "labels":  # the teacher writes inputs, then answers each: no label set
        objects = [json.loads(s.label) for s in seeds] if answers == "json" else []
        dicts = bool(objects) and all(isinstance(o, dict) for o in objects)
        keys = tuple(sorted(set.intersection(*(set(o) for o in objects)))) if dicts else ()
        first = raw[splits.train[0].source] if seeds and input_field is not None else {}
        column = isinstance(first.get(answer_field), dict | list)  # the rows hold the object, not a string of it
        return Task(seeds, validation, held_out, [], input_field, answer_field, {}, answers, keys, column)
    labels = synth.labels or sorted(values)
    for label in labels:
        values.setdefault(label, label)  # a label without seed rows is written as listed
    return Task(seeds, validation, held_out, labels, input_field, answer_field, values)


FREE_TEXT_WORDS = 6  # seed answers longer than this (median, in words) are free text, not labels


def answer_kind(section, answers: list[str]) -> str:
    """labels, json (every seed answer is a JSON object or list) or text (a median answer over FREE_TEXT_WORDS
    words); answers that are partly JSON are refused: the teacher's answers could not be checked against them."""
    structured = sum(1 for a in answers if a[:1] in "{[" and _is_json(a))
    if structured and structured < len(answers):
        raise PipelineError(
            f"synthesize: {structured} of the {len(answers)} seed rows' answers in {section.train} are JSON and the "
            "others are not; make every answer a JSON object (a JSON task) or none (a label task)"
        )
    if structured:
        return "json"
    words = statistics.median(len(a.split()) for a in answers) if answers else 0
    return "text" if words > FREE_TEXT_WORDS else "labels"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    recipe = loaded.recipe
    if recipe.synthesize is None:
        raise PipelineError(f"{loaded.path}: the recipe has no synthesize: section, so there is nothing to write")
    synth, layout = recipe.synthesize, RunLayout(run_dir)
    stage_dir = start_stage(layout.stage(STAGE))
    the_task = task(recipe)
    asker = the_teacher(recipe)
    cache = answers_file(run_dir)
    scoring_of = _score_answers if the_task.answered else _score_teacher
    score, scoring = scoring_of(recipe, asker, the_task, cache)
    if synth.min_teacher_score is not None and score["accuracy"] < synth.min_teacher_score:
        raise GateFailed(
            f"synthesize.min_teacher_score: the teacher ({asker.section.model}) "
            + (
                f"scores {score['metric']} {score['accuracy']:.3f} on the {score['rows']} {score['on']} rows"
                if score.get("metric")
                else f"labels {score['accuracy']:.3f} of the {score['rows']} {score['on']} rows right"
            )
            + f", below {synth.min_teacher_score}; a teacher that gets the "
            "task wrong writes wrong rows. Use a stronger teacher, improve its prompt (synthesize.teacher.prompt), "
            "or lower the bar"
        )
    proposed, proposing = _proposed_variations(recipe, asker, the_task, cache)
    asks = plan_asks(recipe, the_task, [*synth.variations, *(v for v in proposed if v not in synth.variations)])
    prompts = [data.TaskRow(target="", source=f"synthesize ask {i}", prompt=a["prompt"]) for i, a in enumerate(asks)]
    sampling = Sampling(synth.temperature, synth.top_p, [a["seed"] for a in asks])
    written = teacher.ask(asker, prompts, cache, synth.max_new_tokens, sampling=sampling, what="asks to write rows")
    candidates = []
    for number, (ask, answer) in enumerate(zip(asks, written.answers, strict=True)):
        for text in parse_reply(answer["prediction"], synth.rows_per_ask):
            entry = {"text": text, "label": ask["label"], "ask": number, "variation": ask["variation"]}
            candidates.append({**entry, "seed": ask["seed"], "examples": ask["examples"]})
    log(STAGE, f"{len(candidates)} rows written in {len(asks)} asks; checking them")
    encoder = Encoder(synth.encoder, "synthesize.encoder") if synth.near_duplicate is not None else None
    embed = encoder.embed if encoder else None
    texts = [c["text"] for c in candidates]
    seed_texts = [s.text for s in the_task.seeds]
    verdicts = row_checks.check_rows(texts, seed_texts, the_task.held_out, embed, synth.near_duplicate)
    checking_of = _answer_rows if the_task.answered else _label_check
    checked, checking = checking_of(recipe, asker, the_task, cache, candidates, verdicts)
    kept = [candidates[i] for i in verdicts.kept]
    for i, candidate in enumerate(candidates):
        candidate["verdict"] = verdicts.dropped.get(i, {"reason": "kept"})
    layout_rows = [_training_row(recipe, the_task, c["text"], c["label"]) for c in kept]
    write_jsonl_atomic(layout.synthesized_rows, layout_rows)
    write_jsonl_atomic(layout.synthesize_candidates, candidates)
    result = _result(recipe, the_task, asker, asks, candidates, kept, verdicts, score, checked, embed)
    result["proposed_variations"] = proposed
    result["teacher_cost"] = {"scoring": _cost(scoring), "writing": _cost(written), "label_check": _cost(checking)}
    if proposing is not None:
        result["teacher_cost"]["proposing"] = _cost(proposing)
    result["teacher_runtime"] = written.runtime
    write_json_atomic(layout.synthesize_result, result)
    mark_done(stage_dir, fingerprint(loaded, run_dir))
    log(STAGE, f"{len(kept)} of {len(candidates)} rows kept; dropped: {verdicts.counts() or 'none'}")
    return result


def _proposed_variations(recipe: Recipe, asker, the_task: Task, cache: Path) -> tuple[list[str], object | None]:
    """synthesize.propose_variations: the ways the task's inputs vary, as the teacher sees them (one ask, sampled
    from the recipe's seed, cached like every answer), each an instruction like the listed variations."""
    synth = recipe.synthesize
    if not synth.propose_variations:
        return [], None
    rng = random.Random(f"{synth.seed}\npropose")
    shown = rng.sample(the_task.seeds, min(len(the_task.seeds), max(synth.examples_per_ask, 1) * 3))
    prompt = data.render(
        synth.propose_prompt,
        {
            "description": synth.description.strip(),
            "labels": ", ".join(the_task.labels),
            "count": str(synth.propose_variations),
            "examples": "\n".join(f"- {s.text}" for s in shown) or "(none given)",
        },
        "synthesize.propose_prompt",
        "synthesize.propose_prompt",
    )
    row = data.TaskRow(target="", source="synthesize: propose variations", prompt=prompt)
    sampling = Sampling(synth.temperature, synth.top_p, [rng.randrange(2**31)])
    asked = teacher.ask(asker, [row], cache, synth.max_new_tokens, sampling=sampling, what="ask to propose variations")
    proposed = list(dict.fromkeys(parse_reply(asked.answers[0]["prediction"], synth.propose_variations)))
    log(STAGE, f"the teacher proposed {len(proposed)} variations: " + " | ".join(proposed))
    return proposed, asked


def plan_asks(recipe: Recipe, the_task: Task, variations: list[str] | None = None) -> list[dict]:
    """Every ask, seeded: per label, ceil(per_label / rows_per_ask) asks, each with its variation (of `variations`,
    default synthesize.variations), its sample of that label's seed rows, and the seed its reply is sampled from."""
    synth = recipe.synthesize
    variations = synth.variations if variations is None else variations
    if the_task.answered:
        return _input_asks(recipe, the_task, variations)
    by_label: dict[str, list[Seed]] = {}
    for s in the_task.seeds:
        by_label.setdefault(s.label, []).append(s)
    asks = []
    for label in the_task.labels:
        for k in range(math.ceil(synth.per_label / synth.rows_per_ask)):
            rng = random.Random(f"{synth.seed}\n{label}\n{k}")
            pool = by_label.get(label, [])
            shown = rng.sample(pool, min(synth.examples_per_ask, len(pool)))
            variation = rng.choice(variations) if variations else ""
            count = min(synth.rows_per_ask, synth.per_label - k * synth.rows_per_ask)
            prompt = data.render(
                synth.prompt,
                {
                    "description": synth.description.strip(),
                    "labels": ", ".join(the_task.labels),
                    "label": label,
                    "count": str(count),
                    "variation": variation,
                    "examples": "\n".join(f"- {s.text}" for s in shown) or "(none given)",
                },
                "synthesize.prompt",
                "synthesize.prompt",
            )
            seed = rng.randrange(2**31)
            asks.append({"label": label, "variation": variation, "examples": [s.source for s in shown],
                         "seed": seed, "prompt": prompt, "count": count})  # fmt: skip
    return asks


def _input_asks(recipe: Recipe, the_task: Task, variations: list[str]) -> list[dict]:
    """A task whose answers are not labels: ceil(rows / rows_per_ask) asks for new inputs, each with its variation,
    a seeded sample of the seed inputs, and its seed; the teacher answers the kept inputs afterwards."""
    synth = recipe.synthesize
    asks = []
    for k in range(math.ceil(synth.rows / synth.rows_per_ask)):
        rng = random.Random(f"{synth.seed}\ninputs\n{k}")
        shown = rng.sample(the_task.seeds, min(synth.examples_per_ask, len(the_task.seeds)))
        variation = rng.choice(variations) if variations else ""
        count = min(synth.rows_per_ask, synth.rows - k * synth.rows_per_ask)
        prompt = data.render(
            synth.inputs_prompt,
            {
                "description": synth.description.strip(),
                "count": str(count),
                "variation": variation,
                "examples": "\n".join(f"- {s.text}" for s in shown) or "(none given)",
            },
            "synthesize.inputs_prompt",
            "synthesize.inputs_prompt",
        )
        asks.append({"label": None, "variation": variation, "examples": [s.source for s in shown],
                     "seed": rng.randrange(2**31), "prompt": prompt, "count": count})  # fmt: skip
    return asks


NUMBERED = re.compile(r"^\s*(?:\d+[.):]|[-*\u2022])\s+")
EMPHASIS = re.compile(r"^(?:\*\*|__|\*|_)(.+?)(?:\*\*|__|\*|_)$")  # a whole row in Markdown bold or italics
QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}


def parse_reply(reply: str, limit: int) -> list[str]:
    """The rows in a teacher's reply: its numbered (or bulleted) lines where it numbered them, else every
    non-empty line; numbering, Markdown emphasis and surrounding quotes removed; a line without a letter (a stray
    number, a separator) or a code fence is not a row. At most `limit`."""
    lines = [line for line in reply.splitlines() if line.strip() and not line.lstrip().startswith("```")]
    numbered = [line for line in lines if NUMBERED.match(line)]
    rows = []
    for line in numbered or lines:
        text = NUMBERED.sub("", line).strip()
        for _ in range(2):  # **"quoted"** or "**bold**"
            text = EMPHASIS.sub(r"\1", text).strip()
            if len(text) >= 2 and text[0] in QUOTES and text[-1] == QUOTES[text[0]]:
                text = text[1:-1].strip()
        if any(ch.isalpha() for ch in text):
            rows.append(text)
    return rows[:limit]


def _score_teacher(recipe: Recipe, asker: teacher.Teacher, the_task: Task, cache: Path) -> dict:
    """The teacher's accuracy on the gold rows the user has, before it writes anything: the validation rows,
    else the seed rows (it is shown a few of those while writing, but is scored here without them)."""
    on, gold = ("validation", the_task.validation) if the_task.validation else ("seed", the_task.seeds)
    answers, asked = _labels_of(recipe, asker, the_task, cache, [s.text for s in gold])
    right = [answer == s.label for answer, s in zip(answers, gold, strict=True)]
    low, high = stats.bootstrap_ci([float(r) for r in right], recipe.evaluate.bootstrap_samples)
    log(STAGE, f"the teacher labels {sum(right)} of {len(right)} {on} rows right before writing any")
    score = {"on": on, "rows": len(right), "accuracy": sum(right) / len(right), "interval": [low, high]}
    return score, asked


def _labels_of(recipe: Recipe, asker: teacher.Teacher, the_task: Task, cache: Path, texts: list[str]):
    """The teacher's label for each input text, asked with its own prompt and constrained to the label set
    (an API's answer respelled to a label where it spells one loosely; None where it names none)."""
    rows = _asking_rows(recipe, asker, the_task, texts)
    asked = teacher.ask(asker, rows, cache, recipe.evaluate.max_new_tokens, the_task.labels, what="rows to label")
    labels = [
        a["prediction"] if a["prediction"] in the_task.labels else teacher.as_choice(a["prediction"], the_task.labels)
        for a in asked.answers
    ]
    return labels, asked


def _score_answers(recipe: Recipe, asker: teacher.Teacher, the_task: Task, cache: Path) -> dict:
    """A task whose answers are not labels: the teacher answers the gold rows' inputs with its own prompt, scored
    with the gating metric (e.g. json_match) against their answers, before it writes anything."""
    on, gold = ("validation", the_task.validation) if the_task.validation else ("seed", the_task.seeds)
    answers, asked = _answers_of(recipe, asker, the_task, cache, [s.text for s in gold])
    answers = [_checked_answer(the_task, a)[0] or a for a in answers]  # as a kept row would hold it (JSON found)
    metric, settings = recipe.evaluate.metrics[0], recipe.evaluate
    scored = scorer(metric)(answers, [s.label for s in gold], settings.ignore_case)
    per_row = [float(v) for v in scored["per_row"] if v is not None]
    low, high = stats.bootstrap_ci(per_row, settings.bootstrap_samples)
    log(STAGE, f"the teacher scores {metric} {scored['value']:.3f} on the {len(gold)} {on} rows before writing any")
    score = {"on": on, "rows": len(gold), "metric": metric, "accuracy": scored["value"], "interval": [low, high]}
    return score, asked


def _answers_of(recipe: Recipe, asker: teacher.Teacher, the_task: Task, cache: Path, texts: list[str]):
    """The teacher's answer to each input text, asked with its own prompt, greedy (cached like every answer)."""
    rows = _asking_rows(recipe, asker, the_task, texts)
    asked = teacher.ask(asker, rows, cache, recipe.evaluate.max_new_tokens, what="inputs to answer")
    return [a["prediction"].strip() for a in asked.answers], asked


def _asking_rows(recipe: Recipe, asker: teacher.Teacher, the_task: Task, texts: list[str]) -> list[data.TaskRow]:
    """Each input text in the data's columns (the answer a placeholder), rendered with the teacher's own prompt."""
    prompt_field = f"{asker.field}.prompt"
    return [
        data.format_row(
            recipe.data, _training_row(recipe, the_task, text, None), f"synthesized row {i}", asker.section.prompt,
            prompt_field, True,
        )
        for i, text in enumerate(texts)
    ]  # fmt: skip


def _answer_rows(recipe, asker, the_task, cache, candidates, verdicts) -> tuple[dict, teacher.Asked]:
    """A task whose answers are not labels: the teacher answers each kept input; an empty answer, or (JSON tasks)
    one that is not JSON or lacks a key every seed answer has, drops the row."""
    kept = list(verdicts.kept)
    answers, asked = _answers_of(recipe, asker, the_task, cache, [candidates[i]["text"] for i in kept])
    for i, answer in zip(kept, answers, strict=True):
        candidate = candidates[i]
        candidate["teacher_answer"] = answer
        value, problem = _checked_answer(the_task, answer)
        if problem is not None:
            verdicts.kept.remove(i)
            verdicts.drop(i, problem, answer=answer[:200])
        else:
            candidate["label"] = value
    found = {"mode": "answered", "rows": len(kept), "agreement": None, "per_label": {}, "relabelled": 0}
    return found, asked


def _checked_answer(the_task: Task, answer: str) -> tuple[str | None, str | None]:
    """(the answer as the row keeps it, None) or (None, the reason it is dropped)."""
    if not answer:
        return None, "answer_empty"
    if the_task.answers != "json":
        return answer, None
    start = min((k for k in (answer.find("{"), answer.find("[")) if k >= 0), default=-1)
    try:
        value, _ = json.JSONDecoder().raw_decode(answer[start:]) if start >= 0 else (None, 0)
    except ValueError:
        value = None
    if value is None:
        return None, "answer_not_json"
    if the_task.json_keys and not (isinstance(value, dict) and set(the_task.json_keys) <= set(value)):
        return None, "answer_shape"
    return json.dumps(value, ensure_ascii=False), None


def _label_check(recipe, asker, the_task, cache, candidates, verdicts) -> dict:
    """The teacher labels each kept row blind; rows it labels otherwise are dropped, relabelled or kept."""
    mode = recipe.synthesize.label_check
    kept = list(verdicts.kept)
    answers, asked = _labels_of(recipe, asker, the_task, cache, [candidates[i]["text"] for i in kept])
    per_label: dict[str, list[bool]] = {}
    relabelled = 0
    for i, answer in zip(kept, answers, strict=True):
        candidate = candidates[i]
        candidate["teacher_label"] = answer
        agrees = answer == candidate["label"]
        per_label.setdefault(candidate["label"], []).append(agrees)
        if agrees or mode == "keep":
            continue
        if mode == "relabel" and answer is not None:
            candidate["asked_label"], candidate["label"] = candidate["label"], answer
            relabelled += 1
            continue
        verdicts.kept.remove(i)
        verdicts.drop(i, "label_disagrees", asked=candidate["label"], teacher=answer)
    agreement = {label: sum(v) / len(v) for label, v in per_label.items()}
    checked = sum(len(v) for v in per_label.values())
    overall = sum(sum(v) for v in per_label.values()) / checked if checked else None
    found = {"mode": mode, "rows": checked, "agreement": overall, "per_label": agreement, "relabelled": relabelled}
    return found, asked


def _training_row(recipe: Recipe, the_task: Task, text: str, label: str | None) -> dict:
    """A row in the data's own columns, as data.train holds one: the text as the input, the label's value as
    the answer (None: a placeholder the teacher never sees, for asking it the label)."""
    section = recipe.data
    if the_task.answered:  # the teacher's answer as the seeds hold theirs: the object itself, or its text
        value = teacher.UNLABELLED if label is None else json.loads(label) if the_task.json_column else label
        if section.format == "messages":
            content = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            return {
                section.messages_field: [{"role": "user", "content": text}, {"role": "assistant", "content": content}]
            }
        return {the_task.input_field: text, the_task.answer_field: value}
    if section.format == "messages":
        answer = the_task.label_values[label] if label is not None else teacher.UNLABELLED
        turns = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return {section.messages_field: turns}
    value = the_task.label_values[label] if label is not None else teacher.UNLABELLED
    return {the_task.input_field: text, the_task.answer_field: value}


def _cost(asked: teacher.Asked) -> dict:
    """What asking the teacher took: its seconds (the answers' shares of their batches), the server's token counts
    (None for a local teacher), how many answers came from the cache, a local teacher's peak memory."""
    return {
        "asks": len(asked.answers),
        "seconds": sum(a["seconds"] for a in asked.answers),
        "prompt_tokens": teacher.total(a.get("prompt_tokens") for a in asked.answers),
        "generated_tokens": teacher.total(a.get("generated_tokens") for a in asked.answers),
        "from_cache": asked.from_cache,
        "peak_memory_bytes": asked.peak_memory_bytes,
    }


def _result(recipe, the_task, asker, asks, candidates, kept, verdicts, score, checked, embed) -> dict:
    synth = recipe.synthesize
    examples: dict[str, list] = {}
    for i, why in sorted(verdicts.dropped.items()):
        shown = examples.setdefault(why["reason"], [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append({"text": candidates[i]["text"], "label": candidates[i]["label"], **why})
    kept_texts = [c["text"] for c in kept]
    seed_texts = [s.text for s in the_task.seeds]
    within = to_seeds = None
    if embed is not None and kept_texts:
        vectors = embed(kept_texts)
        within = _median(row_checks.nearest_similarity(vectors))
        to_seeds = _median(row_checks.nearest_similarity(vectors, embed(seed_texts))) if seed_texts else None
    asked_per_label = {label: 0 for label in the_task.labels}
    for ask in asks:
        if ask["label"] is not None:
            asked_per_label[ask["label"]] += ask["count"]
    sample: dict[str, list[str]] = {}
    for c in [] if the_task.answered else kept:  # answered tasks: each kept row's answer is in rows.jsonl
        if len(sample.setdefault(c["label"], [])) < SAMPLE_PER_LABEL:
            sample[c["label"]].append(c["text"])
    return {
        "teacher": asker.section.model,
        "teacher_score": score,
        "labels": the_task.labels,
        "seed_rows": len(the_task.seeds),
        "asks": len(asks),
        "rows_asked": sum(a["count"] for a in asks),
        "rows_written": len(candidates),
        "rows_kept": len(kept),
        "dropped": verdicts.counts(),
        "dropped_examples": examples,
        "label_check": checked,
        "answers": the_task.answers,  # labels, json or text (the teacher answered each kept input)
        "json_keys": list(the_task.json_keys),
        "balance": {} if the_task.answered else row_checks.balance([c["label"] for c in kept], asked_per_label),
        "lengths": {
            "kept": row_checks.length_summary(kept_texts),
            "seeds": row_checks.length_summary(seed_texts),
            "held_out": row_checks.length_summary(the_task.held_out),
        },
        "diversity": {
            "distinct_1": row_checks.distinct_ngrams(kept_texts, 1),
            "distinct_2": row_checks.distinct_ngrams(kept_texts, 2),
            "seeds_distinct_2": row_checks.distinct_ngrams(seed_texts, 2),
            "nearest_within_median": within,
            "nearest_seed_median": to_seeds,
        },
        "near_duplicate": synth.near_duplicate,
        "sample": sample,
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None
