"""`specialist compare RUN_OR_RECIPE...`: runs of one task side by side.

Each run is read from its folder (report.json, results.json with per-row scores, the generations cache and
recipe.resolved.yaml), never re-run. The comparison: what differs between the resolved recipes, every
candidate's metric with its interval per run, each later run's specialist paired against the first's on the
rows both evaluated (McNemar or a paired bootstrap, as the report does), what each costs, and the eval rows
whose answer turned right or wrong. Written to runs/compare-<ids>/ as compare.json, compare.md and a
self-contained compare.html.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline import data, sweep
from pipeline.errors import PipelineError
from pipeline.files import read_jsonl_records, write_json_atomic, write_text_atomic
from pipeline.recipe import data_fingerprint, load_recipe
from pipeline.render import html, tables
from pipeline.report_types import has_report, read_report
from pipeline.result_types import read_eval_results
from pipeline.run_layout import RunLayout
from pipeline.runs import read_manifest
from pipeline.stages.evaluate import evaluated_row, read_generations
from pipeline.stats import paired

COST_KEYS = ("size_on_disk_bytes", "peak_memory_bytes", "single_request_seconds_p50", "cpu_seconds_per_1000_answers")


def run_folder(ref: str, runs_dir: Path) -> Path:
    """A finished run, given as its folder or as a recipe (sweep.run_folder)."""
    folder = sweep.run_folder(ref, runs_dir, "compare")
    if not has_report(folder):
        raise PipelineError(f"compare: {folder} has no report; finish it with `make train` (or `make report`)")
    return folder


def compare(folders: list[Path], out_root: Path) -> tuple[dict, Path]:
    if len(folders) < 2:
        raise PipelineError("compare: give at least two runs (run folders or recipes)")
    runs = [_read(folder) for folder in folders]
    metric = runs[0]["report"]["metric"]
    if any(r["report"]["metric"] != metric for r in runs):
        shown = ", ".join(f"{r['id']}: {r['report']['metric']}" for r in runs)
        raise PipelineError(f"compare: the runs gate on different metrics ({shown}); compare runs of one task")
    names = list(dict.fromkeys(n for r in runs for n in r["report"]["candidates"]))
    found = {
        "metric": metric,
        "runs": [{"id": r["id"], "recipe": r["report"]["recipe"], "folder": str(r["folder"])} for r in runs],
        "recipe_differences": recipe_differences([r["recipe"] for r in runs]),
        "candidates": {name: [_scores(r["report"]["candidates"].get(name), metric) for r in runs] for name in names},
        "versus_first": [_versus(runs[0], other, metric) for other in runs[1:]],
    }
    ids = "-".join(r["id"] for r in runs)
    folder = out_root / f"compare-{hashlib.sha256(ids.encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "compare.json", found)
    write_text_atomic(folder / "compare.md", "\n".join(markdown(found)) + "\n")
    html.write_compare(found, folder / "compare.html")
    return found, folder


def _read(folder: Path) -> dict:
    report, results = _report(RunLayout(folder).report_json), _eval_results(folder)
    loaded = load_recipe(RunLayout(folder).resolved_recipe)
    return {
        "folder": folder,
        "id": folder.name,
        "report": report,
        "results": results,
        # through the schema: a field an older run's file leaves out reads as its default, not as a difference
        "recipe": loaded.recipe.model_dump(mode="json"),
        "rows": _evaluated_rows(folder, loaded),
    }


def _report(path: Path) -> dict:
    try:
        return read_report(path)
    except PipelineError as e:
        raise PipelineError(f"compare: {e}") from None


def _eval_results(folder: Path) -> dict:
    try:
        return read_eval_results(folder)
    except PipelineError as e:
        raise PipelineError(f"compare: {e}") from None


def _evaluated_rows(folder: Path, loaded) -> list[dict] | None:
    """The eval rows the run evaluated, as it kept them; for a run from before it kept them, the eval file's rows
    where the data is still what the run was made from; None where nothing says what it evaluated."""
    kept = RunLayout(folder).eval_rows
    if kept.is_file():
        return read_jsonl_records(kept)
    manifest = read_manifest(folder)
    try:
        unchanged = manifest.get("data_fingerprint") == data_fingerprint(loaded.recipe.data)
        return [evaluated_row(row) for row in data.load_rows(loaded.recipe.data, "eval")] if unchanged else None
    except (PipelineError, OSError):  # the data moved or no longer reads: nothing to pair on
        return None


def recipe_differences(recipes: list[dict]) -> dict[str, list]:
    """Dotted field -> its value in each run, for the fields whose values differ (missing: None)."""
    flat = [_flatten(r) for r in recipes]
    keys = sorted(set().union(*flat))
    return {
        key: [f.get(key) for f in flat]
        for key in keys
        if len({json.dumps(f.get(key), sort_keys=True) for f in flat}) > 1
    }


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _scores(candidate: dict | None, metric: str) -> dict | None:
    if candidate is None:
        return None
    scores = candidate["metrics"][metric]
    return {"value": scores["value"], "ci95": scores["ci95"], **{k: candidate.get(k) for k in COST_KEYS}}


def _versus(first: dict, other: dict, metric: str, limit: int = 10) -> dict:
    """The other run's specialist against the first's: paired on the eval rows both evaluated (matched by what
    each row asked and expected, not by position in a file that may have changed), and the rows that changed."""
    pairs = _paired_rows(first["rows"], other["rows"])
    same = bool(pairs) and len(pairs) == len(first["rows"]) == len(other["rows"])
    found = {"run": other["id"], "same_eval_rows": same, "paired_rows": len(pairs)}
    if not pairs:
        found["why_unpaired"] = (
            "one of the runs keeps no record of the rows it evaluated, and its eval file has changed since"
            if first["rows"] is None or other["rows"] is None
            else "no eval row in common"
        )
        return found  # nothing pairs: the intervals above compare them
    scores = [run["results"]["candidates"]["specialized"]["metrics"][metric]["per_row"] for run in (first, other)]
    a = [scores[0][i] for i, _ in pairs]
    b = [scores[1][j] for _, j in pairs]
    test = paired(b, a)
    answers = [
        [g["prediction"] for g in read_generations(RunLayout(run["folder"]).generations("specialized"))]
        for run in (first, other)
    ]
    changed = [
        {"row": i, "input": first["rows"][i]["input"], "expected": first["rows"][i]["expected"].strip(),
         "before": answers[0][i], "after": answers[1][j], "kind": "now right" if y > x else "now wrong"}
        for (i, j), x, y in zip(pairs, a, b, strict=True)
        if (x >= 1) != (y >= 1)
    ]  # fmt: skip
    found.update(
        only_first=len(first["rows"]) - len(pairs),
        only_other=len(other["rows"]) - len(pairs),
        wins=test["wins"],
        losses=test["losses"],
        test=test["test"],
        p_value=test["p_value"],
        changed_rows=len(changed),
        changed=[c for c in changed if c["kind"] == "now right"][:limit]
        + [c for c in changed if c["kind"] == "now wrong"][:limit],
    )
    return found


def _paired_rows(first: list[dict] | None, other: list[dict] | None) -> list[tuple[int, int]]:
    """(row in first, row in other) for each row both evaluated: the same question with the same expected answer
    (a repeated row pairs with its repeat, in order)."""
    if first is None or other is None:
        return []
    waiting: dict[tuple, list[int]] = {}
    for j, row in enumerate(other):
        waiting.setdefault((row["key"], row["expected"]), []).append(j)
    pairs = []
    for i, row in enumerate(first):
        queue = waiting.get((row["key"], row["expected"]))
        if queue:
            pairs.append((i, queue.pop(0)))
    return pairs


def markdown(found: dict) -> list[str]:
    runs = [r["id"] for r in found["runs"]]
    metric = found["metric"]
    named = ", ".join(f"{r['recipe']} `{r['id']}`" for r in found["runs"])
    lines = [f"# Runs side by side: {named}", ""]
    lines += ["## Recipe differences", ""]
    if found["recipe_differences"]:
        lines += ["| field | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
        for key, values in found["recipe_differences"].items():
            lines.append(f"| `{key}` | " + " | ".join(f"`{json.dumps(v)}`" for v in values) + " |")
    else:
        lines.append("The resolved recipes are the same.")
    lines += ["", f"## {metric} [95% CI] and cost", "", "| candidate | " + " | ".join(runs) + " |",
              "|---" * (len(runs) + 1) + "|"]  # fmt: skip
    for name, per_run in found["candidates"].items():
        cells = []
        for s in per_run:
            if s is None:
                cells.append("—")
                continue
            cost = []
            if s.get("peak_memory_bytes"):
                cost.append(f"{s['peak_memory_bytes'] / 1e6:,.0f} MB")
            if s.get("single_request_seconds_p50"):
                cost.append(f"{s['single_request_seconds_p50']:.3f} s")
            spent = f" ({', '.join(cost)})" if cost else ""
            cells.append(f"{s['value']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]{spent}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## The specialist against the first run's, on the same rows", ""]
    for v in found["versus_first"]:
        if not v["paired_rows"]:
            lines.append(f"- `{v['run']}`: {tables.pairing(v)}.")
            continue
        lines.append(
            f"- `{v['run']}` ({tables.pairing(v)}): right where `{runs[0]}` was wrong on {v['wins']} rows, wrong "
            f"where it was right on {v['losses']} ({v['test']}, p = {v['p_value']:.3g})."
        )
        if v["changed"]:
            lines += ["", "| row | input | expected | before | after |", "|---|---|---|---|---|"]
            lines += [
                f"| {c['row']} | {_cell(c['input'][-60:])} | {_cell(c['expected'])} | {_cell(c['before'])} "
                f"| {_cell(c['after'])} |"
                for c in v["changed"]
            ]
            lines.append("")
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
