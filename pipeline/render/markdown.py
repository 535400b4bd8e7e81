"""report.md: the report stage's evidence as Markdown tables and sentences (report.json is the source of every
number; report.html and the model card reuse these sections)."""

from __future__ import annotations

from pathlib import Path

from pipeline.render import tables
from pipeline.render.sweep import curve_markdown, sweep_markdown


def render_markdown(report: dict, flips: list[dict], plot: str | None = None) -> str:
    metric = report["metric"]
    lines = [
        f"# {tables.title(report)}",
        "",
        f"Run `{report['run_id']}`, {report['eval_rows']} eval rows, same rows and greedy decoding for every "
        f"candidate; gates use `{metric}`. 95% bootstrap intervals in brackets. Latency: seconds per example "
        "amortized over a batch of evaluate.batch_size rows (PyTorch: left-padded; llama.cpp: one sequence per row "
        "in one context), and per single request (batch 1, after a warm-up) as a local user waits for one answer; "
        "peak memory: PyTorch's over the whole evaluation, llama.cpp's while serving one request at a time. "
        "Runtime: the precision each computed in (a PyTorch dtype, a GGUF file's type). "
        "CPU-s and J per 1,000 answers: over those single "
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
    lines += synthesis_markdown(report)
    lines += distillation_markdown(report)
    lines += fidelity_markdown(report)
    lines += shared_base_markdown(report)
    lines += confidence_markdown(report)
    lines += labels_markdown(report)
    lines += json_fields_markdown(report)
    lines += answers_markdown(report)
    lines += cascade_markdown(report)
    if plot:
        lines += [f"![{metric} against peak memory and latency]({plot})", ""]
    lines += gates_markdown(report)
    lines += next_steps_markdown(report)
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
            f"| {name} | {c['role']} | {tables.runtime_cell(c)} | {scores} | {versus} "
            f"| {_millions(c.get('parameters'))} | {_size(c)} | {_mb(c['peak_memory_bytes'])} "
            f"| {c['seconds_per_example_p50']:.4f} | {c['seconds_per_example_p95']:.4f} "
            f"| {_num(c.get('single_request_seconds_p50'), 4)} | {_num(c.get('single_request_seconds_p95'), 4)} "
            f"| {_num(c['generated_tokens_per_second'], 1)} "
            f"| {_num(c.get('prompt_tokens_per_example'), 1)} / {_num(c.get('generated_tokens_per_example'), 1)} "
            f"| {_num(c.get('cpu_seconds_per_1000_answers'), 1)} | {_joules(c)} |"
            + (f" {_money(c)} |" if priced else "")
        )
    return lines


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
        if candidate.get("shared_base_bytes"):  # an adapter GGUF: what it adds, and the base it shares
            parts.append(f"an adapter of {_mb(candidate['size_on_disk_bytes'])} on a shared base of "
                         f"{_mb(candidate['shared_base_bytes'])}")  # fmt: skip
        elif spec.get("size_on_disk_bytes") and candidate.get("size_on_disk_bytes"):
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


def gates_markdown(report: dict) -> list[str]:
    gates = report["gates"]
    if not gates["checks"]:
        return []
    lines = ["## Gates", ""]
    for gate, check in gates["checks"].items():
        mark = "PASS" if check["passed"] else "FAIL"
        lines.append(f"- **{mark}** `{gate}`: {_num(check['value'])} (threshold {check['threshold']})")
    return [*lines, ""]


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
    return lines + refit_markdown(report)


def refit_markdown(report: dict) -> list[str]:
    """train.refit: where the second training stopped, and what it bought against the adapter validation chose."""
    refit = (report.get("validation") or {}).get("refit")
    if not refit:
        return []
    trained = (
        f" It trained on {refit['rows']} rows ({refit['validation_rows_added']} of them the validation rows) in "
        f"{refit['train_seconds']:.1f} s; its adapter is the one shipped."
        if refit.get("refitted")
        else ""
    )
    lines = [f"Refit (train.refit): {refit['why']}.{trained}", ""]
    bought = _refit_line(report)
    return lines + ([bought, ""] if bought else [])


def _refit_line(report: dict) -> str | None:
    """What the refit bought: the shipped adapter against the one validation chose, paired on the same eval rows."""
    return _paired_line(
        report, "before-refit", "What the refit bought", "refitted", "for the adapter validation chose (candidate "
        "before-refit)", prefix=""
    )  # fmt: skip


def _paired_line(report: dict, other: str, what: str, mine_as: str, other_as: str, prefix: str = "- ") -> str | None:
    """`what`: the specialist's metric against the candidate `other`'s, both with intervals, and their paired test
    on the same eval rows; None where the report lacks either or the comparison."""
    candidates, metric = report.get("candidates", {}), report.get("metric")
    comparison = report.get("comparisons", {}).get(other)
    if other not in candidates or "specialized" not in candidates or comparison is None:
        return None
    mine, theirs = (candidates[n]["metrics"][metric] for n in ("specialized", other))
    return (
        f"{prefix}{what}: {metric} {mine['value']:.3f} [{mine['ci95'][0]:.3f}, {mine['ci95'][1]:.3f}] {mine_as} "
        f"against {theirs['value']:.3f} [{theirs['ci95'][0]:.3f}, {theirs['ci95'][1]:.3f}] {other_as}; on the same "
        f"{report['eval_rows']} eval rows it wins {comparison['wins']} and loses {comparison['losses']} (p = "
        f"{comparison['p_value']:.2g}, {comparison['test'].replace('_', ' ')})."
    )


REASONS = {
    "empty": "Empty",
    "duplicate": "Duplicates of another new row",
    "near_duplicate": "Near-duplicates of another new row",
    "copy_of_seed": "Copies (or near copies) of a seed row",
    "contamination": "Contamination: equal or near-equal to an eval or validation row",
    "label_disagrees": "Labelled otherwise by the teacher's blind check",
    "answer_empty": "Answered with nothing by the teacher",
    "answer_not_json": "Answered by the teacher with no JSON",
    "answer_shape": "Answered by the teacher without a key every seed answer has",
}


def synthesis_markdown(report: dict) -> list[str]:
    s = report.get("synthesis")
    if not s:
        return []
    score, check, div = s["teacher_score"], s["label_check"], s["diversity"]
    low, high = score["interval"]
    lines = [
        "## Synthetic rows",
        "",
        f"- The teacher ({s['teacher']}, {s['teacher_runtime']}) was scored first: "
        + (
            f"it scores {score['metric']} {score['accuracy']:.3f} [{low:.3f}, {high:.3f}] on the {score['rows']} "
            f"{score['on']} rows."
            if score.get("metric")
            else f"it labels {score['accuracy']:.3f} [{low:.3f}, {high:.3f}] of the {score['rows']} {score['on']} "
            "rows right."
        ),
        f"- Asked for {s['rows_asked']} rows in {s['asks']} asks "
        + (
            f"(inputs; the teacher then answered each{_json_keys(s)})"
            if s.get("answers", "labels") != "labels"
            else f"over {len(s['labels'])} labels"
        )
        + f", from {s['seed_rows']} seed rows; it wrote {s['rows_written']}, the checks kept {s['rows_kept']}; the "
        f"specialist trained on those and {s['gold_rows']} gold rows.",
    ]
    if s.get("proposed_variations"):
        lines.append(
            f"- Variations the teacher proposed ({len(s['proposed_variations'])}, beside the recipe's): "
            + "; ".join(f'"{_cell(v[:100])}"' for v in s["proposed_variations"])
            + "."
        )
    for reason, count in sorted(s["dropped"].items(), key=lambda item: -item[1]):
        example = s["dropped_examples"].get(reason, [{}])[0]
        asked = f", asked as {example['label']}" if example.get("label") is not None else ""
        shown = f' (e.g. "{_cell(example["text"][:80])}"{asked})' if example else ""
        lines.append(f"- {REASONS.get(reason, reason)}: {count} dropped{shown}.")
    if check["agreement"] is not None:
        worst = sorted(check["per_label"].items(), key=lambda item: item[1])[:3]
        lines.append(
            f"- Label check ({check['mode']}): the teacher, blind to the label asked, gave it for "
            f"{check['agreement']:.1%} of the rows it checked; lowest: "
            + ", ".join(f"{label} {share:.0%}" for label, share in worst)
            + (f"; {check['relabelled']} relabelled" if check["relabelled"] else "")
            + "."
        )
    if div["distinct_2"] is not None:
        nearest = (
            f"; median similarity to the nearest other new row {div['nearest_within_median']:.2f}, to the nearest "
            f"seed {div['nearest_seed_median']:.2f}"
            if div.get("nearest_within_median") is not None and div.get("nearest_seed_median") is not None
            else ""
        )
        seeds = f" (the seeds: {div['seeds_distinct_2']:.2f})" if div.get("seeds_distinct_2") is not None else ""
        lines.append(f"- Diversity: distinct bigrams {div['distinct_2']:.2f}{seeds}{nearest}.")
    lengths = s["lengths"]
    if lengths["kept"] and lengths["held_out"]:
        lines.append(
            f"- Words per row (median, 5th-95th percentile): new {_span(lengths['kept'])}, seeds "
            f"{_span(lengths['seeds'])}, eval and validation rows {_span(lengths['held_out'])}."
        )
    bought = _seed_only_line(report)
    if bought:
        lines.append(bought)
    cost = s.get("cost")
    spent = f"; {cost['currency']} {cost['total']:.4g} at its price" if cost else ""
    lines.append(f"- Teacher time {s['teacher_seconds']:.0f} s (scoring, writing and checking){spent}.")
    if not s["balance"]:  # answered tasks: no labels to balance
        return lines + [""]
    lines += ["", "| label | asked | kept | a kept row |", "|---|---|---|---|"]
    for label, counts in s["balance"].items():
        sample = (s["sample"].get(label) or [""])[0]
        lines.append(f"| {_cell(label)} | {counts['asked']} | {counts['kept']} | {_cell(sample[:80])} |")
    return lines + [""]


def _json_keys(s: dict) -> str:
    keys = s.get("json_keys")
    return f", as JSON with the keys {', '.join(keys)}" if keys else ""


def _seed_only_line(report: dict) -> str | None:
    """What the teacher's rows bought: the specialist against the seed-only one, paired on the same eval rows."""
    return _paired_line(
        report, "seed-only", "What the rows bought", "with them", "for the same specialist trained on the seed rows "
        "alone"
    )  # fmt: skip


def _span(lengths: dict | None) -> str:
    return f"{lengths['p50']:g} ({lengths['p05']}-{lengths['p95']})" if lengths else "-"


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
            kind = f"{check['type']} adapter on a {check['base']['type']} base" if "base" in check else check["type"]
            lines.append(
                f"| {name} | {kind} | {types} | {export['top1_agreement']:.3f} "
                f"| {_num(export.get('answer_top1_agreement'))} | {export['nll']:.3f} ({export['nll_merged']:.3f}) "
                f"| {_num(export.get('answer_nll'))} ({_num(export.get('answer_nll_merged'))}) "
                f"| {parity['identical']}/{parity['prompts']} "
                f"| {'yes' if check['end_token']['same'] else 'NO'} "
                f"| {_pct(candidates.get(name, {}).get('stopped_at_end_token'))} |"
            )
        for name, check in files.items():
            twin = check.get("versus_merged_gguf")
            if twin:
                lines.append(
                    f"\n{name} (the adapter applied by llama.cpp) against {twin['variant']} (the merge written as one "
                    f"file of the same type): top-1 agreement {twin['top1_agreement']:.3f} over {twin['positions']} "
                    f"positions, {_num(twin['answer_top1_agreement'])} on the answers."
                )
        lines.append("")
    return lines


def shared_base_markdown(report: dict) -> list[str]:
    """What N specialists cost on one device: N merged GGUF files, or one base GGUF with N adapters."""
    found = report.get("shared_base") or {}
    if not found:
        return []
    lines = ["## One base, many specialists", ""]
    for name, f in found.items():
        merged = (
            f["merged_variant"] or f"a merged {f['base_type']} file (the base file's size: same tensors, same type)"
        )
        agreement = f["answer_agreement_with_merged"]
        lines += [
            f"{name}: this run's adapter ({_mb(f['adapter_bytes'])}) on the {f['base_type']} base "
            f"({_mb(f['base_bytes'])}, shared by every run on this base), against {merged} "
            f"({_mb(f['merged_bytes'])})"
            + (f"; the two give the same answer on {agreement:.1%} of the eval rows." if agreement is not None else ".")
            + " Memory: merged files each in their own process (N × its measured peak), against one process with "
            "the base and N adapters (the measured peak with one, plus each further adapter's size).",
            "",
            "| specialists | disk: merged files | disk: base + adapters | memory: merged files "
            "| memory: base + adapters |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['n']} | {_mb(s['disk_merged_bytes'])} | {_mb(s['disk_shared_bytes'])} "
            f"| {_mb(s['memory_merged_bytes'])} | {_mb(s['memory_shared_bytes'])} |"
            for s in f["specialists"]
        ]
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
    return ["## JSON fields", "", *json_fields_lines(found)]


def json_fields_lines(found: dict) -> list[str]:
    """The tables of `tables.json_fields`: the object rates per candidate, then each field path's F1."""
    names = found["names"]
    lines = [
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


def next_steps_markdown(report: dict) -> list[str]:
    steps = report.get("next_steps")
    if not steps:
        return []
    lines = ["## What would most likely help next", ""]
    for step in steps:
        lines.append(f"- **{_sentence(step['advice'])}.** {_sentence(step['evidence'])}.")
    return [*lines, ""]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


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


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def _size(candidate: dict) -> str:
    """Size on disk; an adapter GGUF's with the shared base it needs, apart."""
    if candidate.get("shared_base_bytes"):
        return f"{_mb(candidate['size_on_disk_bytes'])} + {_mb(candidate['shared_base_bytes'])} shared base"
    return _mb(candidate["size_on_disk_bytes"])


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f} MB"


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _millions(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}M"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:80]


def answers_markdown(report: dict) -> list[str]:
    """For a generation task (JSON, free text; a label task has its errors by label): how long each candidate's
    answers are against the expected ones, how often generation was cut off at max_new_tokens, and for JSON
    targets which answers do not parse, with the specialist's first few."""
    found = report.get("answers")
    if not found or report.get("labels"):
        return []
    json_task, expected = found["json_task"], found["expected"]["chars"]
    lines = [
        "## Answers",
        "",
        f"Lengths in characters (tokenizers differ between candidates); the expected answers: p50 "
        f"{expected['p50']:.0f}, p95 {expected['p95']:.0f}, max {expected['max']:.0f}. Cut off: generation reached "
        f"evaluate.max_new_tokens ({found.get('max_new_tokens', '?')}) before its end token."
        + (" Not JSON: the answer does not parse as a JSON object." if json_task else ""),
        "",
        "| candidate | chars p50 / p95 / max | answer / expected length, median | generated tokens p50 / max "
        "| cut off | empty |" + (" not JSON (cut off among them) |" if json_task else ""),
        "|---" * (6 + json_task) + "|",
    ]
    for name, f in found["candidates"].items():
        chars, tokens, cut = f["chars"], f["generated_tokens"], f["cut_off"]
        line = (
            f"| {name} | {chars['p50']:.0f} / {chars['p95']:.0f} / {chars['max']:.0f} "
            f"| {_num(f['median_length_ratio'], 2)} "
            f"| {'—' if tokens is None else format(tokens['p50'], '.0f') + ' / ' + format(tokens['max'], '.0f')} "
            f"| {cut['count']} ({cut['share']:.1%}) | {f['empty_rows']} |"
        )
        if json_task:
            bad = f["invalid_json"]
            line += f" {bad['count']} ({bad['share']:.1%}; {bad['cut_off']}) |"
        lines.append(line)
    mine = found["candidates"].get("specialized", {})
    cut = mine.get("cut_off", {}).get("count")
    if cut:
        lines += ["", f"The specialist was cut off on {cut} row{'s' if cut > 1 else ''}: an answer longer than "
                  "evaluate.max_new_tokens allows, or one that repeats itself and never reaches its end token "
                  "(report.html shows them: show → cut off at max_new_tokens)."]  # fmt: skip
    examples = mine.get("invalid_json", {}).get("examples")
    if examples:
        lines += ["", "The specialist's answers that are not a JSON object, the first few:", "",
                  "| row | cut off | answer |", "|---|---|---|"]  # fmt: skip
        lines += [
            f"| {e['row']} | {'yes' if e['cut_off'] else 'no'} | {_cell(e.get('answer', '(left out)'))} |"
            for e in examples
        ]
    return [*lines, ""]
