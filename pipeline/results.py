"""Named runs' figures for the manual and the front page: a result is refreshed by a rerun, never by an edit.

`specialist results --add RUN_DIR --as NAME` keeps a small extract of a finished run's report.json (its candidates'
scores with intervals, sizes, memory, latencies and CPU time, its cascades, and where it was measured: run id,
commit, CPU, threads, date) as docs/results/NAME.json. `specialist results` renders every kept result into
docs/results.md, and into the README and any page of docs/ between `<!-- results:NAME -->` and
`<!-- /results:NAME -->` (or NAME:cascade, the run's cascades; NAME:cost, CPU-seconds per 1,000 answers;
NAME:shared, N specialists on one base; NAME:distill, what the teacher's labels cost and bought); `--check`
fails where a committed page differs from what the kept results render (tests/test_docs.py runs it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.files import write_json_atomic
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
        "cpu": trained.get("machine", {}).get("cpu"),
        "cpu_count": trained.get("machine", {}).get("cpu_count"),
        "date": (trained.get("started_at") or "")[:10] or None,
        "candidates": candidates,
        "cascade": _cascade(report.get("cascade")),
        "distillation": report.get("distillation"),
        "shared_base": {
            name: {k: v for k, v in facts.items() if k != "peak_memory_bytes"}
            for name, facts in (report.get("shared_base") or {}).items()
        }
        or None,
    }


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


def add(run_dir: Path, name: str, folder: Path) -> Path:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise PipelineError(f"results --as {name!r}: use lowercase letters, digits and dashes (demo, hwu-slots)")
    path = folder / f"{name}.json"
    write_json_atomic(path, extract(run_dir))
    return path


def table(result: dict, part: str = "") -> str:
    """The result as a Markdown table (`part`: "" the candidates, else one of PARTS) with a line that says where
    and when it was measured."""
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
    lines = ["| candidate | runtime | single request p50 | CPU-s / 1,000 answers | J / 1,000 answers |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, c in sorted(
        result["candidates"].items(), key=lambda item: -(item[1].get("cpu_seconds_per_1000_answers") or 0)
    ):
        cpu = c.get("cpu_seconds_per_1000_answers")
        joules = c.get("joules_per_1000_answers")
        energy = f"{joules:,.0f} ({c.get('energy_counter')})" if joules is not None else "— (no energy counter)"
        lines.append(
            f"| {name} | {runtime_cell(c)} | {_seconds(c['single_request_seconds_p50'])} "
            f"| {'—' if cpu is None else f'{cpu:,.0f}'} | {energy} |"
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


# NAME:part blocks: the kept key the table is drawn from, its heading on the results page (None: shown only where a
# page asks for it), and what draws it
PARTS = {
    "cascade": ("cascade", "the cascade", cascade_table),
    "cost": ("candidates", None, cost_table),
    "shared": ("shared_base", "specialists on one base", shared_base_table),
    "distill": ("distillation", "the teacher's labels", distillation_table),
}


def _where(result: dict) -> str:
    threads = {c["threads"] for c in result["candidates"].values() if c.get("threads")}
    gates = {True: "passed", False: "failed", None: "—"}[result["gates_passed"]]
    return (
        f"Run `{result['run_id']}` of `{result['recipe']}` on {result['eval_rows']} eval rows, at commit "
        f"{result['commit'] or '(unknown)'}, {result['date'] or '(date unknown)'}, on "
        f"{result['cpu'] or 'a CPU not recorded'} ({result['cpu_count']} cores; "
        f"{', '.join(map(str, sorted(threads))) or '?'} threads per candidate); gates {gates}."
    )


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


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:,.0f} MB"


def _seconds(s: float | None) -> str:
    return "—" if s is None else f"{s:.3f} s"
