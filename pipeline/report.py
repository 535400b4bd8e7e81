"""Report stage: turn the evaluation into evidence a reader can decide on.

Reads evaluate/results.json and the generation caches (never a model), and writes
evaluate/report.json and evaluate/report.md: per candidate the task metric with a bootstrap 95%
confidence interval and what it costs to run; the specialized model against each other candidate on
the same rows (wins, losses, McNemar's exact p-value); the gap to the reference it closed; the gates.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.recipe import LoadedRecipe
from pipeline.runs import log, write_json_atomic, write_text_atomic

STAGE = "report"
REPORT_SCHEMA_VERSION = 1


# --- statistics (pure) --------------------------------------------------------------------------


def bootstrap_ci(per_row: list[int | float], samples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of per-row scores."""
    if not per_row:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(per_row)
    means = sorted(sum(per_row[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return (means[int(0.025 * (samples - 1))], means[int(math.ceil(0.975 * (samples - 1)))])


def gap_closed(specialized: float, base: float, reference: float) -> float | None:
    """(specialized - base) / (reference - base): 1.0 means the specialist reached the reference."""
    if reference == base:
        return None
    return (specialized - base) / (reference - base)


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar test on the discordant rows (binomial with p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(specialized_rows: list[int], other_rows: list[int]) -> dict:
    wins = [i for i, (s, o) in enumerate(zip(specialized_rows, other_rows, strict=True)) if s > o]
    losses = [i for i, (s, o) in enumerate(zip(specialized_rows, other_rows, strict=True)) if s < o]
    return {
        "wins": len(wins),
        "losses": len(losses),
        "p_value": mcnemar_exact_p(len(wins), len(losses)),
        "won_rows": wins,
        "lost_rows": losses,
    }


# --- building the report ------------------------------------------------------------------------


def build_report(results: dict, loaded: LoadedRecipe) -> dict:
    """The report as data; everything in report.md comes from here."""
    settings = loaded.recipe.evaluate
    metric = settings.metrics[0]
    candidates = results["candidates"]
    report_candidates = {}
    for name, result in candidates.items():
        entry = {"role": result["role"], "metrics": {}}
        for metric_name, scores in result["metrics"].items():
            low, high = bootstrap_ci(scores["per_row"], settings.bootstrap_samples, seed=loaded.recipe.train.seed)
            entry["metrics"][metric_name] = {"value": scores["value"], "ci95": [low, high]}
        entry.update({k: v for k, v in result.items() if k not in ("role", "metrics")})
        report_candidates[name] = entry

    def value(name: str) -> float | None:
        return candidates[name]["metrics"][metric]["value"] if name in candidates else None

    comparisons = {}
    if "specialized" in candidates:
        specialized_rows = candidates["specialized"]["metrics"][metric]["per_row"]
        for name, result in candidates.items():
            if name != "specialized":
                comparisons[name] = paired(specialized_rows, result["metrics"][metric]["per_row"])

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
    }


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
    return {"passed": all(c["passed"] for c in checks.values()), "checks": checks}


def render_markdown(report: dict, flips: list[dict]) -> str:
    metric = report["metric"]
    lines = [
        f"# {report['recipe']}: specialized vs base vs reference",
        "",
        f"Run `{report['run_id']}`, {report['eval_rows']} eval rows, metric `{metric}` "
        "(95% bootstrap interval in brackets). Latency is per example, amortized over a batch.",
        "",
        "| candidate | role | " + metric + " | specialized won/lost here (McNemar p) | size on disk | peak memory "
        "| s/example p50 | p95 | gen tokens/s | prompt tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in report["candidates"].items():
        m = c["metrics"][metric]
        comparison = report["comparisons"].get(name)
        versus = f"{comparison['wins']}/{comparison['losses']}, p={comparison['p_value']:.3g}" if comparison else "—"
        lines.append(
            f"| {name} | {c['role']} | {m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] | {versus} "
            f"| {_mb(c['size_on_disk_bytes'])} | {_mb(c['peak_memory_bytes'])} "
            f"| {c['seconds_per_example_p50']:.4f} | {c['seconds_per_example_p95']:.4f} "
            f"| {_num(c['generated_tokens_per_second'])} | {c['prompt_tokens_per_example']:.1f} |"
        )
    lines += ["", "## Verdict", "", *verdict(report), ""]
    gates = report["gates"]
    if gates["checks"]:
        lines += ["## Gates", ""]
        for gate, check in gates["checks"].items():
            mark = "PASS" if check["passed"] else "FAIL"
            lines.append(f"- **{mark}** `{gate}`: {_num(check['value'])} (threshold {check['threshold']})")
        lines.append("")
    if flips:
        lines += [
            "## Rows that flipped (specialized vs base)",
            "",
            "| row | expected | base | specialized |",
            "|---|---|---|---|",
        ]
        for flip in flips:
            lines.append(
                f"| {flip['source']} | {_cell(flip['expected'])} | {_cell(flip['base'])} "
                f"| {_cell(flip['specialized'])} |"
            )
        lines.append("")
    return "\n".join(lines)


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
    gates = report["gates"]
    if gates["checks"]:
        said.append("- Gates: " + ("all passed." if gates["passed"] else "FAILED; do not ship this run."))
    return said


def flipped_rows(report: dict, generations: dict[str, list[dict]], rows: list, limit: int = 10) -> list[dict]:
    comparison = report["comparisons"].get("base")
    if not comparison:
        return []
    flips = []
    for kind in ("won_rows", "lost_rows"):
        for i in comparison[kind][: limit // 2]:
            flips.append(
                {
                    "row": i,
                    "source": rows[i].source,
                    "expected": rows[i].target.strip(),
                    "base": generations["base"][i]["prediction"],
                    "specialized": generations["specialized"][i]["prediction"],
                    "kind": kind[:-5],
                }
            )
    return flips


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    from pipeline import data

    results_path = run_dir / "evaluate" / "results.json"
    if not results_path.is_file():
        raise PipelineError(f"{run_dir}: no evaluation results; run `make eval RECIPE={loaded.path}` first")
    results = json.loads(results_path.read_text())
    report = build_report(results, loaded)
    generations = {
        name: _read_generations(run_dir / "evaluate" / "generations" / f"{name}.jsonl")
        for name in ("base", "specialized")
        if name in results["candidates"]
    }
    rows = data.load_rows(loaded.recipe.data, "eval")
    flips = flipped_rows(report, generations, rows) if len(generations) == 2 else []
    report["flipped_rows"] = flips
    write_json_atomic(run_dir / "evaluate" / "report.json", report)
    write_text_atomic(run_dir / "evaluate" / "report.md", render_markdown(report, flips))
    log(STAGE, f"wrote {run_dir / 'evaluate' / 'report.md'}")
    return report


def _read_generations(path: Path) -> list[dict]:
    entries = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    return [e for e in sorted(entries, key=lambda e: e["row"])]


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f} MB"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:80]
