"""Named runs' figures for the manual and the front page: a result is refreshed by a rerun, never by an edit.

`specialist results --add RUN_DIR --as NAME` keeps a small extract of a finished run's report.json (its candidates'
scores with intervals, sizes, memory, latencies and CPU time, its cascades, and where it was measured: run id,
commit, CPU, threads, date) as docs/results/NAME.json; a benchmark is kept the same way from the file `make
bench-train OUT=FILE` (or `make bench OUT=FILE`) writes, with the command and machine that measured it.
`specialist results` renders every kept result into docs/results.md, and into the README and any page of docs/
between `<!-- results:NAME -->` and `<!-- /results:NAME -->`, or `NAME:part` for one of PARTS (the run's cascades,
cost per answer, specialists on one base, distillation, synthetic rows, confidences, fidelity, JSON fields, sweep
trials, learning curve, what would help next). `--check` fails
where a committed page differs from what the kept results render (tests/test_docs.py runs it).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import yaml

from pipeline import compare
from pipeline.errors import PipelineError
from pipeline.files import write_json_atomic
from pipeline.render import tables
from pipeline.render.markdown import (
    answers_markdown,
    fidelity_markdown,
    json_fields_lines,
    next_steps_markdown,
    refit_markdown,
    synthesis_markdown,
)
from pipeline.render.sweep import curve_markdown, sweep_markdown
from pipeline.render.tables import runtime_cell
from pipeline.report_types import has_report, read_report
from pipeline.run_layout import RunLayout
from pipeline.runs import read_manifest, training_invocation

CANDIDATE_FIELDS = (
    "role",
    "runtime",
    "dtype",
    "size_on_disk_bytes",
    "shared_base_bytes",
    "peak_memory_bytes",
    "single_request_seconds_p50",
    "seconds_per_example_p50",
    "threads",
    "cpu_seconds_per_1000_answers",
    "joules_per_1000_answers",
    "energy_counter",
    "cost_per_1000_answers",
    "price",
    "stopped_at_end_token",
)


def extract(run_dir: Path) -> dict:
    """What the manual shows of a finished run, and where it was measured."""
    if not has_report(run_dir):
        raise PipelineError(f"results: {run_dir} has no report/report.json; finish the run first (`make train`)")
    report = read_report(RunLayout(run_dir).report_json)
    trained = training_invocation(read_manifest(run_dir))
    metric = report["metric"]
    candidates = {}
    for name, candidate in report["candidates"].items():
        scores = candidate["metrics"][metric]
        candidates[name] = {
            **{key: candidate.get(key) for key in CANDIDATE_FIELDS},
            "value": scores["value"],
            "ci95": scores["ci95"],
        }
    return {
        "recipe": report["recipe"],
        "run_id": run_dir.name,
        "metric": metric,
        "eval_rows": report["eval_rows"],
        "gates_passed": report.get("gates", {}).get("passed"),
        "gap_closed": report.get("gap_closed"),
        "commit": (trained.get("git_commit") or "")[:7] or None,
        "changed": trained.get("git_changed"),
        "cpu": trained.get("machine", {}).get("cpu"),
        "cpu_count": trained.get("machine", {}).get("cpu_count"),
        "date": (trained.get("started_at") or "")[:10] or None,
        "wall_seconds": _wall_seconds(read_manifest(run_dir)),
        "candidates": candidates,
        "cascade": _cascade(report.get("cascade")),
        "distillation": report.get("distillation"),
        "synthesis": _synthesis(report),
        "refit": _refit(report),
        "confidence": report.get("confidence"),
        "next_steps": report.get("next_steps"),
        "fidelity": report.get("fidelity"),
        "json_fields": tables.json_fields(report, limit=12),
        "answers": _answers(report.get("answers")),
        "sweep": report.get("sweep"),
        "learning_curve": report.get("learning_curve"),
        "shared_base": {
            name: {k: v for k, v in facts.items() if k != "peak_memory_bytes"}
            for name, facts in (report.get("shared_base") or {}).items()
        }
        or None,
    }


def _wall_seconds(manifest: dict) -> float | None:
    """How long the run took: from its start to the end of its last stage, where one invocation ran it all (a run
    resumed after a stop, or grown later by another command, has no single figure)."""
    ran = manifest.get("invocations", [])
    if len(ran) != 1 or not ran[0].get("finished_at"):
        return None
    started, finished = (
        datetime.datetime.strptime(ran[0][key], "%Y-%m-%dT%H:%M:%S%z") for key in ("started_at", "finished_at")
    )
    return (finished - started).total_seconds()


def _synthesis(report: dict) -> dict | None:
    """The synthesis section, with the seed-only comparison its 'what the rows bought' line reads (no row lists)."""
    if not report.get("synthesis"):
        return None
    comparison = report.get("comparisons", {}).get("seed-only")
    kept = {k: v for k, v in (comparison or {}).items() if k not in ("won_rows", "lost_rows")}
    return {**report["synthesis"], "seed_only_comparison": kept or None}


def _refit(report: dict) -> dict | None:
    """train.refit: where it stopped, and its pairing with the adapter validation chose (no row lists)."""
    refit = (report.get("validation") or {}).get("refit")
    if not refit:
        return None
    comparison = report.get("comparisons", {}).get("before-refit")
    kept = {k: v for k, v in (comparison or {}).items() if k not in ("won_rows", "lost_rows")}
    return {**refit, "before_refit_comparison": kept or None}


def _answers(section: dict | None) -> dict | None:
    """A JSON task's answer lengths, cut-offs and answers that are not JSON per candidate, without their text."""
    if not section or not section.get("json_task"):
        return None
    kept = {**section, "candidates": {}}
    for name, facts in section["candidates"].items():
        invalid = facts.get("invalid_json")
        kept["candidates"][name] = {
            **facts,
            **({"invalid_json": {k: v for k, v in invalid.items() if k != "examples"}} if invalid else {}),
        }
    return kept


def _cascade(section: dict | None) -> dict | None:
    """The cascade's operating points on the eval rows, each chosen on the validation rows."""
    if not section:
        return None
    kept = ("threshold", "value", "ci95", "share_local", "latency_seconds", "versus_reference")
    return {
        "validation_rows": section.get("validation_rows"),
        "fallback": section.get("fallback"),
        "reference_value": section.get("reference_value"),
        "reference_ci95": section.get("reference_ci95"),
        "candidates": {name: {k: c.get(k) for k in kept} for name, c in section["candidates"].items()},
    }


BENCHMARKS = ("bench", "bench-train")
KINDS = (*BENCHMARKS, "compare", "card")


def add(source: Path, name: str, folder: Path) -> Path:
    """Keep as NAME: a finished run folder's extract, a benchmark's figures (`make bench-train OUT=FILE`), a
    comparison (runs/compare-<id>/) or a publish bundle's card (runs/<name>/<id>/publish/)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise PipelineError(f"results --as {name!r}: use lowercase letters, digits and dashes (demo, hwu-slots)")
    path = folder / f"{name}.json"
    if source.is_file():
        kept = _benchmark(source)
    elif (source / "compare.json").is_file():
        kept = _comparison(source)
    elif (source / "README.md").is_file() and (source / "adapter_config.json").is_file():
        kept = _card(source)
    else:
        kept = extract(source)
    write_json_atomic(path, kept)
    return path


def _card(folder: Path) -> dict:
    """A publish bundle's model card as the Hub shows it first: its metadata and the opening up to the evaluation,
    with the bundle's file count and size."""
    _, front, body = (folder / "README.md").read_text().split("---\n", 2)
    files = [path for path in folder.rglob("*") if path.is_file()]
    return {
        "kind": "card",
        "run_id": folder.parent.name,
        "metadata": yaml.safe_load(front),
        "opening": body.split("\n## ", 1)[0].strip(),
        "files": len(files),
        "bytes": sum(path.stat().st_size for path in files),
        "date": datetime.date.today().isoformat(),
    }


def _comparison(folder: Path) -> dict:
    """`specialist compare`'s findings (runs/compare-<id>/), without the run folders' paths on this machine."""
    found = json.loads((folder / "compare.json").read_text())
    runs = [{k: v for k, v in run.items() if k != "folder"} for run in found["runs"]]
    return {"kind": "compare", **found, "runs": runs, "date": datetime.date.today().isoformat()}


def _benchmark(path: Path) -> dict:
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"results: {path} is not a benchmark's JSON ({e}); write one with make bench OUT={path}"
        ) from None
    if not isinstance(figures, dict) or figures.get("kind") not in BENCHMARKS:
        raise PipelineError(
            f"results: {path} is neither a run folder nor a benchmark's figures (`make bench-train OUT=FILE` or "
            "`make bench OUT=FILE` writes one)"
        )
    return figures


def table(result: dict, part: str = "") -> str:
    """The result as a Markdown table (`part`: "" the candidates, else one of PARTS) with a line that says where
    and when it was measured."""
    if result.get("kind") in KINDS:
        if part:
            raise PipelineError(f"results: a {result['kind']} result has one table; :{part} names none")
        draw = {"bench-train": bench_train_table, "bench": bench_table, "compare": compare_table, "card": card_table}
        return draw[result["kind"]](result)
    if part:
        if part not in PARTS:
            raise PipelineError(f"results: no table {part!r}; a block names NAME, or NAME: with {', '.join(PARTS)}")
        return PARTS[part][2](result)
    metric = result["metric"]
    lines = [
        f"| candidate | runtime | {metric} [95% CI] | size on disk | peak memory | single request p50 "
        "| s/example, batched |",
        "|---|---|---|---|---|---|---|",
    ]
    best = max(c["value"] for c in result["candidates"].values())
    for name, c in result["candidates"].items():
        value = f"{c['value']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
        shown = f"**{value}**" if c["value"] == best else value
        size = _mb(c["size_on_disk_bytes"]) + (
            f" + {_mb(c['shared_base_bytes'])} shared" if c["shared_base_bytes"] else ""
        )
        lines.append(
            f"| {name} ({c['role']}) | {runtime_cell(c)} | {shown} | {size} | {_mb(c['peak_memory_bytes'])} "
            f"| {_seconds(c['single_request_seconds_p50'])} | {_seconds(c['seconds_per_example_p50'])} |"
        )
    return "\n".join([*lines, "", _where(result)])


def cost_table(result: dict) -> str:
    """What an answer costs the device: CPU-seconds (and joules, where the machine counts them) per 1,000 answers
    over the timed single requests."""
    priced = any(c.get("cost_per_1000_answers") is not None for c in result["candidates"].values())
    lines = ["| candidate | runtime | single request p50 | CPU-s / 1,000 answers | J / 1,000 answers |"
             + (" price / 1,000 answers |" if priced else ""),
             "|---|---|---|---|---|" + ("---|" if priced else "")]  # fmt: skip
    for name, c in sorted(
        result["candidates"].items(), key=lambda item: -(item[1].get("cpu_seconds_per_1000_answers") or 0)
    ):
        cpu = c.get("cpu_seconds_per_1000_answers")
        joules = c.get("joules_per_1000_answers")
        api = c.get("runtime") == "endpoint"
        energy = (
            f"{joules:,.0f} ({c.get('energy_counter')})"
            if joules is not None
            else ("— (an API)" if api else "— (no energy counter)")
        )
        cost = c.get("cost_per_1000_answers")
        money = f" {c['price']['currency']} {cost:.4g} |" if cost is not None else (" — |" if api else " none |")
        lines.append(
            f"| {name} | {runtime_cell(c)} | {_seconds(c['single_request_seconds_p50'])} "
            f"| {'—' if cpu is None else f'{cpu:,.0f}'} | {energy} |" + (money if priced else "")
        )
    return "\n".join([*lines, "", _where(result)])


def shared_base_table(result: dict) -> str:
    """N specialists on one device, as N merged GGUF files or as one shared base with N adapter GGUFs, per adapter
    variant: disk from the run's files, memory from its measured peaks."""
    shared = result.get("shared_base")
    if not shared:
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no adapter GGUF (gguf-lora)")
    lines = []
    for name, facts in shared.items():
        agreement = facts.get("answer_agreement_with_merged")
        same = (
            f"; the same answer as {facts['merged_variant']} on {agreement:.1%} of rows"
            if agreement is not None
            else ""
        )
        lines += [
            f"{name}: a {_mb(facts['adapter_bytes'])} adapter on the {facts['base_type']} base "
            f"({_mb(facts['base_bytes'])}){same}.",
            "",
            f"| specialists on the device | disk: merged {facts['base_type']} files | disk: base + adapters "
            "| memory: merged files | memory: base + adapters |",
            "|---|---|---|---|---|",
        ]
        for row in facts["specialists"]:
            lines.append(
                f"| {row['n']} | {_mb(row['disk_merged_bytes'])} | {_mb(row['disk_shared_bytes'])} "
                f"| {_mb(row['memory_merged_bytes'])} | {_mb(row['memory_shared_bytes'])} |"
            )
        lines.append("")
    return "\n".join([*lines, _where(result)])


def synthesis_table(result: dict) -> str:
    """The rows the teacher wrote: its score first, rows asked, kept and dropped by reason with an example, the label
    check, diversity, lengths, its time, and a kept row per label (the report's own section, without its heading)."""
    facts = result.get("synthesis")
    if not facts:
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no synthesis")
    shown = {"synthesis": facts, "metric": result["metric"], "eval_rows": result["eval_rows"]}
    if facts.get("seed_only_comparison") and {"specialized", "seed-only"} <= set(result["candidates"]):
        shown["comparisons"] = {"seed-only": facts["seed_only_comparison"]}
        shown["candidates"] = {
            name: {"metrics": {result["metric"]: {k: result["candidates"][name][k] for k in ("value", "ci95")}}}
            for name in ("specialized", "seed-only")
        }
    lines = synthesis_markdown(shown)[2:]
    return "\n".join([*lines, _where(result)])


def refit_table(result: dict) -> str:
    """train.refit: where the second training stopped, and what it bought against the adapter validation chose."""
    facts = result.get("refit")
    if not facts:
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no refit")
    shown = {"validation": {"refit": facts}, "metric": result["metric"], "eval_rows": result["eval_rows"]}
    if facts.get("before_refit_comparison") and {"specialized", "before-refit"} <= set(result["candidates"]):
        shown["comparisons"] = {"before-refit": facts["before_refit_comparison"]}
        shown["candidates"] = {
            name: {"metrics": {result["metric"]: {k: result["candidates"][name][k] for k in ("value", "ci95")}}}
            for name in ("specialized", "before-refit")
        }
    lines = [line for line in refit_markdown(shown) if line]
    return "\n\n".join([*lines, _where(result)])


def distillation_table(result: dict) -> str:
    """What labelling by the teacher cost and bought: its time, how often it gave the gold answer where the inputs
    carried one, how often the student agrees with it, and after how many answers the student paid it back."""
    facts = result.get("distillation")
    if not facts:
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no distillation")

    def share(value):
        return "—" if value is None else f"{value:.1%}"

    def count(value):
        return "—" if value is None else f"{value:,.0f}"

    rows = [
        ("teacher", f"`{facts['teacher']}`"),
        ("inputs labelled, kept, dropped", f"{facts['inputs']}, {facts['labelled_rows']}, {facts['dropped_rows']}"),
        ("teacher's time", f"{facts['teacher_seconds']:.0f} s ({facts['teacher_seconds_per_input']:.2f} s an input)"),
        ("student's training", "—" if facts.get("train_seconds") is None else f"{facts['train_seconds']:.0f} s"),
        ("teacher's answer = the gold answer (inputs that carry one)", share(facts.get("teacher_gold_agreement"))),
        ("... on the rows kept for training", share(facts.get("kept_gold_agreement"))),
        ("student's answer = the teacher's, on the eval rows", share(facts.get("agreement_with_teacher"))),
        ("answers after which the student paid back the labelling", count(facts.get("break_even_answers"))),
        ("... and its training", count(facts.get("break_even_answers_with_training"))),
    ]
    lines = ["| | |", "|---|---|", *(f"| {what} | {value} |" for what, value in rows)]
    return "\n".join([*lines, "", _where(result)])


def cascade_table(result: dict) -> str:
    cascade = result.get("cascade")
    if not cascade:
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no cascade to show")
    metric = result["metric"]
    lines = [
        f"| | {metric} [95% CI] on the eval rows | answered locally | won / lost against the reference alone "
        "| single request: mean / p50 / p95 | threshold |",
        "|---|---|---|---|---|---|",
    ]
    if cascade["reference_value"] is not None:
        low, high = cascade["reference_ci95"]
        alone = result["candidates"].get("reference") or {}
        latency = f"{_seconds(alone.get('single_request_seconds_p50'))} (p50)" if alone else "—"
        lines.append(
            f"| reference alone | {cascade['reference_value']:.3f} [{low:.3f}, {high:.3f}] | 0% | — | {latency} | — |"
        )
    for name, c in cascade["candidates"].items():
        alone = result["candidates"].get(name)
        if alone:
            lines.append(
                f"| {name} alone | {alone['value']:.3f} [{alone['ci95'][0]:.3f}, {alone['ci95'][1]:.3f}] | 100% | — "
                f"| {_seconds(alone['single_request_seconds_p50'])} (p50) | — |"
            )
        versus = c.get("versus_reference") or {}
        paired = f"{versus['wins']} / {versus['losses']} (p = {versus['p_value']:.2g})" if versus else "—"
        latency = c.get("latency_seconds") or {}
        seconds = " / ".join(_seconds(latency.get(k)) for k in ("mean", "p50", "p95"))
        threshold = "—" if c["threshold"] is None else f"{c['threshold']:.3f}"
        lines.append(
            f"| **{name} + reference** | **{c['value']:.3f}** [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] "
            f"| {c['share_local']:.1%} | {paired} | {seconds} | {threshold} |"
        )
    note = (
        f"Thresholds chosen on {cascade['validation_rows']} validation rows, applied unchanged to the eval rows; "
        f"the fallback is {cascade['fallback']}. A cascade's latency is the mixture it implies: every request waits "
        "for the local model, the deferred ones for the reference too."
    )
    return "\n".join([*lines, "", note, _where(result)])


def sweep_table(result: dict) -> str:
    """The trials a sweep chose this run from, all on the validation rows (only the chosen one met the eval rows)."""
    if not result.get("sweep"):
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} was not chosen by a sweep")
    return "\n".join([*sweep_markdown(result["sweep"], heading="")[1:], _where(result)])


def curve_table(result: dict) -> str:
    if not result.get("learning_curve"):
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no learning_curve")
    curve = {"metric": result["metric"], "eval_rows": result["eval_rows"], **result["learning_curve"]}
    return "\n".join([*curve_markdown(curve, heading="")[1:], _where(result)])


def json_table(result: dict) -> str:
    """Where a JSON answer goes wrong: each candidate's object rates and each field's F1, then answer lengths and
    answers cut off or not JSON."""
    if not result.get("json_fields"):
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no json_match fields")
    answers = answers_markdown({"answers": result["answers"]})[2:] if result.get("answers") else []
    return "\n".join([*json_fields_lines(result["json_fields"]), *answers, _where(result)])


def fidelity_table(result: dict) -> str:
    """Does each file answer like the model it was made from: the merge, and each GGUF against the merged model."""
    if not result.get("fidelity"):
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no fidelity checks (no GGUF)")
    lines = fidelity_markdown({"fidelity": result["fidelity"], "candidates": result["candidates"]})[2:]
    return "\n".join([*lines, _where(result)])


def next_steps_table(result: dict) -> str:
    """What the run's report says would most likely help next."""
    if not result.get("next_steps"):
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} has no next steps (an older report)")
    return "\n".join([*next_steps_markdown(result)[2:], _where(result)])


def confidence_table(result: dict) -> str:
    """How sure each candidate was when right and when wrong (by the gating metric's per-row score): the signal a
    cascade defers on."""
    confidence = result.get("confidence")
    if not confidence:
        raise PipelineError(f"results: {result['recipe']} run {result['run_id']} records no confidences")
    lines = ["| candidate | mean confidence | when right | when wrong | same answer as the specialist |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, c in confidence.items():
        same = (c.get("versus_specialized") or {}).get("same_answer")
        lines.append(
            f"| {name} | {_share(c.get('mean'))} | {_share(c.get('mean_when_right'))} "
            f"| {_share(c.get('mean_when_wrong'))} | {'—' if same is None else f'{same:.1%}'} |"
        )
    return "\n".join([*lines, "", _where(result)])


def _share(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def bench_train_table(result: dict) -> str:
    """The train stage against the stock Trainer and a plain loop on the same rows: medians of the repeats."""
    figures = result["figures"]
    ways = {name: figures[name] for name in ("train stage", "stock Trainer", "plain loop")}
    stage, loop = ways["train stage"], ways["plain loop"]
    lines = [
        "| way | frozen weights | tokens/s (each run) | / plain loop | share of the matmul limit | first / final loss "
        "| eval loss | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, way in ways.items():
        runs = ", ".join(f"{rate:.0f}" for rate in way["runs_tokens_per_second"])
        share = "—" if way.get("share_of_limit") is None else f"{way['share_of_limit']:.0%}"
        ratio = way["tokens_per_second"] / loop["tokens_per_second"]
        lines.append(
            f"| {name} | {way['frozen_dtype']} | {way['tokens_per_second']:.1f} ({runs}) "
            f"| {f'**{ratio:.2f}x**' if way is stage else f'{ratio:.2f}x'} | {share} "
            f"| {way['first_loss']:.4f} / {way['final_loss']:.4f} | {way['eval_loss']:.4f} "
            f"| {_mb(way['peak_memory_bytes'])} |"
        )
    probe = stage.get("probe")
    rates = ", ".join(f"{dtype} {rate:.0f}" for dtype, rate in (probe or {}).get("gflops", {}).items() if rate)
    said = [
        f"{stage['base']}, {stage['rows']} rows ({stage['tokens']:,} real tokens), batch {stage['batch_size']}, "
        f"{stage['steps']} steps, LoRA r={stage['r']}, {stage['threads']} threads; tokens/s counts real (unpadded) "
        "tokens, each way its median run."
        + (f" The precision probe at this model's shapes, GFLOP/s: {rates}; chosen {probe['chosen']}." if probe else "")
    ]
    return "\n".join([*lines, "", *said, _measured(result)])


def bench_table(result: dict) -> str:
    """Batched evaluation against one row at a time, the same rows and greedy settings."""
    figures = result["figures"]
    lines = ["| way | tokens/s | s/example | peak memory |", "|---|---|---|---|"]
    for name in ("batched", "naive"):
        way = figures[name]
        lines.append(
            f"| {name} | {way['tokens_per_second']:.1f} | {way['seconds_per_example']:.4f} "
            f"| {_mb(way['peak_memory_bytes'])} |"
        )
    said = (
        f"Batched / one at a time: **{figures['ratio']:.2f}x** tokens/s; the same answer on {figures['identical']} of "
        f"{figures['rows']} rows; {figures['batched']['device']}, {figures['batched']['threads']} threads."
    )
    return "\n".join([*lines, "", said, _measured(result)])


def card_table(result: dict) -> str:
    """The card's opening, its model-index condensed to the gating metric (the file lists every candidate x every
    metric), then what the bundle holds."""
    metadata = dict(result["metadata"])
    index = metadata.pop("model-index", [])
    metrics = [m for entry in index for r in entry["results"] for m in r["metrics"]]
    gating = [m for m in metrics if m["type"] == metrics[0]["type"]] if metrics else []
    lines = ["```markdown", "---", yaml.safe_dump(metadata, sort_keys=False, default_flow_style=None).strip()]
    if index:
        task = index[0]["results"][0]
        lines += [
            "model-index:",
            f"- name: {index[0]['name']}",
            "  results:",
            f"  - task: {yaml.safe_dump(task['task'], default_flow_style=True).strip()}",
            f"    dataset: {yaml.safe_dump(task['dataset'], default_flow_style=True, width=200).strip()}",
            "    metrics:",
            *(f"    - {yaml.safe_dump(m, sort_keys=False, default_flow_style=True).strip()}" for m in gating),
            f"    ...   # every candidate x every metric ({len(metrics)} here)",
        ]
    lines += ["---", "", result["opening"], "```", ""]
    return "\n".join(
        [
            *lines,
            f"The bundle of run `{result['run_id']}`: {result['files']} files, {result['bytes'] / 1e6:,.1f} MB (kept "
            f"{result['date']}).",
        ]
    )


def compare_table(result: dict) -> str:
    """`specialist compare`'s page body, its headings as bold lines so it sits inside a guide's section."""
    lines = [f"**{line[3:]}**" if line.startswith("## ") else line for line in compare.markdown(result)[2:]]
    return "\n".join([*lines, f"Kept from `specialist compare` on {result['date']}."])


def _measured(result: dict) -> str:
    return (
        f"Measured by `{result['invocation']}` at commit {_commit(result)}, {result['date']}, torch "
        f"{result['torch']}, on {result['cpu']} ({result['cpu_count']} cores)."
    )


# NAME:part blocks: the kept key the table is drawn from, its heading on the results page (None: shown only where a
# page asks for it), and what draws it
PARTS = {
    "cascade": ("cascade", "the cascade", cascade_table),
    "cost": ("candidates", None, cost_table),
    "shared": ("shared_base", "specialists on one base", shared_base_table),
    "distill": ("distillation", "the teacher's labels", distillation_table),
    "synthesis": ("synthesis", "the rows the teacher wrote", synthesis_table),
    "refit": ("refit", "the refit on every labelled row", refit_table),
    "confidence": ("confidence", None, confidence_table),
    "next": ("next_steps", "what would most likely help next", next_steps_table),
    "fidelity": ("fidelity", None, fidelity_table),
    "json": ("json_fields", "JSON fields and answers", json_table),
    "sweep": ("sweep", "the sweep's trials", sweep_table),
    "curve": ("learning_curve", "the learning curve", curve_table),
}


def _where(result: dict) -> str:
    threads = {c["threads"] for c in result["candidates"].values() if c.get("threads")}
    gates = {True: "passed", False: "failed", None: "—"}[result["gates_passed"]]
    return (
        f"Run `{result['run_id']}` of `{result['recipe']}` on {result['eval_rows']} eval rows, at commit "
        f"{_commit(result)}, {result['date'] or '(date unknown)'}, on "
        f"{result['cpu'] or 'a CPU not recorded'} ({result['cpu_count']} cores; "
        f"{', '.join(map(str, sorted(threads))) or '?'} threads per candidate); gates {gates}"
        + (f"; the whole run took {_minutes(result['wall_seconds'])}." if result.get("wall_seconds") else ".")
    )


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def render_page(results: dict[str, dict]) -> str:
    parts = [
        "# Results",
        "",
        "<!-- generated by `specialist results` from docs/results/*.json: rerun a recipe and `specialist results "
        "--add RUN --as NAME` to refresh a table, never edit it -->",
        "",
        "Each table is a named run's own report (`report/report.json`), kept as `docs/results/NAME.json` with where "
        "and when it was measured. Latencies move by 20-30% between runs on a shared 2-core machine; the intervals "
        "are 95% bootstrap intervals over the eval rows.",
        "",
    ]
    for name, result in sorted(results.items()):
        parts += [f"## {name}", "", table(result), ""]
        if result.get("kind") in KINDS:
            continue
        for part, (key, heading, _) in PARTS.items():
            if heading and result.get(key):
                parts += [f"### {name}: {heading}", "", table(result, part), ""]
    return "\n".join(parts).rstrip("\n") + "\n"


def load(folder: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def with_blocks(text: str, results: dict[str, dict]) -> str:
    """`text` with every <!-- results:NAME --> ... <!-- /results:NAME --> block holding NAME's table."""

    def block(match: re.Match) -> str:
        shown, name, part = match.group(1), match.group(2), match.group(3) or ""
        if name not in results:
            raise PipelineError(f"results: a page shows {name!r}, which docs/results/ does not hold")
        return f"<!-- results:{shown} -->\n{table(results[name], part)}\n<!-- /results:{shown} -->"

    pattern = r"<!-- results:(([a-z0-9-]+)(?::([a-z]+))?) -->.*?<!-- /results:\1 -->"
    return re.sub(pattern, block, text, flags=re.S)


def write(folder: Path, page: Path, shown_in: list[Path], check: bool = False) -> list[Path]:
    """Render the kept results into the results page and into the blocks of the pages that show one (or, with
    check, list the files that differ)."""
    results = load(folder)
    wanted = {page: render_page(results)}
    wanted.update({path: with_blocks(path.read_text(), results) for path in shown_in if path != page})
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if not check:
        for path in stale:
            path.write_text(wanted[path])
    return stale


def _commit(result: dict) -> str:
    """The commit a figure was measured at, and whether the package's code differed from it then."""
    changed = " with uncommitted changes to pipeline/" if result.get("changed") else ""
    return f"{result['commit'] or '(unknown)'}{changed}"


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:,.0f} MB"


def _seconds(s: float | None) -> str:
    return "—" if s is None else f"{s:.3f} s"
