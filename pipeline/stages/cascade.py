"""Cascade stage: the specialist answers when it is sure enough, the reference below a threshold.

For each local candidate of the cascade (the specialist, its GGUF files), the threshold on its confidence is
chosen on the validation rows only: the candidate and the reference answer them (through the evaluate stage's
runtimes, cached in cascade/generations/), and the rule (the fewest deferrals that match the reference's
metric there, reach a target, or the best metric deferring at most a share) picks it. Then it is applied,
unchanged, to the eval rows the evaluate stage already answered: each row takes the candidate's answer where
its confidence reaches the threshold and the reference's below it. The result per candidate: the metric with
its interval, the share answered locally, what it costs and how long a request waits, paired against the
reference alone, the coverage-accuracy curve, and the confident wrong answers (the dangerous ones).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from pipeline import data
from pipeline.errors import PipelineError
from pipeline.files import write_json_atomic
from pipeline.logs import log
from pipeline.metrics import metric_interval, scorer
from pipeline.recipe import LoadedRecipe
from pipeline.result_types import read_eval_results
from pipeline.run_layout import RunLayout
from pipeline.runs import mark_done, stage_done, stage_fingerprint, start_stage
from pipeline.stages import evaluate
from pipeline.stats import calibration, cascade_latency, paired

STAGE = "cascade"


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str | None:
    if loaded.recipe.cascade is None:
        return None
    rule = loaded.recipe.cascade.model_dump(exclude={"when_fallback_fails"})  # serving only
    return stage_fingerprint(STAGE, stage_done(run_dir, "evaluate"), rule)


def cascade_candidates(loaded: LoadedRecipe, found: list[evaluate.Candidate]) -> list[evaluate.Candidate]:
    """Of the evaluation's candidates, the local ones the recipe cascades (default: specialized and GGUF files)."""
    names = loaded.recipe.cascade.candidates
    if names is None:
        return [c for c in found if c.role == "specialized" or (c.quantized and c.gguf_file is not None)]
    return [c for c in found if c.name in names]


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    recipe = loaded.recipe
    if recipe.cascade is None:
        raise PipelineError(f"{loaded.path}: the recipe has no cascade: section")
    if stage_done(run_dir, "evaluate") is None:
        raise PipelineError(f"{run_dir}: no finished evaluation to cascade; run `make eval RECIPE={loaded.path}`")
    stage_dir = start_stage(RunLayout(run_dir).stage(STAGE))
    (stage_dir / "generations").mkdir(parents=True, exist_ok=True)
    metric = recipe.evaluate.metrics[0]
    score = scorer(metric)
    ignore_case = recipe.evaluate.ignore_case
    everyone = evaluate.candidates(loaded, run_dir)
    reference = next(c for c in everyone if c.role == "reference")
    splits = data.load_splits(recipe.data)
    validation, eval_rows = splits.validation, splits.eval
    if not validation:
        raise PipelineError(f"{loaded.path}: no validation rows to choose the cascade's threshold on")
    asked = (  # the same rows, as the reference is asked them
        data.load_splits(recipe.data, reference.prompt_template, "evaluate.reference.prompt")
        if reference.prompt_template
        else splits
    )
    deferred_only = evaluate.reference_deferred_only(recipe)
    # single requests timed on these rows only where the reference's cost figure comes from them (deferred_rows)
    reference_answers, reference_validation_cost = evaluate.candidate_answers(
        reference, asked.validation, loaded, stage_dir, time_single_requests=deferred_only
    )
    targets = [row.target for row in validation]
    reference_validation = score([a["prediction"] for a in reference_answers], targets, ignore_case)["per_row"]
    eval_results = read_eval_results(run_dir)

    # each candidate's threshold, from the validation rows alone
    chosen = {}
    for candidate in cascade_candidates(loaded, everyone):
        answers, _ = evaluate.candidate_answers(candidate, validation, loaded, stage_dir, time_single_requests=False)
        local_validation = score([a["prediction"] for a in answers], targets, ignore_case)["per_row"]
        confidences = [a["confidence"] for a in answers]
        threshold, why = choose_threshold(confidences, local_validation, reference_validation, recipe.cascade)
        local_eval = _cached(run_dir, candidate.name)
        answered = [e["confidence"] >= threshold for e in local_eval]
        chosen[candidate.name] = (confidences, local_validation, threshold, why, local_eval, answered)

    every_row = not deferred_only
    if every_row:  # the evaluation asked the reference every eval row: for the comparison with it alone
        reference_eval = _cached(run_dir, "reference")
        reference_cost = eval_results["candidates"]["reference"]
        reference_rows = reference_cost["metrics"][metric]["per_row"]
    else:  # asked only where some cascade defers: an expensive reference pays for those rows alone
        deferred = sorted({i for *_, answered in chosen.values() for i, here in enumerate(answered) if not here})
        reference_eval, reference_cost = [None] * len(eval_rows), reference_validation_cost
        if deferred:
            only = replace(reference, name="reference-deferred")
            answers, reference_cost = evaluate.candidate_answers(
                only, [asked.eval[i] for i in deferred], loaded, stage_dir
            )
            for i, answer in zip(deferred, answers, strict=True):
                reference_eval[i] = answer

    found = {
        "metric": metric,
        "rule": recipe.cascade.model_dump(exclude={"when_fallback_fails"}),
        "fallback": recipe.evaluate.reference.model,  # the operating point's other half (a name, never a key)
        "validation_rows": len(validation),
        "eval_rows": len(eval_rows),
        # eval rows the reference answered: all of them, or only those some cascade deferred
        "reference_eval_rows": len(eval_rows) if every_row else sum(a is not None for a in reference_eval),
        "reference_validation_value": sum(reference_validation) / len(reference_validation),
        "candidates": {},
    }
    reference_side = (reference_eval, reference_rows if every_row else None, reference_validation, reference_cost)
    for name, choice in chosen.items():
        found["candidates"][name] = _on_the_eval_rows(loaded, name, choice, eval_rows, eval_results, reference_side)
    if not every_row:
        found["reference_cost"] = {  # priced from the rows it answered (report.cascade_facts)
            k: reference_cost.get(k) for k in ("prompt_tokens_per_example", "generated_tokens_per_example")
        }
    write_json_atomic(RunLayout(run_dir).cascade_result, found)
    mark_done(stage_dir, fingerprint(loaded, run_dir))
    return found


def _on_the_eval_rows(loaded: LoadedRecipe, name: str, choice: tuple, eval_rows, eval_results: dict, reference_side):
    """One cascade on the eval rows at the threshold the validation rows chose: its score and interval, the share
    answered locally, its latency, against the reference alone (where it answered every row), its surest errors."""
    recipe, metric = loaded.recipe, loaded.recipe.evaluate.metrics[0]
    confidences, local_validation, threshold, why, local_eval, answered = choice
    reference_eval, reference_rows, reference_validation, reference_cost = reference_side
    every_row = reference_rows is not None
    ignore_case = recipe.evaluate.ignore_case
    eval_targets = [row.target for row in eval_rows]
    predictions = [
        local["prediction"] if here else ref["prediction"]
        for local, ref, here in zip(local_eval, reference_eval, answered, strict=True)
    ]
    scores = {m: scorer(m)(predictions, eval_targets, ignore_case) for m in recipe.evaluate.metrics}
    ci = metric_interval(metric, scores[metric], (predictions, eval_targets), recipe.evaluate, recipe.train.seed)
    local_cost = eval_results["candidates"][name]
    share_local = sum(answered) / len(answered)
    local_rows = local_cost["metrics"][metric]["per_row"]
    wrong = [  # answered locally and wrong: the errors no threshold at this level catches
        {"row": i, "input": eval_rows[i].input_text(), "expected": eval_targets[i], "answer": e["prediction"],
         "confidence": e["confidence"]}
        for i, e in enumerate(local_eval)
        if answered[i] and local_rows[i] < 1
    ]  # fmt: skip
    facts = {
        "threshold": threshold if math.isfinite(threshold) else None,  # None: everything deferred
        "why": why,
        # how far its confidence can be trusted, on the rows that chose the threshold
        "calibration": calibration(confidences, [1.0 if s >= 1 else 0.0 for s in local_validation]),
        "validation": operating_point(confidences, local_validation, reference_validation, threshold),
        "value": scores[metric]["value"],
        "ci95": list(ci),
        "metrics": {m: s["value"] for m, s in scores.items()},
        "share_local": share_local,
        "latency_seconds": _latency(local_cost, reference_cost, share_local),
        # without the reference's answer on every eval row there is nothing to pair with, nor a curve there
        "versus_reference": {
            k: v
            for k, v in paired(scores[metric]["per_row"], reference_rows, recipe.evaluate.bootstrap_samples).items()
            if k not in ("won_rows", "lost_rows")
        }
        if every_row
        else None,
        "curve": coverage_curve([e["confidence"] for e in local_eval], local_rows, reference_rows)
        if every_row
        else coverage_curve(confidences, local_validation, reference_validation),
        "curve_rows": "eval" if every_row else "validation",
        "confident_wrong": sorted(wrong, key=lambda w: -w["confidence"])[:10],  # the surest first
        "confident_wrong_count": len(wrong),
    }  # fmt: skip
    log(
        STAGE,
        f"{name}: threshold {threshold:.4f} ({why}); eval rows: {metric} {scores[metric]['value']:.3f} "
        f"with {share_local:.0%} answered locally",
    )
    return facts


def choose_threshold(confidences: list[float], local: list[float], reference: list[float], rule) -> tuple[float, str]:
    """The confidence threshold (answer locally at or above it), from validation rows only, and why in words.

    Candidates are every confidence seen (and +inf: defer everything). The cascade's metric at a threshold is the
    mean of per-row scores, the local answer's where it answers and the reference's elsewhere.
    """
    options = sorted(set(confidences)) + [math.inf]
    points = [(t, *_point(confidences, local, reference, t)) for t in options]  # (threshold, coverage, value)
    reference_value = sum(reference) / len(reference)
    if rule.rule == "max_defer":
        allowed = [p for p in points if 1 - p[1] <= rule.max_defer + 1e-12]
        best = max(allowed, key=lambda p: (p[2], p[1]))
        return best[0], f"the best validation metric ({best[2]:.4f}) deferring at most {rule.max_defer:.0%}"
    goal = reference_value if rule.rule == "match_reference" else rule.target
    what = f"the reference's {reference_value:.4f}" if rule.rule == "match_reference" else f"the target {goal:g}"
    reaching = [p for p in points if p[2] >= goal - 1e-12]
    if not reaching:
        return math.inf, f"no threshold reaches {what} on the validation rows: everything is deferred"
    best = max(reaching, key=lambda p: (p[1], p[2]))
    return best[0], f"the most answered locally ({best[1]:.0%}) reaching {what} on the validation rows ({best[2]:.4f})"


def _point(confidences, local, reference, threshold) -> tuple[float, float]:
    here = [c >= threshold for c in confidences]
    value = sum(mine if h else theirs for mine, theirs, h in zip(local, reference, here, strict=True)) / len(here)
    return sum(here) / len(here), value


def operating_point(confidences, local, reference, threshold) -> dict:
    coverage, value = _point(confidences, local, reference, threshold)
    return {"share_local": coverage, "value": value}


def coverage_curve(confidences: list[float], local: list[float], reference: list[float], points: int = 21) -> list:
    """(share answered locally, cascade metric) at thresholds spread over the confidences: the trade-off."""
    ordered = sorted(confidences)
    thresholds = sorted({ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] for q in
                         [i / (points - 1) for i in range(points)]} | {math.inf})  # fmt: skip
    return [
        {"threshold": t if math.isfinite(t) else None, **operating_point(confidences, local, reference, t)}
        for t in thresholds
    ]


def _cached(run_dir: Path, name: str) -> list[dict]:
    """The evaluate stage's answers of one candidate on the eval rows, in row order."""
    entries = evaluate.read_generations(RunLayout(run_dir).generations(name))
    by_row = {e["row"]: e for e in entries}
    return [by_row[i] for i in range(len(by_row))]


def _latency(local: dict, reference: dict, share_local: float) -> dict:
    """Single-request seconds of the cascade (mean, p50, p95): every request waits for the local model, deferred
    ones for the reference too, from each candidate's timed single requests. Results from before those were kept
    give the mean from the two p50s alone."""
    if local.get("single_request_seconds") and reference.get("single_request_seconds"):
        return cascade_latency(local["single_request_seconds"], reference["single_request_seconds"], share_local)
    local_s = local.get("single_request_seconds_p50") or local.get("seconds_per_example_p50")
    reference_s = reference.get("single_request_seconds_p50") or reference.get("seconds_per_example_p50")
    mean = None if local_s is None or reference_s is None else local_s + (1 - share_local) * reference_s
    return {"mean": mean, "p50": None, "p95": None}
