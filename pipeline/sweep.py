"""Sweeps and learning curves: many ordinary runs of one recipe, chosen on validation rows.

A sweep (`sweep:`) tries combinations of recipe fields. Each trial is an ordinary run of the recipe with
those values (its own run folder, lock, cache and resume), trained with its validation passes and then
scored once more on the validation rows by the evaluate stage's own code (the specialized candidate alone:
the task metric with its interval, and what the trial costs to run). The best trial by validation metric
-- or, under `sweep.ship`, the smallest within a stated distance of the best -- is the run whose quantize,
evaluate and report stages then run, and which publish uploads. Test rows never choose: only the chosen
trial is ever scored on them.

A learning curve (`learning_curve:`) trains the same recipe (the chosen trial's settings, under a sweep)
on nested shares of the training rows, each run choosing its checkpoint on the validation rows and then
scored on the eval rows, fits error = a * rows^-b + c, and projects the rows a target needs. Nothing is
chosen from the curve; it is evidence. For a distillation recipe the shares are of teacher labels too, with
what they cost.

Summaries go to runs/<name>/sweep-<id>/ and runs/<name>/curve-<id>/ (json, markdown, plot), and into the
chosen run's folder, so its report (and the model card) carries the trials table and the curve.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import data, runner, stats
from pipeline.errors import PipelineError
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.logs import log
from pipeline.metrics import metric_interval
from pipeline.processes import run_lock
from pipeline.recipe import LoadedRecipe, load_recipe
from pipeline.render.sweep import curve_markdown, sweep_markdown, write_curve_plot, write_sweep_plot
from pipeline.report_types import read_report
from pipeline.result_types import read_eval_results, read_train_result
from pipeline.run_layout import CURVE_FILE, SWEEP_FILE, RunLayout
from pipeline.runs import is_done, mark_done, run_dir_for, stage_done, stage_fingerprint, start_stage
from pipeline.stages import evaluate
from pipeline.stages import report as report_stage
from pipeline.stages import synthesize as synthesize_stage

# SWEEP_FILE, CURVE_FILE: in the summary folders, and a copy in the chosen run's folder for its report (RunLayout)


@dataclass(frozen=True)
class Trial:
    index: int
    settings: dict[str, Any]  # dotted recipe field -> the value this trial tries
    loaded: LoadedRecipe


def variant(loaded: LoadedRecipe, settings: dict[str, Any]) -> LoadedRecipe:
    """The recipe with these fields set and without its sweep / learning_curve sections: an ordinary run."""
    return load_recipe(loaded.path, loaded.overrides, {**settings, "sweep": None, "learning_curve": None})


def trials(loaded: LoadedRecipe) -> list[Trial]:
    """Every combination (grid), or a seeded sample of `trials` of them; in a fixed order, so a resumed or
    array-launched sweep numbers its trials the same way."""
    sweep = loaded.recipe.sweep
    keys = list(sweep.params)
    values = [sweep.params[key] for key in keys]
    total = math.prod(len(v) for v in values)
    if sweep.trials is not None and sweep.trials < total:
        # The sample is of combination numbers, each decoded alone: a grid of 10^12 combinations costs nothing
        # to sample from (the same picks as sampling the listed grid: range(total) is that list's numbering).
        picked = sorted(random.Random(sweep.seed).sample(range(total), sweep.trials))
        combos = [_combination(values, number) for number in picked]
    else:
        combos = list(itertools.product(*values))  # bounded: validate refuses a grid over MAX_TRIALS
    found, seen = [], {}
    for combo in combos:
        settings = dict(zip(keys, combo, strict=True))
        try:
            trial = variant(loaded, settings)
        except PipelineError as e:  # the line is the sweep's; say which combination does not load
            raise PipelineError(f"{e} (in the sweep's trial {_settings_text(settings)})") from None
        if trial.run_id in seen:  # two combinations that resolve to the same recipe (a value equal to a default)
            continue
        seen[trial.run_id] = settings
        found.append(Trial(len(found), settings, trial))
    return found


def summary_dir(loaded: LoadedRecipe, runs_dir: Path, kind: str) -> Path:
    return runs_dir / loaded.recipe.name / f"{kind}-{loaded.run_id}"


def prepare_folder(loaded: LoadedRecipe, runs_dir: Path) -> Path:
    """The sweep's (else the curve's) summary folder with the resolved recipe a scheduled job runs."""
    folder = summary_dir(loaded, runs_dir, "sweep" if loaded.recipe.sweep is not None else "curve")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "recipe.resolved.yaml", yaml.safe_dump(loaded.resolved, sort_keys=False))
    return folder


# --- a trial: train, then the validation rows through the evaluate stage's code ---------------------


def run_trial(trial: Trial, runs_dir: Path, force: bool = False) -> dict:
    """Train the trial (skipped when done) and score its adapter on the validation rows (cached)."""
    started = time.perf_counter()
    run_dir, _ = runner.run_stages(trial.loaded, runs_dir, TRAINING_STAGES, force=force, command="sweep trial")
    with run_lock(run_dir):
        scored = score_on_validation(trial.loaded, run_dir)
    return {**scored, "wall_seconds_this_call": round(time.perf_counter() - started, 3)}


def score_on_validation(loaded: LoadedRecipe, run_dir: Path) -> dict:
    settings = loaded.recipe.evaluate
    folder = RunLayout(run_dir).sweep_validation
    fingerprint = stage_fingerprint(
        folder.name,
        stage_done(run_dir, "train"),
        settings.model_dump(exclude={"reference", "gates", "bootstrap_samples"}),
        settings.bootstrap_samples,
    )
    if is_done(folder, fingerprint):
        return json.loads((folder / "result.json").read_text())
    start_stage(folder)
    train_result = read_train_result(run_dir)
    rows = data.load_splits(loaded.recipe.data).validation  # held out before distilled rows are added
    if not rows:
        raise PipelineError(f"{loaded.path}: no validation rows to choose a trial on; set data.validation")
    started = time.perf_counter()
    scored = evaluate.score_specialized(loaded, run_dir, rows, folder)
    scoring_seconds = time.perf_counter() - started
    metric, scores, (low, high) = _gating_score(loaded, scored)
    chosen = train_result["validation"]
    result = {
        "metric": metric,
        "value": scores["value"],
        "ci95": [low, high],
        "per_row": scores["per_row"],
        "rows": scored["rows"],
        "validation_loss": (chosen.get("best") or {}).get("loss") if chosen.get("select") == "best" else None,
        "chosen_step": chosen.get("chosen_step"),
        "steps": train_result["steps"],
        "stopped_early": chosen.get("stopped_early", False),
        "train_seconds": train_result["train_seconds"],
        "validation_seconds": chosen.get("seconds", 0.0),  # the passes while training (within train_seconds)
        "scoring_seconds": round(scoring_seconds, 3),  # the chosen adapter on the validation rows, with its costs
        "trainable_parameters": train_result["trainable_parameters"],
        "parameters": scored.get("parameters"),
        "size_bytes": scored.get("size_on_disk_bytes"),
        "peak_memory_bytes": scored.get("peak_memory_bytes"),
        "latency_p50": scored.get("single_request_seconds_p50") or scored.get("seconds_per_example_p50"),
        "latency_kind": "single request" if scored.get("single_request_seconds_p50") else "per example in a batch",
        "runtime": scored.get("runtime"),
        "device": scored.get("device"),
        "threads": scored.get("threads"),
    }
    write_json_atomic(folder / "result.json", result)
    mark_done(folder, fingerprint)
    return result


# --- choosing ---------------------------------------------------------------------------------------

TRAINING_STAGES = ("synthesize", "distill", "train")  # what a trial or a curve point runs (then it is scored)
SMALLEST_BY = {"parameters": "parameters", "latency": "latency_p50", "memory": "peak_memory_bytes"}


def choose(results: dict[int, dict], ship) -> tuple[int, str]:
    """(the chosen trial's index, why in words), from validation results only.

    Best: the highest validation metric; a tie goes to the lower validation loss, then the earlier trial.
    With a ship rule: of the trials within `ship.within` of the best, the smallest by `ship.smallest_by`
    (a tie there goes to the higher metric).
    """

    def rank(i):
        loss = results[i].get("validation_loss")
        return (-results[i]["value"], loss if loss is not None else float("inf"), i)

    best = min(results, key=rank)
    top = results[best]
    why = f"the best validation {top['metric']}: {top['value']:.4f} (trial {best})"
    if ship is None or ship.within == 0:
        return best, why
    key = SMALLEST_BY[ship.smallest_by]
    eligible = [i for i, r in results.items() if r["value"] >= top["value"] - ship.within - 1e-12]
    measured = [i for i in eligible if results[i].get(key) is not None]
    if not measured:
        return best, why + f"; no trial has a measured {ship.smallest_by}, so the ship rule could not apply"
    chosen = min(measured, key=lambda i: (results[i][key], *rank(i)))
    if chosen == best:
        return best, why + f", which is also the smallest by {ship.smallest_by} within {ship.within:g} of it"
    r = results[chosen]
    return chosen, (
        f"the smallest by {ship.smallest_by} of the {len(eligible)} trials within {ship.within:g} of the best "
        f"validation {top['metric']} ({top['value']:.4f}, trial {best}): trial {chosen} at {r['value']:.4f}"
    )


def run_sweep(loaded: LoadedRecipe, runs_dir: Path, force: bool = False, only: int | None = None) -> dict:
    """Every trial that the time budget allows (or only trial `only`, as a job array's task does), and the
    choice among those that finished. Returns the summary (also written to the sweep folder)."""
    sweep = loaded.recipe.sweep
    found = trials(loaded)
    if only is not None:
        if not 0 <= only < len(found):
            raise PipelineError(f"--trial {only}: this sweep has trials 0 to {len(found) - 1}")
        found = [found[only]]
    folder = summary_dir(loaded, runs_dir, "sweep")
    results: dict[int, dict] = {}
    spent, skipped = 0.0, []
    budget = sweep.time_budget_minutes * 60 if sweep.time_budget_minutes else None
    for trial in found:
        if budget is not None and spent >= budget:
            skipped.append(trial.index)
            continue
        log("sweep", f"trial {trial.index + 1}/{len(found)}: {_settings_text(trial.settings)}")
        result = run_trial(trial, runs_dir, force)
        # the recorded time of the work, not of this call: a resumed sweep stops where the first would have
        spent += result["train_seconds"] + result["scoring_seconds"]
        results[trial.index] = result
        log(
            "sweep",
            f"trial {trial.index}: validation {result['metric']} {result['value']:.4f} "
            f"[{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}] on {result['rows']} rows, "
            f"{result['train_seconds']:.0f} s training",
        )
    if skipped:
        log("sweep", f"time budget of {sweep.time_budget_minutes:g} min spent: trials {skipped} not run")
    if only is not None:
        return {"trial": only, **results[only]}
    chosen, why = choose(results, sweep.ship)
    summary = {
        "recipe": loaded.recipe.name,
        "sweep_id": loaded.run_id,
        "metric": loaded.recipe.evaluate.metrics[0],
        "validation_rows": next(iter(results.values()))["rows"],
        "method": sweep.method,
        "params": sweep.params,
        "ship": sweep.ship.model_dump() if sweep.ship else None,
        "time_budget_minutes": sweep.time_budget_minutes,
        "trials": [
            {
                "index": t.index,
                "settings": t.settings,
                "run_id": t.loaded.run_id,
                "status": "done" if t.index in results else "not run (time budget)",
                **({k: v for k, v in results[t.index].items() if k != "per_row"} if t.index in results else {}),
            }
            for t in found
        ],
        "chosen": chosen,
        "chosen_settings": found[chosen].settings,
        "chosen_run_id": found[chosen].loaded.run_id,
        "why": why,
        "seconds": round(spent, 1),
    }
    write_json_atomic(folder / SWEEP_FILE, summary)
    log("sweep", f"chose trial {chosen} ({_settings_text(found[chosen].settings)}): {why}")
    return summary


def main_run(loaded: LoadedRecipe, runs_dir: Path) -> LoadedRecipe:
    """The ordinary run a recipe stands for: itself, the trial its finished sweep chose, or (for a recipe
    with a learning curve) the run on all its rows. The single-stage verbs and `publish` act on it."""
    if loaded.recipe.sweep is not None:
        return chosen_trial(loaded, runs_dir)
    if loaded.recipe.learning_curve is not None:
        return variant(loaded, {})
    return loaded


def run_folder(ref: str, runs_dir: Path, verb: str) -> Path:
    """A run folder given as itself, or a recipe file standing for its run (a sweep's: the trial it chose)."""
    path = Path(ref)
    if path.is_dir() and RunLayout(path).manifest.is_file():
        return path
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return run_dir_for(main_run(load_recipe(path), runs_dir), runs_dir)
    raise PipelineError(f"{verb}: {ref} is neither a run folder (runs/NAME/ID) nor a recipe file")


def chosen_trial(loaded: LoadedRecipe, runs_dir: Path) -> LoadedRecipe:
    """The run a finished sweep chose."""
    path = summary_dir(loaded, runs_dir, "sweep") / SWEEP_FILE
    if not path.is_file():
        raise PipelineError(
            f"{loaded.path}: this recipe's sweep has not finished (no {path}); run `make train RECIPE={loaded.path}`"
        )
    return variant(loaded, json.loads(path.read_text())["chosen_settings"])


def _combination(values: list[list[Any]], number: int) -> tuple:
    """The combination itertools.product would list at position `number`."""
    picked = []
    for options in reversed(values):
        number, index = divmod(number, len(options))
        picked.append(options[index])
    return tuple(reversed(picked))


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "the recipe as written"


# --- the whole thing: sweep, the chosen run, the learning curve --------------------------------------


def run(loaded: LoadedRecipe, runs_dir: Path, force: bool = False) -> tuple[Path, dict | None]:
    """`specialist run` on a recipe with a sweep and/or a learning curve: the chosen run's folder and report."""
    settings: dict[str, Any] = {}
    sweep_summary = None
    if loaded.recipe.sweep is not None:
        with run_lock(summary_dir(loaded, runs_dir, "sweep")):
            sweep_summary = run_sweep(loaded, runs_dir, force)
        settings = sweep_summary["chosen_settings"]
    chosen = variant(loaded, settings)
    if sweep_summary is not None:  # the chosen run's report carries the trials table
        chosen_dir = run_dir_for(chosen, runs_dir)
        with run_lock(chosen_dir):
            write_json_atomic(RunLayout(chosen_dir).sweep, sweep_summary)
    run_dir, report = runner.run_stages(chosen, runs_dir, force=force)
    if loaded.recipe.learning_curve is not None:
        with run_lock(summary_dir(loaded, runs_dir, "curve")):
            curve = learning_curve(loaded, settings, runs_dir, run_dir, force)
        with run_lock(run_dir):
            write_json_atomic(RunLayout(run_dir).curve, curve)
        run_dir, report = runner.run_stages(chosen, runs_dir, ("report",))  # rebuilt with the curve in it
    if sweep_summary is not None:
        sweep_summary["chosen_eval"] = _eval_facts(report)
        folder = summary_dir(loaded, runs_dir, "sweep")
        write_json_atomic(folder / SWEEP_FILE, sweep_summary)
        write_sweep_plot(sweep_summary, folder / "sweep.png")
        write_text_atomic(folder / "sweep.md", "\n".join(sweep_markdown(sweep_summary, heading="#", plot="sweep.png")))
        log("sweep", f"wrote {folder / 'sweep.md'}")
    return run_dir, report


def _eval_facts(report: dict | None) -> dict | None:
    if not report:
        return None
    specialized = report["candidates"].get("specialized")
    if not specialized:
        return None
    m = specialized["metrics"][report["metric"]]
    return {"value": m["value"], "ci95": m["ci95"], "rows": report["eval_rows"]}


# --- learning curve ---------------------------------------------------------------------------------

CURVE_BOOTSTRAP = 200  # refits on resampled eval rows behind the projection's interval


def learning_curve(
    loaded: LoadedRecipe, settings: dict[str, Any], runs_dir: Path, full_run_dir: Path, force: bool = False
) -> dict:
    """Train on each share (the full run is the share 1), score each on the eval rows, fit and project."""
    section = loaded.recipe.learning_curve
    metric = loaded.recipe.evaluate.metrics[0]
    synthesized = section.over == "synthesized"
    what = "the teacher's rows" if synthesized else "the training rows"
    points = _seed_only_point(loaded, full_run_dir, metric) if synthesized else []
    for fraction in [f for f in section.fractions if f < 1] + [1.0]:
        if fraction < 1:
            share = variant(
                loaded, {**settings, "data.train_fraction": fraction, "data.train_fraction_of": section.over}
            )
            log("curve", f"share {fraction:g} of {what}")
            run_dir, _ = runner.run_stages(share, runs_dir, TRAINING_STAGES, force=force, command="curve")
            with run_lock(run_dir):
                scored = _score_on_eval(share, run_dir)
        else:
            run_dir, scored = full_run_dir, _full_run_scores(full_run_dir, metric)
        points.append(_point(fraction, run_dir, scored))
        log("curve", f"{points[-1]['rows']} rows: {metric} {scored['value']:.4f} on the eval rows")
    curve = fit_curve(points, section.target, loaded.recipe.train.seed)
    curve.update({"recipe": loaded.recipe.name, "metric": metric, "eval_rows": len(points[-1]["per_row"])})
    curve["over"] = section.over
    curve["labelling"] = (
        _writing_cost(loaded, full_run_dir, points) if synthesized else _labelling_cost(loaded, full_run_dir, points)
    )
    for point in curve["points"]:
        point.pop("per_row")
    folder = summary_dir(loaded, runs_dir, "curve")
    write_json_atomic(folder / CURVE_FILE, curve)
    write_curve_plot(curve, folder / "curve.png")
    write_text_atomic(folder / "curve.md", "\n".join(curve_markdown(curve, heading="#", plot="curve.png")))
    log("curve", f"wrote {folder / 'curve.md'}")
    return curve


def _point(fraction: float, run_dir: Path, scored: dict) -> dict:
    """A curve point: the share, the rows its run trained on (gold, a teacher's labels, a teacher's rows), its score
    on the eval rows, and its training."""
    train_result = read_train_result(run_dir)
    rows = train_result.get("rows_before_tokenizing", train_result["rows"])
    teacher = train_result.get("rows_teacher_labelled") or 0
    written = train_result.get("rows_synthesized") or 0
    return {
        "fraction": fraction,
        "rows": rows,
        "gold_rows": rows - teacher - written,
        "teacher_labels": teacher,
        "synthesized_rows": written,
        "run_id": run_dir.name,
        "value": scored["value"],
        "ci95": scored["ci95"],
        "per_row": scored["per_row"],
        "chosen_step": train_result["validation"].get("chosen_step"),
        "validation_value": train_result["validation"].get("chosen_value"),
        "train_seconds": train_result["train_seconds"],
    }


def _seed_only_point(loaded: LoadedRecipe, full_run_dir: Path, metric: str) -> list[dict]:
    """A curve over the teacher's rows starts at none of them: the seed-only specialist the full run evaluated."""
    sibling = synthesize_stage.seed_only_run(loaded, full_run_dir)
    results = read_eval_results(full_run_dir)
    if sibling is None or "seed-only" not in results["candidates"]:
        return []
    report = read_report(RunLayout(full_run_dir).report_json)
    m = report["candidates"]["seed-only"]["metrics"][metric]
    per_row = results["candidates"]["seed-only"]["metrics"][metric]["per_row"]
    return [_point(0.0, sibling, {"value": m["value"], "ci95": m["ci95"], "per_row": per_row})]


def _writing_cost(loaded: LoadedRecipe, run_dir: Path, points: list[dict]) -> dict | None:
    """For a curve over the teacher's rows: what each point's rows cost the teacher (every ask, check and label
    check behind a kept row, shared over the kept rows), in seconds and money at its price."""
    path = RunLayout(run_dir).synthesize_result
    if not path.is_file():
        return None
    written = report_stage.synthesis(
        json.loads(path.read_text()), 0, report_stage.synthesis_teacher(loaded.recipe).price
    )
    kept = max(written["rows_kept"], 1)
    per_row_seconds = written["teacher_seconds"] / kept
    per_row_money = written["cost"]["total"] / kept if written["cost"] else None
    for point in points:
        point["teacher_seconds"] = point["synthesized_rows"] * per_row_seconds
        point["teacher_cost"] = None if per_row_money is None else point["synthesized_rows"] * per_row_money
    return {
        "seconds_per_row": per_row_seconds,
        "cost_per_row": per_row_money,
        "currency": written["cost"]["currency"] if written["cost"] else None,
    }


def _score_on_eval(loaded: LoadedRecipe, run_dir: Path) -> dict:
    settings = loaded.recipe.evaluate
    folder = RunLayout(run_dir).curve_eval
    fingerprint = stage_fingerprint(
        folder.name,
        stage_done(run_dir, "train"),
        settings.model_dump(exclude={"reference", "gates"}),
    )
    if is_done(folder, fingerprint):
        return json.loads((folder / "result.json").read_text())
    start_stage(folder)
    rows = data.load_rows(loaded.recipe.data, "eval")
    _, scores, (low, high) = _gating_score(loaded, evaluate.score_specialized(loaded, run_dir, rows, folder))
    result = {"value": scores["value"], "ci95": [low, high], "per_row": scores["per_row"]}
    write_json_atomic(folder / "result.json", result)
    mark_done(folder, fingerprint)
    return result


def _gating_score(loaded: LoadedRecipe, scored: dict) -> tuple[str, dict, tuple[float, float]]:
    """(the gating metric, its scores, its bootstrap 95% interval) of what score_specialized returned."""
    settings = loaded.recipe.evaluate
    metric = settings.metrics[0]
    scores = scored["metrics"][metric]
    texts = (scored["predictions"], scored["references"])
    return metric, scores, metric_interval(metric, scores, texts, settings, loaded.recipe.train.seed)


def _full_run_scores(run_dir: Path, metric: str) -> dict:
    report = read_report(RunLayout(run_dir).report_json)
    results = read_eval_results(run_dir)
    m = report["candidates"]["specialized"]["metrics"][metric]
    per_row = results["candidates"]["specialized"]["metrics"][metric]["per_row"]
    return {"value": m["value"], "ci95": m["ci95"], "per_row": per_row}


def fit_curve(points: list[dict], target: float | None, seed: int) -> dict:
    """The saturating fit of error (1 - metric) against rows, and where it says `target` is reached, with an
    interval from refits on resampled eval rows (the same rows resampled for every point: they are paired).

    The metric is taken as a score out of 1 (higher better) whose error is 1 - score.
    """
    sizes = [p["rows"] for p in points]
    errors = [1 - p["value"] for p in points]
    fit = stats.fit_saturating(sizes, errors)
    found: dict[str, Any] = {"points": points, "fit": fit, "target": target}
    last, previous = points[-1], points[-2] if len(points) > 1 else None
    if previous is not None:
        gain = last["value"] - previous["value"]
        half_width = (last["ci95"][1] - last["ci95"][0]) / 2
        found["last_doubling_gain"] = gain
        found["flattened"] = gain <= half_width  # the last step up is inside the noise of one point
    if fit is None:
        found["projection"] = None
        found["projection_note"] = "the error does not fall with more rows (or there are fewer than 3 sizes)"
        return found
    found["floor"] = 1 - fit["c"]  # the metric more rows of this kind would approach
    found["predicted_at_double"] = 1 - stats.predicted_error(fit, 2 * sizes[-1])
    if target is None:
        return found
    needed = stats.rows_for_error(fit, 1 - target)
    rng = random.Random(seed)
    n = len(points[-1]["per_row"])
    samples: list[float | None] = []
    for _ in range(CURVE_BOOTSTRAP):
        picked = [rng.randrange(n) for _ in range(n)]
        resampled = [1 - sum(p["per_row"][i] for i in picked) / n for p in points]
        refit = stats.fit_saturating(sizes, resampled)
        samples.append(stats.rows_for_error(refit, 1 - target) if refit else None)
    reached = sorted(s for s in samples if s is not None)
    found["projection"] = {
        "rows": needed,
        "already_reached": last["value"] >= target,
        "interval": [reached[int(0.025 * (len(reached) - 1))], reached[int(0.975 * (len(reached) - 1))]]
        if len(reached) >= 20
        else None,
        "share_of_refits_reaching_target": len(reached) / len(samples),
    }
    return found


def _labelling_cost(loaded: LoadedRecipe, run_dir: Path, points: list[dict]) -> dict | None:
    """For a distillation recipe: what each point's teacher labels cost (time, and money at the teacher's price)."""
    if loaded.recipe.distill is None:
        return None
    path = RunLayout(run_dir).distill_result
    if not path.is_file():
        return None
    labelling = json.loads(path.read_text())
    # per label kept: the inputs whose answers were dropped were paid for too
    per_label_seconds = labelling["teacher_seconds"] / max(labelling["labelled"], 1)
    price = loaded.recipe.teacher().price
    per_label_money = None
    tokens_in, tokens_out = labelling.get("teacher_prompt_tokens"), labelling.get("teacher_generated_tokens")
    if price is not None and tokens_in is not None and tokens_out is not None:
        total = (tokens_in * price.input_per_million + tokens_out * price.output_per_million) / 1e6
        per_label_money = total / max(labelling["labelled"], 1)
    for point in points:
        point["teacher_seconds"] = point["teacher_labels"] * per_label_seconds
        point["teacher_cost"] = None if per_label_money is None else point["teacher_labels"] * per_label_money
    return {
        "seconds_per_label": per_label_seconds,
        "cost_per_label": per_label_money,
        "currency": price.currency if price else None,
    }
