"""Report stage: turn the evaluation into evidence a reader can decide on.

Reads evaluate/results.json and the generation caches (never a model), and writes report/report.json (the
evidence as data), report.md, report.html and the plots (rendered by pipeline/render/): per candidate the task
metric with a bootstrap 95% confidence interval and what it costs to run; the specialized model against each
other candidate on the same rows (wins, losses, McNemar's exact p-value); the gap to the reference it closed;
errors by label; the cascade; the gates.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from pipeline import data, tracking
from pipeline.error_analysis import answer_analysis, is_json_task, label_analysis
from pipeline.errors import PipelineError
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.logs import log
from pipeline.metrics import metric_interval
from pipeline.next_steps import next_steps
from pipeline.recipe import LoadedRecipe
from pipeline.render import html
from pipeline.render.markdown import render_markdown, verdict
from pipeline.render.plots import write_cascade_plot, write_report_plot
from pipeline.render.sweep import write_curve_plot, write_sweep_plot
from pipeline.report_types import REPORT_SCHEMA_VERSION, check, read_report
from pipeline.result_types import read_eval_results, read_train_result
from pipeline.run_layout import RunLayout
from pipeline.runs import mark_done, stage_done, stage_fingerprint, start_stage
from pipeline.stages.evaluate import read_generations
from pipeline.stats import gap_closed, paired

STAGE = "report"


def build_report(
    results: dict,
    loaded: LoadedRecipe,
    texts: dict[str, tuple[list, list]] | None = None,
    quantized: dict | None = None,
) -> dict:
    """The report as data; everything in report.md comes from here.

    `texts` maps a candidate to its (predictions, references); it is needed only for metrics that are
    not a mean of rows, whose intervals are recomputed on resampled rows. `quantized` is the quantize
    stage's result.json, whose fidelity checks and GGUF tensor types the report carries.
    """
    settings = loaded.recipe.evaluate
    metric = settings.metrics[0]
    candidates = results["candidates"]
    seed = loaded.recipe.train.seed
    report_candidates = {}
    for name, result in candidates.items():
        entry = {"role": result["role"], "metrics": {}}
        for metric_name, scores in result["metrics"].items():
            low, high = metric_interval(metric_name, scores, (texts or {}).get(name), settings, seed)
            extras = {k: v for k, v in scores.items() if k not in ("value", "per_row", "mean_of_rows")}
            entry["metrics"][metric_name] = {"value": scores["value"], "ci95": [low, high], **extras}
        entry.update({k: v for k, v in result.items() if k not in ("role", "metrics")})
        entry.update(answer_cost(entry, results["eval_rows"], loaded.recipe.evaluate.reference, name))
        report_candidates[name] = entry

    def value(name: str) -> float | None:
        return candidates[name]["metrics"][metric]["value"] if name in candidates else None

    comparisons = {}
    if "specialized" in candidates:
        specialized_rows = candidates["specialized"]["metrics"][metric]["per_row"]
        for name, result in candidates.items():
            if name != "specialized":
                other_rows = result["metrics"][metric]["per_row"]
                comparisons[name] = paired(specialized_rows, other_rows, settings.bootstrap_samples, seed)

    gap = None
    if value("reference") is not None and value("base") is not None and value("specialized") is not None:
        gap = gap_closed(value("specialized"), value("base"), value("reference"))
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "recipe": loaded.recipe.name,
        "run_id": loaded.run_id,
        "metric": metric,
        "eval_rows": results["eval_rows"],
        "candidates": report_candidates,
        "comparisons": comparisons,
        "gap_closed": gap,
        "gates": evaluate_gates(loaded, candidates, metric, gap),
        "fidelity": _fidelity(quantized),
        "savings": savings(report_candidates),
    }


def answer_cost(candidate: dict, rows: int, reference, name: str) -> dict:
    """Tokens per answer (the server's counts for an API, the tokenizer's for a local model) and, where the
    recipe gives the reference per-token prices, what 1,000 answers cost. Local candidates have no price."""
    tokens_out = candidate.get("generated_tokens_per_example")
    if tokens_out is None and candidate.get("generated_tokens") is not None:
        tokens_out = candidate["generated_tokens"] / rows  # results from before this field
    tokens_in = candidate.get("prompt_tokens_per_example")
    price = reference.price if reference is not None and name == "reference" else None
    cost = None
    if price is not None and tokens_in is not None and tokens_out is not None:
        cost = 1000 * (tokens_in * price.input_per_million + tokens_out * price.output_per_million) / 1e6
    return {
        "generated_tokens_per_example": tokens_out,
        "price": price.model_dump() if price else None,
        "cost_per_1000_answers": cost,
    }


def savings(candidates: dict) -> dict | None:
    """What the specialist saves per 1,000 answers against a priced reference: all of the reference's
    per-token charge, since the specialist runs on the user's hardware without one."""
    reference, specialized = candidates.get("reference"), candidates.get("specialized")
    if not reference or not specialized or reference.get("cost_per_1000_answers") is None:
        return None
    return {
        "currency": reference["price"]["currency"],
        "reference_per_1000_answers": reference["cost_per_1000_answers"],
        "specialized_per_1000_answers": 0.0,
        "saved_per_1000_answers": reference["cost_per_1000_answers"],
        "specialized_seconds_per_answer": specialized["seconds_per_example_p50"],
        "prompt_tokens_saved_per_answer": (
            reference["prompt_tokens_per_example"] - specialized["prompt_tokens_per_example"]
            if reference.get("prompt_tokens_per_example") is not None
            and specialized.get("prompt_tokens_per_example") is not None
            else None
        ),
    }


def _fidelity(quantized: dict | None) -> dict:
    """The quantize stage's checks: the merge, and per GGUF file its types, agreement, tokens and end token."""
    if not quantized:
        return {}
    variants = quantized["variants"]
    found = {"merge": variants["merged"].get("fidelity", {}).get("merge")}
    for name, variant in variants.items():
        if variant.get("kind") in ("gguf", "gguf-lora"):
            found[name] = {"type": variant["type"], "tensor_types": variant["tensor_types"], **variant["fidelity"]}
            if variant["kind"] == "gguf-lora":  # the adapter's own type and tensors; the base it goes on apart
                found[name]["base"] = {"type": variant["base_type"], "tensor_types": variant["base_tensor_types"]}
    return found


def shared_base(report: dict, quantized: dict | None, generations: dict[str, list[dict]], counts=(1, 3, 10)) -> dict:
    """Per adapter GGUF (kind gguf-lora): what N specialists cost on one device both ways, from this run's own
    measured files: N merged GGUF files of the base's type, or one shared base with N adapters. Disk: the files.
    Memory: N merged files loaded each in its own process (N times the merged file's measured peak) against one
    process with the base and N adapters (the adapter candidate's measured peak, plus each further adapter's file
    size); the merged side needs the recipe's own gguf variant of that type (else disk only, the merged file
    being the base file's size: same tensors, same type). Answer agreement with that merged file on the eval rows."""
    found = {}
    variants = (quantized or {}).get("variants", {})
    candidates = report["candidates"]
    for name, variant in variants.items():
        if variant.get("kind") != "gguf-lora" or name not in candidates:
            continue
        mine = candidates[name]
        adapter, base = variant["size_on_disk_bytes"], variant["shared_base_bytes"]
        twin = next(
            (n for n, v in variants.items() if v.get("kind") == "gguf" and v["type"] == variant["base_type"]), None
        )
        merged = variants[twin]["size_on_disk_bytes"] if twin else base
        merged_peak = candidates[twin]["peak_memory_bytes"] if twin in candidates else None
        peak = mine.get("peak_memory_bytes")
        facts = {
            "base_type": variant["base_type"],
            "base_bytes": base,
            "adapter_bytes": adapter,
            "merged_variant": twin,
            "merged_bytes": merged,
            "merged_bytes_measured": twin is not None,
            "peak_memory_bytes": peak,
            "merged_peak_memory_bytes": merged_peak,
            "answer_agreement_with_merged": None,
            "specialists": [
                {
                    "n": n,
                    "disk_merged_bytes": n * merged,
                    "disk_shared_bytes": base + n * adapter,
                    "memory_merged_bytes": n * merged_peak if merged_peak else None,
                    "memory_shared_bytes": peak + (n - 1) * adapter if peak else None,
                }
                for n in counts
            ],
        }
        if twin in generations and name in generations:
            same = sum(
                a["prediction"] == b["prediction"] for a, b in zip(generations[name], generations[twin], strict=True)
            )
            facts["answer_agreement_with_merged"] = same / len(generations[name])
        found[name] = facts
    return found


def confidence_facts(results: dict, metric: str, generations: dict[str, list[dict]]) -> dict:
    """Per candidate that reported confidences: how sure it was when right and when wrong (by the gating
    metric's per-row score: 1 is right), and for each variant how its confidences agree with the
    specialized model's on the rows where both gave the same answer (the same definition in both runtimes,
    so a GGUF file should defer on the same rows as the model it was made from)."""
    found = {}
    specialized = generations.get("specialized") or []
    for name, entries in generations.items():
        if not entries or any("confidence" not in e for e in entries):
            continue
        per_row = results["candidates"][name]["metrics"][metric]["per_row"]
        confidences = [e["confidence"] for e in entries]
        right = [c for c, s in zip(confidences, per_row, strict=True) if s >= 1]
        wrong = [c for c, s in zip(confidences, per_row, strict=True) if s < 1]
        facts: dict = {
            "mean": statistics.fmean(confidences),
            "mean_when_right": statistics.fmean(right) if right else None,
            "mean_when_wrong": statistics.fmean(wrong) if wrong else None,
        }
        if name != "specialized" and len(specialized) == len(entries) and all("confidence" in e for e in specialized):
            same = [(a, b) for a, b in zip(specialized, entries, strict=True) if a["prediction"] == b["prediction"]]
            differences = sorted(abs(a["confidence"] - b["confidence"]) for a, b in same)
            facts["versus_specialized"] = {
                "same_answer": len(same) / len(entries),
                "median_abs_difference": statistics.median(differences) if differences else None,
                "p95_abs_difference": differences[int(0.95 * (len(differences) - 1))] if differences else None,
            }
        found[name] = facts
    return found


def cascade_facts(result: dict, report: dict, reference) -> dict:
    """The cascade stage's result with what each cascade costs per 1,000 answers where the reference is priced
    (the deferred share of the reference's cost; local answers have no per-token charge). Where the reference
    answered only the deferred rows, it is priced from those, and has no metric of its own on the eval rows."""
    alone = report["candidates"].get("reference")
    if alone is not None:
        reference_cost = alone.get("cost_per_1000_answers")
        result["reference_value"] = alone["metrics"][result["metric"]]["value"]
        result["reference_ci95"] = alone["metrics"][result["metric"]]["ci95"]
    else:
        reference_cost = answer_cost(result.get("reference_cost") or {}, 1, reference, "reference")[
            "cost_per_1000_answers"
        ]
        result["reference_value"] = result["reference_ci95"] = None
    for facts in result["candidates"].values():
        facts["cost_per_1000_answers"] = None if reference_cost is None else (1 - facts["share_local"]) * reference_cost
    return result


def evaluate_gates(loaded: LoadedRecipe, candidates: dict, metric: str, gap: float | None) -> dict:
    gates = loaded.recipe.evaluate.gates
    checks = {}
    specialized = candidates.get("specialized", {}).get("metrics", {}).get(metric, {}).get("value")
    if gates.specialized_min is not None:
        checks["specialized_min"] = {
            "threshold": gates.specialized_min,
            "value": specialized,
            "passed": specialized is not None and specialized >= gates.specialized_min,
        }
    if gates.min_gap_closed is not None:
        checks["min_gap_closed"] = {
            "threshold": gates.min_gap_closed,
            "value": gap,
            "passed": gap is not None and gap >= gates.min_gap_closed,
        }
    if gates.quantized_max_drop is not None:
        drops = [specialized - c["metrics"][metric]["value"] for c in candidates.values() if c["role"] == "quantized"]
        worst = max(drops, default=0.0)
        checks["quantized_max_drop"] = {
            "threshold": gates.quantized_max_drop,
            "value": worst,
            "passed": worst <= gates.quantized_max_drop + 1e-12,
        }
    if gates.max_latency_ratio is not None:
        ratio = None
        if "reference" in candidates and "specialized" in candidates:
            ratio = (
                candidates["specialized"]["seconds_per_example_p50"]
                / candidates["reference"]["seconds_per_example_p50"]
            )
        checks["max_latency_ratio"] = {
            "threshold": gates.max_latency_ratio,
            "value": ratio,
            "passed": ratio is not None and ratio <= gates.max_latency_ratio,
        }
    return {"passed": all(c["passed"] for c in checks.values()), "checks": checks}


def failed_gates(report: dict) -> list[str]:
    return [name for name, check in report["gates"]["checks"].items() if not check["passed"]]


def flipped_rows(
    report: dict, generations: dict[str, list[dict]], rows: list, other: str, limit: int = 10
) -> list[dict]:
    """Up to limit/2 rows the specialized model won against `other`, and up to limit/2 it lost."""
    comparison = report["comparisons"].get(other)
    if not comparison or "specialized" not in generations:
        return []
    flips = []
    for kind in ("won_rows", "lost_rows"):
        for i in comparison[kind][: limit // 2]:
            flips.append(
                {
                    "row": i,
                    "source": rows[i].source,
                    "input": rows[i].input_text(),
                    "expected": rows[i].target.strip(),
                    "versus": other,
                    "other": generations[other][i]["prediction"],
                    "specialized": generations["specialized"][i]["prediction"],
                    "kind": kind[:-5],  # won or lost, from the specialized model's side
                }
            )
    return flips


def page_rows(loaded: LoadedRecipe, run_dir: Path, report: dict) -> list[dict]:
    """side_by_side for a finished run, read from its folder (what publish puts in a bundle's report.html)."""
    results = read_eval_results(run_dir)
    generations = {name: read_generations(RunLayout(run_dir).generations(name)) for name in results["candidates"]}
    return side_by_side(report, results, generations, data.load_rows(loaded.recipe.data, "eval"))


def side_by_side(report: dict, results: dict, generations: dict[str, list[dict]], rows: list) -> list[dict]:
    """Every eval row with each candidate's answer and whether the gating metric scored it right (1 per row)."""
    metric, labels = report["metric"], "labels" in report
    per_row = {name: r["metrics"][metric]["per_row"] for name, r in results["candidates"].items()}
    return [
        {
            "row": i,
            "source": row.source,
            "input": row.input_text(),
            "expected": row.target.strip(),
            "label": row.target.strip() if labels else None,
            "answers": {name: generations[name][i]["prediction"] for name in report["candidates"]},
            "right": {name: per_row[name][i] >= 1 for name in report["candidates"]},
        }
        for i, row in enumerate(rows)
    ]


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str:
    """What the report is built from: the finished evaluation (and training, labelling) of this run."""
    return stage_fingerprint(
        STAGE,
        REPORT_SCHEMA_VERSION,
        stage_done(run_dir, "evaluate"),
        stage_done(run_dir, "train"),
        stage_done(run_dir, "distill"),
        stage_done(run_dir, "synthesize"),
        stage_done(run_dir, "cascade"),
        # a sweep that chose this run, a learning curve drawn from it: sections of its report
        [_text(path) for path in (RunLayout(run_dir).sweep, RunLayout(run_dir).curve)],
        # prices are not part of the run id: a new one only rebuilds the report
        [
            r.price.model_dump() if r and r.price else None
            for r in (loaded.recipe.evaluate.reference, loaded.recipe.teacher(), synthesis_teacher(loaded.recipe))
        ],
    )


def _text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def read(run_dir: Path) -> dict:
    return read_report(RunLayout(run_dir).report_json)


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    results_path = RunLayout(run_dir).eval_results
    if not results_path.is_file():
        raise PipelineError(f"{run_dir}: no evaluation results; run `make eval RECIPE={loaded.path}` first")
    start_stage(RunLayout(run_dir).stage(STAGE))
    results = read_eval_results(run_dir)
    generations = {name: read_generations(RunLayout(run_dir).generations(name)) for name in results["candidates"]}
    splits = data.load_splits(loaded.recipe.data)  # read once: eval rows here, gold training rows below
    rows = splits.eval
    references = [row.target for row in rows]
    texts = {name: ([g["prediction"] for g in gens], references) for name, gens in generations.items()}
    quantize_result = RunLayout(run_dir).quantize_result
    quantized = json.loads(quantize_result.read_text()) if quantize_result.is_file() else None
    report = build_report(results, loaded, texts, quantized)
    distill_result = RunLayout(run_dir).distill_result
    if loaded.recipe.distill and distill_result.is_file():
        train_result = read_train_result(run_dir)
        gold_rows = len(splits.train)
        report["distillation"] = distillation(
            report,
            json.loads(distill_result.read_text()),
            generations,
            gold_rows,
            train_result["train_seconds"],
            teacher_is_reference=loaded.recipe.distill.teacher is None,
            price=loaded.recipe.teacher().price,
        )
    synthesize_result = RunLayout(run_dir).synthesize_result
    if loaded.recipe.synthesize and synthesize_result.is_file():
        report["synthesis"] = synthesis(
            json.loads(synthesize_result.read_text()), len(splits.train), synthesis_teacher(loaded.recipe).price
        )
    if RunLayout(run_dir).train_result.is_file():  # which adapter training kept, chosen on validation rows
        trained = read_train_result(run_dir)
        report["validation"] = trained.get("validation")
        if trained.get("refit") and report["validation"] is not None:  # train.refit: the adapter shipped instead
            report["validation"] = {**report["validation"], "refit": trained["refit"]}
    layout = RunLayout(run_dir)
    for key, path, plot, name in (
        ("sweep", layout.sweep, write_sweep_plot, "sweep"),
        ("learning_curve", layout.curve, write_curve_plot, "curve"),
    ):
        if path.is_file():
            report[key] = json.loads(path.read_text())
            plot(report[key], layout.plot(name))
    train_targets = [row.target for row in splits.train]
    if data.is_label_set(train_targets + references):  # which labels it gets wrong, as what; rows that taught it
        report["labels"] = label_analysis(texts, train_targets, loaded.recipe.evaluate.ignore_case)
    # how long the answers are, which were cut off at max_new_tokens, which are not the JSON the task wants
    json_task = is_json_task(loaded.recipe.evaluate.metrics, references)
    report["answers"] = {
        **answer_analysis(generations, references, json_task),
        "max_new_tokens": loaded.recipe.evaluate.max_new_tokens,
    }
    left_out = {split: len(wheres) for split, wheres in splits.dropped_empty.items()}
    if left_out:
        report["rows_left_out_empty"] = left_out
    report["confidence"] = confidence_facts(results, report["metric"], generations)
    report["shared_base"] = shared_base(report, quantized, generations)
    cascade_result = RunLayout(run_dir).cascade_result
    if loaded.recipe.cascade is not None and cascade_result.is_file():
        reference = loaded.recipe.evaluate.reference
        report["cascade"] = cascade_facts(json.loads(cascade_result.read_text()), report, reference)
        gate = loaded.recipe.evaluate.gates.cascade_min
        if gate is not None:
            value = report["cascade"]["candidates"].get("specialized", {}).get("value")
            passed = value is not None and value >= gate
            report["gates"]["checks"]["cascade_min"] = {"threshold": gate, "value": value, "passed": passed}
            report["gates"]["passed"] = report["gates"]["passed"] and passed
        write_cascade_plot(report, RunLayout(run_dir).plot("cascade"))
    flips = [flip for other in ("base", "reference") for flip in flipped_rows(report, generations, rows, other)]
    report["flipped_rows"] = flips
    report["next_steps"] = next_steps(report)  # last: it reads every section above
    write_json_atomic(RunLayout(run_dir).report_json, check(report))
    plot_path = RunLayout(run_dir).plot("report")
    write_report_plot(report, plot_path)
    write_text_atomic(RunLayout(run_dir).report_md, render_markdown(report, flips, plot_path.name))
    html.write(
        report, verdict(report), side_by_side(report, results, generations, rows), RunLayout(run_dir).report_html
    )
    tracking.log_report(loaded, run_dir, report)
    mark_done(RunLayout(run_dir).stage(STAGE), fingerprint(loaded, run_dir))
    log(STAGE, f"wrote {RunLayout(run_dir).report_md}")
    return report


def synthesis_teacher(recipe):
    if recipe.synthesize is None:
        return None
    return recipe.synthesize.teacher or recipe.evaluate.reference


def synthesis(written: dict, gold_rows: int, price=None) -> dict:
    """What the teacher wrote and what the checks kept (synthesize/result.json), the gold rows trained beside
    them, and the teacher's cost over its asks (scoring, proposing variations, writing, the label check): seconds,
    and money at its price where it is behind an API that counts tokens."""
    costs = written["teacher_cost"].values()
    tokens_in = None if any(c["prompt_tokens"] is None for c in costs) else sum(c["prompt_tokens"] for c in costs)
    tokens_out = (
        None if any(c["generated_tokens"] is None for c in costs) else sum(c["generated_tokens"] for c in costs)
    )
    found = {**written, "gold_rows": gold_rows, "teacher_seconds": sum(c["seconds"] for c in costs), "cost": None}
    if price is not None and tokens_in is not None and tokens_out is not None:
        found["cost"] = {
            "currency": price.currency,
            "total": (tokens_in * price.input_per_million + tokens_out * price.output_per_million) / 1e6,
            "prompt_tokens": tokens_in,
            "generated_tokens": tokens_out,
        }
    return found


def distillation(
    report: dict,
    labelling: dict,
    generations: dict[str, list[dict]],
    gold_rows: int,
    train_seconds: float,
    teacher_is_reference: bool,
    price=None,
) -> dict:
    """What distillation bought: rows labelled and dropped, the teacher's time, the student's agreement with its
    teacher on the eval rows, and after how many answers the student's lower cost paid the labelling back."""
    found = {
        "teacher": labelling["teacher"],
        "inputs": labelling["inputs"],
        "labelled_rows": labelling["labelled"],
        "dropped_rows": labelling["dropped"],
        "gold_rows": gold_rows,
        "teacher_seconds": labelling["teacher_seconds"],
        "teacher_seconds_per_input": labelling["teacher_seconds_per_input"],
        "teacher_gold_agreement": labelling.get("teacher_gold_agreement"),
        "kept_gold_agreement": labelling.get("kept_gold_agreement"),
        "train_seconds": train_seconds,
        "agreement_with_teacher": None,
        "break_even_answers": None,
        "break_even_answers_with_training": None,
        "labelling_cost": None,
    }
    tokens_in, tokens_out = labelling.get("teacher_prompt_tokens"), labelling.get("teacher_generated_tokens")
    if price is not None and tokens_in is not None and tokens_out is not None:  # counted for a teacher behind an API
        found["labelling_cost"] = {
            "currency": price.currency,
            "total": (tokens_in * price.input_per_million + tokens_out * price.output_per_million) / 1e6,
            "prompt_tokens": tokens_in,
            "generated_tokens": tokens_out,
        }
    candidates = report["candidates"]
    if teacher_is_reference and "reference" in generations and "specialized" in generations:
        pairs = zip(generations["specialized"], generations["reference"], strict=True)
        found["agreement_with_teacher"] = sum(s["prediction"] == r["prediction"] for s, r in pairs) / len(
            generations["specialized"]
        )
        saving = (
            candidates["reference"]["seconds_per_example_p50"] - candidates["specialized"]["seconds_per_example_p50"]
        )
        if saving > 0:
            found["break_even_answers"] = math.ceil(labelling["teacher_seconds"] / saving)
            found["break_even_answers_with_training"] = math.ceil(
                (labelling["teacher_seconds"] + train_seconds) / saving
            )
    return found
