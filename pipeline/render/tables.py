"""Tables the report shows both as Markdown and as its page: the data of each, shaped once."""

from __future__ import annotations


def title(report: dict) -> str:
    """The report's heading: what the specialist is compared with in this run (a run without a reference says so)."""
    roles = {c["role"] for c in report["candidates"].values()}
    shown = [role for role in ("specialized", "base", "reference") if role in roles]
    return f"{report['recipe']}: {' vs '.join(shown)}"


def json_fields(report: dict, limit: int = 50) -> dict | None:
    """json_match inside the object, per candidate: the object rates and each field path's F1, most expected first
    (`limit` of them; `more`: how many are left out). None without per-field scores."""
    scored = {n: c["metrics"]["json_match"] for n, c in report["candidates"].items() if "json_match" in c["metrics"]}
    if not any(s.get("per_field") for s in scored.values()):
        return None
    support: dict[str, int] = {}
    for s in scored.values():
        for path, f in (s.get("per_field") or {}).items():
            support[path] = max(support.get(path, 0), f["support"])
    paths = sorted(support, key=lambda path: (-support[path], path))[:limit]
    return {
        "names": list(scored),
        "overall": [
            (what, [scored[n].get(key) for n in scored])
            for key, what in (
                ("json_valid", "valid JSON object"),
                ("exact_object", "whole object right"),
                ("field_precision", "field precision"),
                ("field_recall", "field recall"),
                ("field_f1", "field F1"),
            )
        ],  # fmt: skip
        "fields": [
            (path, support[path], [(scored[n].get("per_field") or {}).get(path, {}).get("f1") for n in scored])
            for path in paths
        ],
        "more": max(0, len(support) - limit),
    }


def runtime_cell(candidate: dict) -> str:
    """How a candidate ran: its runtime and precision (a PyTorch dtype, a GGUF file's type)."""
    dtype = candidate.get("dtype")
    return candidate.get("runtime", "transformers") + (f" {dtype}" if dtype else "")


def pairing(versus: dict) -> str:
    """Which rows a comparison pairs on, in words (compare.md and compare.html; pipeline/compare.py)."""
    if not versus["paired_rows"]:
        return f"nothing pairs ({versus['why_unpaired']}); compare the intervals above"
    if versus["same_eval_rows"]:
        return f"paired on the same {versus['paired_rows']} eval rows"
    return (
        f"paired on the {versus['paired_rows']} eval rows both runs evaluated; {versus['only_first']} were evaluated "
        f"only by the first run, {versus['only_other']} only by this one"
    )
