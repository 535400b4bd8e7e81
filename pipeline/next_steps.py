"""What would most likely help next, each point read from the run's own evidence (its report), with the figure
that supports it: a validation curve still rising at its last pass, a learning curve that has not flattened,
labels thin in training and often confused, answers outside the label set, answers cut off at max_new_tokens, a
quantized file that loses more than its siblings, a larger base a sweep found better, a teacher's rows that did not
pay against the seed-only specialist or that its own check thinned, a refit that did worse than the adapter
validation chose. Where nothing stands out,
it says so. No I/O: the report stage calls `next_steps(report)` on the report it is about to write.
"""

from __future__ import annotations

import statistics

# A rise of at least this many validation rows' worth between the last two passes counts as "still rising"; one
# row is within what a different checkpoint of the same model flips by chance.
MIN_ROWS_RISE = 2
# A label is thin when it has at most this share of the median label's training rows.
THIN_SHARE = 0.5
# A label is often confused when the specialist's recall on it is this far below its metric on all rows.
RECALL_GAP = 0.1
# A quantized file loses more than its siblings when its drop from the specialist is this much larger than theirs
# and its paired comparison with the specialist is significant at this level.
EXTRA_DROP = 0.02
SIGNIFICANT = 0.05


def next_steps(report: dict) -> list[dict]:
    """Each point: `kind`, `advice` (what to do, naming the recipe field), `evidence` (the figure behind it)."""
    found = [
        *_still_rising(report),
        *_curve_not_flat(report),
        *_thin_and_confused(report),
        *_outside_labels(report),
        *_cut_off(report),
        *_quantized_outlier(report),
        *_larger_base(report),
        *_synthetic_rows(report),
        *_refit_lost(report),
    ]
    if found:
        return found
    return [{"kind": "nothing", "advice": "nothing in this run's evidence stands out", "evidence": _checked(report)}]


def _checked(report: dict) -> str:
    """What was read and found unremarkable, so "nothing" says how much evidence it rests on."""
    checked = []
    if (report.get("validation") or {}).get("curve"):
        checked.append("the validation curve levelled off or reached its ceiling")
    if report.get("learning_curve"):
        checked.append("the learning curve flattened with the specialist at or above the reference")
    if report.get("labels"):
        checked.append("no label is both thin in training and missed, and every answer is one of the labels")
    if report.get("answers"):
        checked.append("no answer was cut off at evaluate.max_new_tokens")
    if sum(1 for c in report["candidates"].values() if c["role"] == "quantized") > 1:
        checked.append("the quantized files lose alike")
    return "; ".join(checked) or "this run has no validation curve, learning curve or per-label errors to read"


# A label the teacher's blind check thinned: at most this share of the rows asked for it were kept.
THINNED_SHARE = 0.5


def _synthetic_rows(report: dict) -> list[dict]:
    """Where a teacher wrote rows: whether they paid against the seed-only specialist, and labels its own label
    check thinned (the teacher does not write what it itself recognizes as that label)."""
    synthesis = report.get("synthesis")
    if not synthesis:
        return []
    found = []
    metric, candidates = report["metric"], report["candidates"]
    comparison = report.get("comparisons", {}).get("seed-only")
    if comparison is not None and "seed-only" in candidates:
        mine = candidates["specialized"]["metrics"][metric]["value"]
        seeds = candidates["seed-only"]["metrics"][metric]["value"]
        if mine <= seeds or comparison["p_value"] >= SIGNIFICANT:
            found.append(
                {
                    "kind": "synthetic_rows_did_not_pay",
                    "advice": "the teacher's rows bought nothing measurable: label real rows instead (`specialist "
                    "suggest` picks which), or use a stronger teacher (synthesize.teacher)",
                    "evidence": f"{metric} {mine:.3f} with them against {seeds:.3f} on the seed rows alone (won "
                    f"{comparison['wins']}, lost {comparison['losses']}, p = {comparison['p_value']:.2g})",
                }
            )
    thinned = {
        label: counts
        for label, counts in synthesis["balance"].items()
        if counts["asked"] and counts["kept"] <= THINNED_SHARE * counts["asked"]
    }
    if thinned:
        shown = ", ".join(f"{label} {c['kept']} of {c['asked']}" for label, c in sorted(thinned.items())[:5])
        found.append(
            {
                "kind": "synthetic_labels_thinned",
                "advice": "describe these labels (synthesize.description) or give them more seed rows: the checks "
                "kept few of the rows the teacher wrote for them",
                "evidence": f"rows kept of those asked: {shown}",
            }
        )
    return found


def _refit_lost(report: dict) -> list[dict]:
    """train.refit shipped an adapter that is significantly worse than the one validation chose."""
    comparison = report.get("comparisons", {}).get("before-refit")
    if comparison is None or comparison["losses"] <= comparison["wins"] or comparison["p_value"] >= SIGNIFICANT:
        return []
    metric, candidates = report["metric"], report["candidates"]
    mine, before = (candidates[n]["metrics"][metric]["value"] for n in ("specialized", "before-refit"))
    return [
        {
            "kind": "refit_lost",
            "advice": "turn off train.refit: the adapter validation chose did better than the one trained again on "
            "the validation rows too (the refit stops at the chosen point of a longer schedule; on this task that "
            "point did not carry over)",
            "evidence": f"{metric} {mine:.3f} refitted against {before:.3f} before the refit (won "
            f"{comparison['wins']}, lost {comparison['losses']}, p = {comparison['p_value']:.2g})",
        }
    ]


def _still_rising(report: dict) -> list[dict]:
    validation = report.get("validation") or {}
    curve = validation.get("curve") or []
    rows = validation.get("rows") or 0
    if len(curve) < 2 or not rows or validation.get("stopped_early"):
        return []
    before, last = curve[-2], curve[-1]
    if before["value"] is None or last["value"] is None or last["value"] >= 1.0:
        return []
    rise = last["value"] - before["value"]
    if rise < MIN_ROWS_RISE / rows:
        return []
    metric = validation.get("metric") or report["metric"]
    return [
        {
            "kind": "train_longer",
            "advice": "train longer (train.epochs; with train.select: best the best pass is kept): the validation "
            "curve was still rising at its last pass",
            "evidence": f"validation {metric} {before['value']:.3f} at step {before['step']} → {last['value']:.3f} at "
            f"step {last['step']}, the last pass ({rise * rows:.0f} more of {rows} validation rows right)",
        }
    ]


def _curve_not_flat(report: dict) -> list[dict]:
    curve = report.get("learning_curve")
    if not curve or curve.get("flattened") is None:
        return []
    gain, last = curve.get("last_doubling_gain"), curve["points"][-1]
    metric = report["metric"]
    if curve["flattened"]:
        reference = (report["candidates"].get("reference") or {}).get("metrics", {}).get(metric, {}).get("value")
        if reference is None or last["value"] >= reference:
            return []
        return [
            {
                "kind": "rows_will_not_help",
                "advice": "more rows of this kind are unlikely to close the gap to the reference: a larger base "
                "(model.base, or a sweep over it), better labels or a better prompt are the levers left",
                "evidence": f"the learning curve flattened: the last step up in rows gained {gain:+.3f}, inside the "
                f"last point's interval; {metric} {last['value']:.3f} against the reference's {reference:.3f}",
            }
        ]
    projection = curve.get("projection") or {}
    target = curve.get("target")
    need = (
        f"; about {projection['rows']:,.0f} rows projected for {metric} {target:g}"
        if target is not None and projection.get("rows")
        else ""
    )
    validation = report.get("validation") or {}
    held = (
        f"; the {validation['rows']} validation rows are such rows: train.refit trains the shipped adapter on them too"
        if validation.get("rows") and not validation.get("refit")
        else ""
    )
    return [
        {
            "kind": "more_rows",
            "advice": (
                "more rows from the teacher (synthesize.per_label) are still paying"
                if curve.get("over") == "synthesized"
                else f"more training rows of this kind (labelled, or a teacher's: distill:) are still paying{held}"
            ),
            "evidence": f"the learning curve has not flattened: the last doubling to {last['rows']:,} rows gained "
            f"{gain:+.3f} {metric}, more than the last point's interval{need}",
        }
    ]


def _thin_and_confused(report: dict) -> list[dict]:
    labels = report.get("labels") or {}
    train_rows = labels.get("train_rows") or {}
    mine = (labels.get("candidates") or {}).get("specialized")
    value = ((report["candidates"].get("specialized") or {}).get("metrics", {}).get(report["metric"]) or {}).get(
        "value"
    )
    if not train_rows or not mine or value is None:
        return []
    median = statistics.median(train_rows.values())
    found = []
    for label, facts in mine["per_label"].items():
        rows, recall = train_rows.get(label, 0), facts.get("recall")
        if recall is None or rows > THIN_SHARE * median or recall > value - RECALL_GAP:
            continue
        taken_for = [c for c in mine.get("confusions", []) if c["expected"] == label][:2]
        as_what = (
            "; answered as " + ", ".join(f"{c['answered']!r} on {c['rows']}" for c in taken_for) if taken_for else ""
        )
        found.append(
            {
                "kind": "thin_label",
                "advice": f"label more rows of {label!r} (data.train): it has few training rows and the specialist "
                "misses it",
                "evidence": f"{rows} training rows against a median of {median:g} per label; recall {recall:.3f} on "
                f"{facts['support']} eval rows against {value:.3f} overall{as_what}",
            }
        )
    return found


def _outside_labels(report: dict) -> list[dict]:
    labels = report.get("labels") or {}
    mine = (labels.get("candidates") or {}).get("specialized")
    known = set(labels.get("train_rows") or {}) | set((mine or {}).get("per_label") or {})
    if not mine or not known:
        return []
    outside = [c for c in mine.get("confusions", []) if c["answered"] not in known]
    count = sum(c["rows"] for c in outside)
    if not count:
        return []
    examples = ", ".join(repr(c["answered"]) for c in outside[:3])
    return [
        {
            "kind": "outside_labels",
            "advice": "the specialist answers with labels that do not exist: more training rows of the labels it "
            "confuses, or more epochs, teach it the label set",
            "evidence": f"{count} of {report['eval_rows']} answers {'is' if count == 1 else 'are'} none of the "
            f"{len(known)} labels (e.g. {examples}); each counts as wrong",
        }
    ]


def _cut_off(report: dict) -> list[dict]:
    answers = report.get("answers") or {}
    mine = (answers.get("candidates") or {}).get("specialized") or {}
    count = (mine.get("cut_off") or {}).get("count")
    if not count:
        return []
    return [
        {
            "kind": "cut_off",
            "advice": "answers cut off before their end token: raise evaluate.max_new_tokens if the expected answers "
            "are that long, else the specialist repeats itself and more training (epochs, rows) is the fix",
            "evidence": f"{count} of {report['eval_rows']} specialist answers reached evaluate.max_new_tokens "
            f"({answers.get('max_new_tokens', '?')}) before the end token",
        }
    ]


def _quantized_outlier(report: dict) -> list[dict]:
    metric, candidates = report["metric"], report["candidates"]
    if "specialized" not in candidates:
        return []
    spec = candidates["specialized"]["metrics"][metric]["value"]
    drops = {
        name: spec - c["metrics"][metric]["value"]
        for name, c in candidates.items()
        if c["role"] == "quantized" and c["metrics"][metric]["value"] is not None
    }
    if len(drops) < 2 or spec is None:
        return []
    found = []
    for name, drop in drops.items():
        others = [d for other, d in drops.items() if other != name]
        versus = (report.get("comparisons") or {}).get(name) or {}
        p_value = versus.get("p_value")
        if drop - statistics.median(others) < EXTRA_DROP or p_value is None or p_value >= SIGNIFICANT:
            continue
        best = min((other for other in drops if other != name), key=lambda other: drops[other])
        found.append(
            {
                "kind": "quantized_outlier",
                "advice": f"ship {best} rather than {name}: {name} loses more than the other quantized files",
                "evidence": f"{name} {candidates[name]['metrics'][metric]['value']:.3f} against the specialist's "
                f"{spec:.3f} (the specialist right where it was wrong on {versus['wins']} rows, wrong where it was "
                f"right on {versus['losses']}, p = {p_value:.2g}); {best} drops {drops[best]:+.3f}",
            }
        )
    return found


def _larger_base(report: dict) -> list[dict]:
    sweep = report.get("sweep") or {}
    done = [t for t in sweep.get("trials", []) if t.get("status") == "done" and t.get("value") is not None]
    if not any("model.base" in (t.get("settings") or {}) for t in done) or len(done) < 2:
        return []
    best = max(done, key=lambda t: t["value"])
    chosen = next((t for t in done if t["index"] == sweep.get("chosen")), None)
    if chosen is None or best["index"] == chosen["index"]:
        return []
    metric = sweep.get("metric") or report["metric"]
    return [
        {
            "kind": "larger_base",
            "advice": f"the sweep shipped the smaller base by its ship rule; if {best['value'] - chosen['value']:+.3f} "
            f"{metric} matters more than its cost, ship {best['settings']['model.base']}",
            "evidence": f"validation {metric}: {best['settings']['model.base']} {best['value']:.3f} "
            f"[{best['ci95'][0]:.3f}, {best['ci95'][1]:.3f}] against the shipped {chosen['value']:.3f} "
            f"[{chosen['ci95'][0]:.3f}, {chosen['ci95'][1]:.3f}]",
        }
    ]
