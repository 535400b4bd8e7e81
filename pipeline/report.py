"""Report stage: turn the evaluation into evidence a reader can decide on.

Reads evaluate/results.json and the generation caches (never a model), and writes
evaluate/report.json and evaluate/report.md: per candidate the task metric with a bootstrap 95%
confidence interval and what it costs to run; the specialized model against each other candidate on
the same rows (wins, losses, McNemar's exact p-value); the gap to the reference it closed; the gates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline import label_errors
from pipeline.errors import PipelineError
from pipeline.metrics import score_function
from pipeline.recipe import LoadedRecipe
from pipeline.render import html, tables
from pipeline.render.plots import clear_of, pyplot, save, tick_label
from pipeline.render.sweep import curve_markdown, sweep_markdown, write_curve_plot, write_sweep_plot
from pipeline.runs import (
    done_fingerprint,
    log,
    mark_done,
    stage_fingerprint,
    start_stage,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.stages.evaluate import read_generations
from pipeline.stats import bootstrap_ci, gap_closed, paired

STAGE = "report"
# 2: `validation`, the adapter training kept and the curve that chose it; 3: `sweep`, `learning_curve`, `confidence`
REPORT_SCHEMA_VERSION = 4


# --- building the report ------------------------------------------------------------------------


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


def metric_interval(name: str, scores: dict, texts: tuple[list, list] | None, settings, seed: int) -> tuple:
    """The bootstrap 95% interval of one metric's value: resampled per-row scores, or, for a metric that is
    not a mean of rows (macro F1), the metric recomputed on resampled (prediction, reference) rows."""
    recompute = None
    if not scores.get("mean_of_rows", True) and texts:
        score = score_function(name)
        predictions, references = texts

        def recompute(rows):
            return score([predictions[i] for i in rows], [references[i] for i in rows], settings.ignore_case)[0]

    return bootstrap_ci(scores["per_row"], settings.bootstrap_samples, seed, recompute)


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
        if variant.get("kind") == "gguf":
            found[name] = {"type": variant["type"], "tensor_types": variant["tensor_types"], **variant["fidelity"]}
    return found


def confidence_facts(results: dict, metric: str, generations: dict[str, list[dict]]) -> dict:
    """Per candidate that reported confidences: how sure it was when right and when wrong (by the gating
    metric's per-row score: 1 is right), and for each variant how its confidences agree with the
    specialized model's on the rows where both gave the same answer (the same definition in both runtimes,
    so a GGUF file should defer on the same rows as the model it was made from)."""
    import statistics

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


def labels_markdown(report: dict, limit: int = 20) -> list[str]:
    """Per label, the specialist's precision / recall / F1 beside the reference's F1 and the rows training had of
    it, the worst first; then what it mistakes for what."""
    found = report.get("labels")
    if not found or "specialized" not in found["candidates"]:
        return []
    mine = found["candidates"]["specialized"]
    theirs = found["candidates"].get("reference")
    train = found["train_rows"]
    worst = sorted(mine["per_label"].items(), key=lambda item: (item[1]["f1"], -item[1]["support"], item[0]))
    lines = [
        "## Errors by label",
        "",
        f"The specialist's labels, worst F1 first ({min(limit, len(worst))} of {len(worst)}), with the training "
        "rows each had: a label with few rows and many errors wants more examples.",
        "",
        "| label | training rows | eval rows | precision | recall | F1 | reference F1 | most often answered instead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    instead = {}
    for c in mine["confusions"]:
        instead.setdefault(c["expected"], c)
    for label, s in worst[:limit]:
        ref = theirs["per_label"].get(label, {}).get("f1") if theirs else None
        wrong = instead.get(label)
        shown = f"{_cell(wrong['answered'][:40])} ({wrong['rows']})" if wrong else "—"
        lines.append(
            f"| {_cell(label)} | {train.get(label, 0)} | {s['support']} | {_num(s['precision'])} | {_num(s['recall'])} "
            f"| {_num(s['f1'])} | {_num(ref)} | {shown} |"
        )
    if mine["confusions"]:
        pairs = ", ".join(
            f"{_cell(c['expected'])} → {_cell(c['answered'][:40])} ({c['rows']})" for c in mine["confusions"][:10]
        )
        lines += ["", f"Confusions that cost the most rows (expected → answered): {pairs}."]
    return [*lines, ""]


def json_fields_markdown(report: dict, limit: int = 20) -> list[str]:
    """json_match inside the object: per candidate the whole-object rate and field precision / recall / F1, then
    each field path's F1 (the most frequent first), so a reader sees which fields extraction gets wrong."""
    found = tables.json_fields(report, limit)
    if found is None:
        return []
    names = found["names"]
    lines = [
        "## JSON fields",
        "",
        "Fields by path (list items under `path[]`, order aside); F1 over every field of every row.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {what} | " + " | ".join(_num(v) for v in values) + " |" for what, values in found["overall"]]
    lines += ["", "| field (expected count) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for path, support, values in found["fields"]:
        lines.append(f"| `{path}` ({support}) | " + " | ".join(_num(v) for v in values) + " |")
    if found["more"]:
        lines.append(f"\n{found['more']} more fields in report.json (`metrics.json_match.per_field`).")
    return [*lines, ""]


def cascade_markdown(report: dict) -> list[str]:
    c = report.get("cascade")
    if not c:
        return []
    metric, rule = c["metric"], c["rule"]
    if c["reference_value"] is not None:
        low, high = c["reference_ci95"]
        alone = f"The reference alone: {metric} {c['reference_value']:.3f} [{low:.3f}, {high:.3f}]."
    else:
        alone = (
            f"The reference answered only the {c['reference_eval_rows']} of {c['eval_rows']} eval rows a cascade "
            "deferred (cascade.reference_answers: deferred_rows): its metric alone on the eval rows was not "
            "measured, nothing is paired with it, and the curve is drawn on the validation rows."
        )
    lines = [
        "## Cascade: the specialist where it is sure, the reference below a threshold",
        "",
        f"Below the threshold, requests go to the fallback: the reference, {c.get('fallback', 'evaluate.reference')}. "
        f"Each threshold was chosen on the {c['validation_rows']} validation rows (rule: {rule['rule']}; the "
        f"reference scores {c['reference_validation_value']:.4f} there) and then applied unchanged to the eval rows. "
        + alone,
        "",
        f"| cascade | threshold | {metric} (95% CI) | answered locally | vs reference alone (won/lost, p) "
        "| seconds per request: mean / p50 / p95 | cost / 1k answers | on validation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in c["candidates"].items():
        versus = f["versus_reference"]
        seconds = f.get("latency_seconds") or {"mean": f.get("latency_seconds_mean")}  # older results: the mean
        latency = " / ".join(_num(seconds.get(k), 3) for k in ("mean", "p50", "p95"))
        paired_with = "—" if versus is None else f"{versus['wins']}/{versus['losses']}, p={versus['p_value']:.2g}"
        cost = "—" if f.get("cost_per_1000_answers") is None else f"{f['cost_per_1000_answers']:.4g}"
        threshold = "defer all" if f["threshold"] is None or f["threshold"] == float("inf") else f"{f['threshold']:.4f}"
        lines.append(
            f"| {name} + reference | {threshold} | {f['value']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}] "
            f"| {f['share_local']:.1%} | {paired_with} "
            f"| {latency} | {cost} | {f['validation']['value']:.4f} at "
            f"{f['validation']['share_local']:.0%} local |"
        )
    lines += ["", "Seconds per request: each request waits for the local model, deferred ones for the reference too "
              "(from each model's timed single requests). ![coverage against accuracy](cascade.png)", ""]  # fmt: skip
    reliability = c["candidates"].get("specialized", {}).get("calibration")
    if reliability:
        lines += [
            f"Calibration of the specialist's confidence on the {reliability['rows']} validation rows: expected "
            f"calibration error {reliability['ece']:.3f} (0: a confidence of 0.8 is right 80% of the time).",
            "",
            "| confidence | rows | mean confidence | accuracy |",
            "|---|---|---|---|",
            *(
                f"| {b['low']:.1f}–{b['high']:.1f} | {b['rows']} | {b['confidence']:.3f} | {b['accuracy']:.3f} |"
                for b in reliability["bins"]
            ),
            "",
        ]
    wrong = sorted(c["candidates"].get("specialized", {}).get("confident_wrong") or [], key=lambda w: -w["confidence"])
    if wrong and "input" not in wrong[0]:  # a public bundle: the rows' text is left out
        rows = ", ".join(f"{w['row']} ({w['confidence']:.2f})" for w in wrong)
        lines += [f"Confident and wrong (answered locally, not deferred), row (confidence): {rows}.", ""]
    elif wrong:
        count = c["candidates"]["specialized"].get("confident_wrong_count", len(wrong))
        lines += [
            f"Answered locally and wrong: {count} rows, the errors this threshold lets through; the surest first.",
            "",
            "| row | confidence | input | expected | answered |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {w['row']} | {w['confidence']:.3f} | {_cell(w['input'][-60:])} | {_cell(w['expected'])} "
            f"| {_cell(w['answer'])} |"
            for w in wrong
        ]
        lines.append("")
    return lines


def write_cascade_plot(report: dict, path: Path) -> None:
    """The cascade's metric on the eval rows against the share answered locally, per cascade, with the chosen
    operating point and the reference alone."""
    plt = pyplot()
    c = report["cascade"]
    figure, axis = plt.subplots(figsize=(7, 4.6))
    on_eval = all(f.get("curve_rows", "eval") == "eval" for f in c["candidates"].values())
    for name, f in c["candidates"].items():
        curve = f["curve"]
        line = axis.plot(
            [p["share_local"] for p in curve], [p["value"] for p in curve], "-", label=f"{name} + reference"
        )
        point = f if on_eval else f["validation"]  # the chosen threshold, on the rows the curve is drawn on
        axis.plot([point["share_local"]], [point["value"]], "o", markersize=9, color=line[0].get_color())
    reference = c["reference_value"] if on_eval else c["reference_validation_value"]
    axis.axhline(reference, color="black", linestyle="--", linewidth=1, label="reference alone")
    axis.set_xlabel("share answered locally (threshold chosen on validation: dots)")
    axis.set_ylabel(f"{c['metric']} on the {'eval' if on_eval else 'validation'} rows")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9)
    axis.set_title(f"{report['recipe']}: cascade coverage against {c['metric']}")
    figure.tight_layout()
    save(figure, path, tight=False)


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


def render_markdown(report: dict, flips: list[dict], plot: str | None = None) -> str:
    metric = report["metric"]
    lines = [
        f"# {report['recipe']}: specialized vs base vs reference",
        "",
        f"Run `{report['run_id']}`, {report['eval_rows']} eval rows, same rows and greedy decoding for every "
        f"candidate; gates use `{metric}`. 95% bootstrap intervals in brackets. Latency: seconds per example "
        "amortized over a batch (llama.cpp answers one request at a time), and per single request (batch 1, "
        "after a warm-up) as a local user waits for one answer. CPU-s and J per 1,000 answers: over those single "
        "requests, the candidate's process's CPU time on all its threads (llama.cpp's included), and the energy "
        "counter's joules where the machine has one (rapl: the CPU packages, every process on them; nvml: the GPU)."
        + _endpoint_sentence(report)
        + _left_out_sentence(report),
        "",
        *candidates_table(report),
    ]
    lines += ["", "## Verdict", "", *verdict(report), ""]
    lines += validation_markdown(report)
    if report.get("sweep"):
        lines += sweep_markdown(report["sweep"], plot="sweep.png")
    if report.get("learning_curve"):
        lines += curve_markdown(report["learning_curve"], plot="curve.png")
    lines += distillation_markdown(report)
    lines += fidelity_markdown(report)
    lines += confidence_markdown(report)
    lines += labels_markdown(report)
    lines += json_fields_markdown(report)
    lines += cascade_markdown(report)
    if plot:
        lines += [f"![{metric} against peak memory and latency]({plot})", ""]
    lines += gates_markdown(report)
    for other in dict.fromkeys(flip["versus"] for flip in flips):
        lines += [
            f"## Rows that flipped: specialized vs {other}",
            "",
            f"| row | | input | expected | {other} | specialized |",
            "|---|---|---|---|---|---|",
        ]
        for flip in (f for f in flips if f["versus"] == other):
            lines.append(
                f"| {Path(flip['source']).name} | {flip['kind']} | {_cell(flip['input'][-60:])} "
                f"| {_cell(flip['expected'])} | {_cell(flip['other'])} "
                f"| {_cell(flip['specialized'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def _endpoint_sentence(report: dict) -> str:
    asked = [name for name, c in report["candidates"].items() if c.get("runtime") == "endpoint"]
    if not asked:
        return ""
    return (
        f" {', '.join(asked)} answered through an OpenAI-compatible API: its seconds per example are the wall time "
        "shared among the answers (several requests in flight), its single requests were timed one at a time here, "
        "its token counts are the server's, and its memory is the server's, not measured."
    )


def _left_out_sentence(report: dict) -> str:
    left_out = report.get("rows_left_out_empty")
    if not left_out:
        return ""
    parts = [f"{n} {split}" for split, n in left_out.items()]
    return f" Rows left out for an empty field (data.empty_rows: drop): {', '.join(parts)}."


def candidates_table(report: dict) -> list[str]:
    """Every candidate's scores with intervals, paired test against the specialist, and costs."""
    metric_names = list(next(iter(report["candidates"].values()))["metrics"])
    priced = any(c.get("cost_per_1000_answers") is not None for c in report["candidates"].values())
    lines = [
        "| candidate | role | runtime | " + " | ".join(metric_names) + " | specialized won/lost here (p) "
        "| parameters | size on disk | peak memory | s/example p50 | p95 | single request p50 | p95 "
        "| gen tokens/s | tokens in / out per answer | CPU-s / 1k answers | J / 1k answers |"
        + (" cost per 1,000 answers |" if priced else ""),
        "|---" * (len(metric_names) + 15 + priced) + "|",
    ]
    for name, c in report["candidates"].items():
        scores = " | ".join(
            f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
            for m in (c["metrics"][n] for n in metric_names)
        )
        comparison = report["comparisons"].get(name)
        versus = f"{comparison['wins']}/{comparison['losses']}, p={comparison['p_value']:.3g}" if comparison else "—"
        lines.append(
            f"| {name} | {c['role']} | {c.get('runtime', 'transformers')} | {scores} | {versus} "
            f"| {_millions(c.get('parameters'))} | {_mb(c['size_on_disk_bytes'])} | {_mb(c['peak_memory_bytes'])} "
            f"| {c['seconds_per_example_p50']:.4f} | {c['seconds_per_example_p95']:.4f} "
            f"| {_num(c.get('single_request_seconds_p50'), 4)} | {_num(c.get('single_request_seconds_p95'), 4)} "
            f"| {_num(c['generated_tokens_per_second'], 1)} "
            f"| {_num(c.get('prompt_tokens_per_example'), 1)} / {_num(c.get('generated_tokens_per_example'), 1)} "
            f"| {_num(c.get('cpu_seconds_per_1000_answers'), 1)} | {_joules(c)} |"
            + (f" {_money(c)} |" if priced else "")
        )
    return lines


def _joules(candidate: dict) -> str:
    """Energy per 1,000 answers and the counter it is from; where the machine exposes none, say so."""
    joules = candidate.get("joules_per_1000_answers")
    if joules is None:
        return "— (API)" if candidate.get("runtime") == "endpoint" else "— (no energy counter)"
    return f"{joules:,.0f} ({candidate.get('energy_counter')})"


def _money(candidate: dict) -> str:
    cost = candidate.get("cost_per_1000_answers")
    if cost is None:
        return "no per-token price" if candidate.get("runtime") != "endpoint" else "— (no price given)"
    return f"{candidate['price']['currency']} {cost:.4g}"


def gates_markdown(report: dict) -> list[str]:
    gates = report["gates"]
    if not gates["checks"]:
        return []
    lines = ["## Gates", ""]
    for gate, check in gates["checks"].items():
        mark = "PASS" if check["passed"] else "FAIL"
        lines.append(f"- **{mark}** `{gate}`: {_num(check['value'])} (threshold {check['threshold']})")
    return [*lines, ""]


def failed_gates(report: dict) -> list[str]:
    return [name for name, check in report["gates"]["checks"].items() if not check["passed"]]


def verdict(report: dict) -> list[str]:
    metric = report["metric"]
    c = report["candidates"]
    value = {name: c[name]["metrics"][metric]["value"] for name in c}
    said = []
    if "specialized" in value and "base" in value:
        said.append(
            f"- Specializing moved {metric} from {value['base']:.3f} (base) "
            f"to {value['specialized']:.3f} ({value['specialized'] - value['base']:+.3f})."
        )
    if "reference" in value and "specialized" in value:
        ref, spec = c["reference"], c["specialized"]
        said.append(f"- The reference scores {value['reference']:.3f}; gap closed: {_num(report['gap_closed'])}.")
        if spec["seconds_per_example_p50"] and ref["seconds_per_example_p50"]:
            speed = ref["seconds_per_example_p50"] / spec["seconds_per_example_p50"]
            said.append(f"- The specialized model answers {speed:.1f}x as fast as the reference per example.")
        if spec["peak_memory_bytes"] and ref["peak_memory_bytes"]:
            said.append(
                f"- It peaks at {spec['peak_memory_bytes'] / ref['peak_memory_bytes']:.2f}x the reference's memory."
            )
        saved = report.get("savings")
        if saved:
            currency = saved["currency"]
            fewer = saved["prompt_tokens_saved_per_answer"]
            said.append(
                f"- Cost: 1,000 answers from the reference cost {currency} {saved['reference_per_1000_answers']:.4g} "
                f"at its per-token price; the specialist answers on your own hardware with no per-token charge, "
                f"saving {currency} {saved['saved_per_1000_answers']:.4g} per 1,000 answers"
                + (f" (and {fewer:.0f} fewer prompt tokens per answer)." if fewer and fewer > 0 else ".")
            )
    spec = c.get("specialized")
    for name, candidate in c.items():
        if candidate["role"] != "quantized" or spec is None:
            continue
        parts = [f"{metric} {value[name]:.3f} ({value[name] - value['specialized']:+.3f} vs specialized)"]
        if spec.get("single_request_seconds_p50") and candidate.get("single_request_seconds_p50"):
            speed = spec["single_request_seconds_p50"] / candidate["single_request_seconds_p50"]
            parts.append(f"{speed:.1f}x the specialized model's single-request speed")
        if spec.get("size_on_disk_bytes") and candidate.get("size_on_disk_bytes"):
            parts.append(f"{candidate['size_on_disk_bytes'] / spec['size_on_disk_bytes']:.2f}x its size")
        said.append(f"- {name} ({candidate.get('runtime', 'transformers')}): " + ", ".join(parts) + ".")
    for name, check in report.get("fidelity", {}).items():
        if name == "merge" or not check:
            continue
        parity = check["token_parity"]
        if parity["identical"] != parity["prompts"]:
            said.append(
                f"- WARNING {name}: llama.cpp tokenizes {parity['prompts'] - parity['identical']} of "
                f"{parity['prompts']} prompts differently from training (see Fidelity)."
            )
        if not check["end_token"]["same"]:
            said.append(
                f"- WARNING {name}: the file's end token is not the one the specialist was trained to end with."
            )
    gates = report["gates"]
    if gates["checks"]:
        said.append("- Gates: " + ("all passed." if gates["passed"] else "FAILED; do not ship this run."))
    return said


def fidelity_markdown(report: dict) -> list[str]:
    fidelity = report.get("fidelity") or {}
    if not fidelity:
        return []
    lines = ["## Fidelity", ""]
    merge = fidelity.get("merge")
    if merge:
        lines += [
            f"Merge: the merged model agrees with base + adapter on {merge['top1_agreement']:.1%} of top-1 tokens "
            f"over {merge['positions']} positions of {merge['rows']} eval rows (largest logit difference "
            f"{merge['max_abs_logit_diff']:.2g}).",
            "",
        ]
    files = {name: check for name, check in fidelity.items() if name != "merge"}
    if files:
        candidates = report["candidates"]
        spec_stops = candidates.get("specialized", {}).get("stopped_at_end_token")
        lines += [
            "Each GGUF file against the merged model on the same tokens (teacher-forced eval rows): top-1 agreement "
            "and mean NLL over every position and over the answer positions alone; llama.cpp's tokenization of "
            "every eval prompt against training's; and how often generation ended at the end token "
            f"(specialized: {_pct(spec_stops)}).",
            "",
            "| file | type | tensor types written | top-1 agreement | on answers | NLL (merged) | answer NLL (merged) "
            "| prompts tokenized identically | end token as trained | stopped at end token |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, check in files.items():
            export, parity = check["export"], check["token_parity"]
            types = ", ".join(f"{count} {kind}" for kind, count in check["tensor_types"].items())
            lines.append(
                f"| {name} | {check['type']} | {types} | {export['top1_agreement']:.3f} "
                f"| {_num(export.get('answer_top1_agreement'))} | {export['nll']:.3f} ({export['nll_merged']:.3f}) "
                f"| {_num(export.get('answer_nll'))} ({_num(export.get('answer_nll_merged'))}) "
                f"| {parity['identical']}/{parity['prompts']} "
                f"| {'yes' if check['end_token']['same'] else 'NO'} "
                f"| {_pct(candidates.get(name, {}).get('stopped_at_end_token'))} |"
            )
        lines.append("")
    return lines


def confidence_markdown(report: dict) -> list[str]:
    facts = report.get("confidence") or {}
    if not facts:
        return []
    lines = [
        "## Confidence",
        "",
        "Each answer's probability under the model that gave it (the product of its tokens' probabilities, the "
        "end token included; the same definition in transformers and llama.cpp). A model that knows when it "
        "is unsure is surer when right than when wrong; a variant should be as sure as the model it was made "
        "from where they agree.",
        "",
        "| candidate | mean | when right | when wrong | same answer as specialized | abs difference there: median "
        "| p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in facts.items():
        versus = f.get("versus_specialized") or {}
        lines.append(
            f"| {name} | {f['mean']:.3f} | {_num(f['mean_when_right'])} | {_num(f['mean_when_wrong'])} "
            f"| {_pct(versus.get('same_answer')) if versus else '—'} | {_num(versus.get('median_abs_difference'), 4)} "
            f"| {_num(versus.get('p95_abs_difference'), 4)} |"
        )
    return lines + [""]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


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
                    "input": input_text(rows[i]),
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
    from pipeline import data

    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    generations = {
        name: read_generations(run_dir / "evaluate" / "generations" / f"{name}.jsonl") for name in results["candidates"]
    }
    return side_by_side(report, results, generations, data.load_rows(loaded.recipe.data, "eval"))


def side_by_side(report: dict, results: dict, generations: dict[str, list[dict]], rows: list) -> list[dict]:
    """Every eval row with each candidate's answer and whether the gating metric scored it right (1 per row)."""
    metric, labels = report["metric"], "labels" in report
    per_row = {name: r["metrics"][metric]["per_row"] for name, r in results["candidates"].items()}
    return [
        {
            "row": i,
            "source": row.source,
            "input": input_text(row),
            "expected": row.target.strip(),
            "label": row.target.strip() if labels else None,
            "answers": {name: generations[name][i]["prediction"] for name in report["candidates"]},
            "right": {name: per_row[name][i] >= 1 for name in report["candidates"]},
        }
        for i, row in enumerate(rows)
    ]


def input_text(row) -> str:
    """What the row asked: the prompt, or the last user turn of a conversation."""
    if row.messages is None:
        return row.prompt
    return next((m["content"] for m in reversed(row.messages) if m["role"] == "user"), "")


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str:
    """What the report is built from: the finished evaluation (and training, labelling) of this run."""
    return stage_fingerprint(
        STAGE,
        REPORT_SCHEMA_VERSION,
        done_fingerprint(run_dir / "evaluate"),
        done_fingerprint(run_dir / "train"),
        done_fingerprint(run_dir / "distill"),
        done_fingerprint(run_dir / "cascade"),
        # a sweep that chose this run, a learning curve drawn from it: sections of its report
        [_text(run_dir / name) for name in (SWEEP_FILE, CURVE_FILE)],
        # prices are not part of the run id: a new one only rebuilds the report
        [
            r.price.model_dump() if r and r.price else None
            for r in (loaded.recipe.evaluate.reference, loaded.recipe.teacher())
        ],
    )


SWEEP_FILE, CURVE_FILE = "sweep.json", "curve.json"  # written into the run folder by pipeline/sweep.py


def _text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def read(run_dir: Path) -> dict:
    return json.loads((run_dir / "evaluate" / "report.json").read_text())


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    from pipeline import data

    results_path = run_dir / "evaluate" / "results.json"
    if not results_path.is_file():
        raise PipelineError(f"{run_dir}: no evaluation results; run `make eval RECIPE={loaded.path}` first")
    start_stage(run_dir / STAGE)
    results = json.loads(results_path.read_text())
    generations = {
        name: read_generations(run_dir / "evaluate" / "generations" / f"{name}.jsonl") for name in results["candidates"]
    }
    splits = data.load_splits(loaded.recipe.data)  # read once: eval rows here, gold training rows below
    rows = splits.eval
    references = [row.target for row in rows]
    texts = {name: ([g["prediction"] for g in gens], references) for name, gens in generations.items()}
    quantize_result = run_dir / "quantize" / "result.json"
    quantized = json.loads(quantize_result.read_text()) if quantize_result.is_file() else None
    report = build_report(results, loaded, texts, quantized)
    distill_result = run_dir / "distill" / "result.json"
    if loaded.recipe.distill and distill_result.is_file():
        train_result = json.loads((run_dir / "train" / "result.json").read_text())
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
    train_result = run_dir / "train" / "result.json"
    if train_result.is_file():  # which adapter training kept, chosen on validation rows (never these eval rows)
        report["validation"] = json.loads(train_result.read_text()).get("validation")
    for key, name, plot in (("sweep", SWEEP_FILE, write_sweep_plot), ("learning_curve", CURVE_FILE, write_curve_plot)):
        if (run_dir / name).is_file():
            report[key] = json.loads((run_dir / name).read_text())
            plot(report[key], run_dir / "evaluate" / ("sweep.png" if key == "sweep" else "curve.png"))
    train_targets = [row.target for row in splits.train]
    if data.is_label_set(train_targets + references):  # which labels it gets wrong, as what; rows that taught it
        report["labels"] = label_errors.analysis(texts, train_targets, loaded.recipe.evaluate.ignore_case)
    left_out = {split: len(wheres) for split, wheres in splits.dropped_empty.items()}
    if left_out:
        report["rows_left_out_empty"] = left_out
    report["confidence"] = confidence_facts(results, report["metric"], generations)
    cascade_result = run_dir / "cascade" / "result.json"
    if loaded.recipe.cascade is not None and cascade_result.is_file():
        reference = loaded.recipe.evaluate.reference
        report["cascade"] = cascade_facts(json.loads(cascade_result.read_text()), report, reference)
        gate = loaded.recipe.evaluate.gates.cascade_min
        if gate is not None:
            value = report["cascade"]["candidates"].get("specialized", {}).get("value")
            passed = value is not None and value >= gate
            report["gates"]["checks"]["cascade_min"] = {"threshold": gate, "value": value, "passed": passed}
            report["gates"]["passed"] = report["gates"]["passed"] and passed
        write_cascade_plot(report, run_dir / "evaluate" / "cascade.png")
    flips = [flip for other in ("base", "reference") for flip in flipped_rows(report, generations, rows, other)]
    report["flipped_rows"] = flips
    write_json_atomic(run_dir / "evaluate" / "report.json", report)
    plot_path = run_dir / "evaluate" / "report.png"
    write_plot(report, plot_path)
    write_text_atomic(run_dir / "evaluate" / "report.md", render_markdown(report, flips, plot_path.name))
    html.write(
        report, verdict(report), side_by_side(report, results, generations, rows), run_dir / "evaluate" / "report.html"
    )
    from pipeline import tracking

    tracking.log_report(loaded, run_dir, report)
    mark_done(run_dir / STAGE, fingerprint(loaded, run_dir))
    log(STAGE, f"wrote {run_dir / 'evaluate' / 'report.md'}")
    return report


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


def validation_markdown(report: dict) -> list[str]:
    """Which adapter the run kept, and the validation curve that chose it."""
    v = report.get("validation")
    if not v:
        return []
    lines = ["## Validation while training", "", f"Rows: {v.get('source')}. Adapter kept: {v['why']}.", ""]
    if v.get("curve"):
        lines += [f"| step | epoch | validation {v['metric']} | |", "|---|---|---|---|"]
        lines += [
            f"| {e['step']} | {e['epoch']:g} | {e['value']:.4f} | {'kept' if e['step'] == v['chosen_step'] else ''} |"
            for e in v["curve"]
        ]
        lines += ["", f"The passes took {v['seconds']:.1f} s in all.", ""]
    return lines


def distillation_markdown(report: dict) -> list[str]:
    d = report.get("distillation")
    if not d:
        return []
    metric = report["metric"]
    lines = [
        "## Distillation",
        "",
        f"- The teacher ({d['teacher']}) labelled {d['labelled_rows']} of {d['inputs']} inputs ({d['dropped_rows']} "
        f"dropped) in {d['teacher_seconds']:.0f} s ({d['teacher_seconds_per_input']:.2f} s an input); the student "
        f"trained on those and {d['gold_rows']} gold rows.",
    ]
    if d.get("teacher_gold_agreement") is not None:
        lines.append(
            f"- The inputs carried gold answers (not used for training): the teacher gave them for "
            f"{d['teacher_gold_agreement']:.1%} of the inputs, and for {_pct(d.get('kept_gold_agreement'))} of the "
            "rows kept for training, which bounds what a student of these labels can learn."
        )
    if d["agreement_with_teacher"] is not None:
        student = report["candidates"]["specialized"]["metrics"][metric]["value"]
        teacher = report["candidates"]["reference"]["metrics"][metric]["value"]
        lines.append(
            f"- On the eval rows the student gives its teacher's answer {d['agreement_with_teacher']:.1%} of the time; "
            f"{metric} against the gold answers: student {student:.3f}, teacher {teacher:.3f}."
        )
    cost = d.get("labelling_cost")
    if cost:
        lines.append(
            f"- Labelling cost {cost['currency']} {cost['total']:.4g} at the teacher's price "
            f"({cost['prompt_tokens']:,} prompt and {cost['generated_tokens']:,} answer tokens), once: the student's "
            "answers have no per-token charge."
        )
    if d["break_even_answers"] is not None:
        lines.append(
            f"- Break-even: after {d['break_even_answers']:,} answers the student's lower cost per answer has paid "
            f"back the labelling ({d['break_even_answers_with_training']:,} with its {d['train_seconds']:.0f} s of "
            "training)."
        )
    return lines + [""]


def write_plot(report: dict, path: Path) -> None:
    """The metric against peak memory and against single-request latency, one point per candidate with its
    95% CI; each candidate has its own color and marker, named in the legend (labels beside points collide
    when quantized variants sit close together)."""
    import matplotlib.ticker

    plt = pyplot()

    metric = report["metric"]
    candidates = report["candidates"]
    single = all(c.get("single_request_seconds_p50") for c in candidates.values())
    latency_key = "single_request_seconds_p50" if single else "seconds_per_example_p50"
    latency_label = "seconds per single request, p50 (log)" if single else "seconds per example, p50 (log)"
    role_colors = {"base": "tab:gray", "specialized": "tab:green", "reference": "tab:blue"}
    other_colors = iter(["tab:olive", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:red"] * 3)
    markers = iter("osD^vP*Xhp<>" * 3)
    style = {name: (role_colors.get(c["role"]) or next(other_colors), next(markers)) for name, c in candidates.items()}
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for axis, key, label in (
        (axes[0], "peak_memory_bytes", "peak memory (MB, log)"),
        (axes[1], latency_key, latency_label),
    ):
        labelled: list[tuple[float, float]] = []
        for name, c in candidates.items():
            if c.get(key) is None:  # an API's memory is on its server, not measured here
                continue
            m = c["metrics"][metric]
            x = max(c[key] / 1e6 if key.endswith("bytes") else c[key], 1e-6)
            error = [[m["value"] - m["ci95"][0]], [m["ci95"][1] - m["value"]]]
            color, marker = style[name]
            runtime = f" ({c['runtime']})" if c.get("runtime") == "llama.cpp" else ""
            axis.errorbar(
                [x], [m["value"]], yerr=error, fmt=marker, capsize=4, color=color, markersize=7, label=name + runtime
            )
            # the number itself beside its point, where it does not fall on another's (the ticks read the rest)
            if clear_of(x, m["value"], labelled):
                value = f"{x:,.0f} MB" if key.endswith("bytes") else f"{x:.3g} s"
                axis.annotate(value, (x, m["value"]), textcoords="offset points", xytext=(6, -10), fontsize=7)
                labelled.append((x, m["value"]))
        axis.set_xscale("log")
        # log axes with ticks a reader can read: 1, 2, 5 per decade, written as plain numbers
        axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: tick_label(v)))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    handles, labels = axes[1].get_legend_handles_labels()  # every candidate has a latency; an API has no memory here
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.86, 0.5), fontsize=9, frameon=False)
    figure.suptitle(f"{report['recipe']}: {metric} vs what it costs to run ({report['eval_rows']} rows)")
    figure.tight_layout(rect=(0, 0, 0.86, 1))
    save(figure, path)  # tight: the legend sits outside the axes


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f} MB"


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _millions(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}M"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:80]
