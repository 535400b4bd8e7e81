"""A sweep's trials and a learning curve as people read them: markdown tables and matplotlib plots.

Only the chosen trial's eval-row (test) score is shown: every trial's would invite choosing on test rows.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import stats
from pipeline.render.plots import pyplot, save


def sweep_markdown(summary: dict, heading: str = "##", plot: str | None = None) -> list[str]:
    metric = summary["metric"]
    done = [t for t in summary["trials"] if t["status"] == "done"]
    lines = [
        f"{heading} Sweep: {len(done)} trials, chosen on {summary['validation_rows']} validation rows",
        "",
        f"Chosen: trial {summary['chosen']} ({_settings(summary['chosen_settings'])}), {summary['why']}.",
    ]
    chosen_eval = summary.get("chosen_eval")
    if chosen_eval:
        low, high = chosen_eval["ci95"]
        lines.append(
            f"On the {chosen_eval['rows']} eval rows the chosen trial scores {metric} {chosen_eval['value']:.4f} "
            f"[{low:.3f}, {high:.3f}]; the other trials were never scored on them."
        )
    if summary.get("ship"):
        ship = summary["ship"]
        lines.append(
            f"Ship rule (sweep.ship): the smallest by {ship['smallest_by']} within {ship['within']:g} of the best "
            f"validation {metric}."
        )
    kinds = {t.get("latency_kind") for t in done} - {None}
    latency = f"latency p50 ({kinds.pop()})" if len(kinds) == 1 else "latency p50"
    runtime = next((t for t in done if t.get("runtime")), {})
    lines += [
        "",
        f"| trial | settings | validation {metric} (95% CI) | step kept / steps | training + scoring | size "
        f"| peak memory | {latency} | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in summary["trials"]:
        mark = "**chosen**" if t["index"] == summary["chosen"] else ""
        if t["status"] != "done":
            lines.append(f"| {t['index']} | {_settings(t['settings'])} | {t['status']} | | | | | | |")
            continue
        early = " (stopped early)" if t.get("stopped_early") else ""
        lines.append(
            f"| {t['index']} | {_settings(t['settings'])} | {t['value']:.4f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] "
            f"| {t['chosen_step']} / {t['steps']}{early} | {t['train_seconds']:.0f} + {t['scoring_seconds']:.0f} s "
            f"| {_mb(t.get('size_bytes'))} "
            f"| {_mb(t.get('peak_memory_bytes'))} | {_seconds(t.get('latency_p50'))} | {mark} |"
        )
    if runtime:
        lines += [
            "",
            f"Costs measured on the validation rows with {runtime.get('runtime')} on {runtime.get('device')}, "
            f"{runtime.get('threads')} threads; size is the base model plus the adapter on disk. Training time "
            f"includes the validation passes; scoring is the kept adapter on the validation rows with its costs. "
            f"The sweep's trials took {summary['seconds']:.0f} s in all.",
        ]
    if plot:
        lines += ["", f"![validation {metric} against cost per trial]({plot})"]
    return lines + [""]


def _whose(teacher: bool, written: bool) -> str:
    """The rows column's note: how many of a point's rows a teacher labelled, or wrote."""
    if not teacher:
        return ""
    return " (the teacher's)" if written else " (teacher labels)"


def curve_markdown(curve: dict, heading: str = "##", plot: str | None = None) -> list[str]:
    metric = curve["metric"]
    teacher = curve.get("labelling") is not None
    written = curve.get("over") == "synthesized"  # shares of the teacher's rows, the seed rows whole
    lines = [
        f"{heading} Learning curve: {metric} on the {curve['eval_rows']} eval rows against "
        + ("the teacher's rows" if written else "training rows"),
        "",
        (
            "Each share trains on every seed row and a nested, seeded sample of the rows the teacher wrote (share 0: "
            "the seed-only specialist)"
            if written
            else "Each share trains on a nested, seeded sample of the training rows"
        )
        + " (the validation rows stay the same), keeps its checkpoint by the validation rows, and is then scored on "
        "the eval rows. Nothing is chosen from these scores.",
        "",
        f"| share | rows{_whose(teacher, written)} | {metric} (95% CI) | validation | training |"
        + (" teacher time | teacher cost |" if teacher else ""),
        "|---|---|---|---|---|" + ("---|---|" if teacher else ""),
    ]
    for p in curve["points"]:
        theirs = p.get("synthesized_rows", 0) if written else p["teacher_labels"]
        rows = f"{p['rows']}" + (f" ({theirs})" if teacher else "")
        validation = "—" if p.get("validation_value") is None else f"{p['validation_value']:.4f}"
        row = (
            f"| {p['fraction']:g} | {rows} | {p['value']:.4f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] | {validation} "
            f"| {p['train_seconds']:.0f} s |"
        )
        if teacher:
            cost = p.get("teacher_cost")
            currency = curve["labelling"].get("currency") or ""
            row += f" {p.get('teacher_seconds', 0):.0f} s | {'—' if cost is None else f'{currency} {cost:.4g}'} |"
        lines.append(row)
    lines.append("")
    fit = curve.get("fit")
    if fit is None:
        lines.append(f"No saturating fit: {curve.get('projection_note', '')}.")
    else:
        fitted = f"Fit: error = {fit['a']:.3g} * rows^-{fit['b']:.3g} + {fit['c']:.3g}"
        if fit["c"] > 0:
            ceiling = f"so {metric} levels off near {curve['floor']:.3f} with more rows like these"
        else:  # the best floor is none at all: these points do not show where the curve levels off
            ceiling = (
                "with no floor: these points still fall as a power of the rows and do not show where they level off"
            )
        lines.append(f"{fitted}, {ceiling}; at twice the rows it predicts {curve['predicted_at_double']:.3f}.")
    if curve.get("flattened") is not None:
        gain = curve["last_doubling_gain"]
        lines.append(
            f"The last step up in rows gained {gain:+.4f}, "
            + ("inside the last point's 95% interval: the curve has flattened here." if curve["flattened"]
               else "more than the last point's interval half-width: more rows are still paying.")
        )  # fmt: skip
    projection = curve.get("projection")
    if curve.get("target") is not None and fit is not None and projection is not None:
        target = curve["target"]
        if projection["already_reached"]:
            lines.append(f"The target {metric} {target:g} is already reached with {curve['points'][-1]['rows']} rows.")
        elif projection["rows"] is None:
            lines.append(
                f"The target {metric} {target:g} is not projected to be reached by more rows of this kind (it lies "
                f"above the fitted ceiling, {curve['floor']:.3f}, or past 10^12 rows); a larger base model, better "
                "labels or prompts might."
            )
        else:
            interval = projection["interval"]
            spread = (
                f" (95% interval from refits on resampled eval rows: {interval[0]:,.0f} to {interval[1]:,.0f}; "
                f"{projection['share_of_refits_reaching_target']:.0%} of refits reach it at all)"
                if interval
                else f" (too uncertain for an interval: only {projection['share_of_refits_reaching_target']:.0%} of "
                "refits on resampled eval rows reach it)"
            )
            lines.append(f"Projected rows for {metric} {target:g}: about {projection['rows']:,.0f}{spread}.")
            if teacher and written:
                last = curve["points"][-1]
                more = max(projection["rows"] - last["gold_rows"], 0)
                seconds = more * curve["labelling"]["seconds_per_row"]
                lines.append(
                    f"Of those, rows the teacher writes beside the {last['gold_rows']} seed rows: about {more:,.0f}, "
                    f"about {seconds / 60:,.0f} min of teacher time at this run's rate of kept rows."
                )
            elif teacher:
                last = curve["points"][-1]
                share = last["teacher_labels"] / max(last["rows"], 1)
                lines.append(f"Of those, teacher labels at this run's share: about {projection['rows'] * share:,.0f}.")
    if plot:
        lines += ["", f"![{metric} against training rows]({plot})"]
    return lines + [""]


def write_sweep_plot(summary: dict, path: Path) -> None:
    """Validation metric (95% CI) against peak memory and latency, one point per trial, the chosen one ringed."""
    plt = pyplot()
    metric = summary["metric"]
    done = [t for t in summary["trials"] if t["status"] == "done"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for axis, key, label, scale in (
        (axes[0], "peak_memory_bytes", "peak memory (MB)", 1e6),
        (axes[1], "latency_p50", "latency p50 (s)", 1.0),
    ):
        for t in done:
            if t.get(key) is None:
                continue
            x = t[key] / scale
            error = [[t["value"] - t["ci95"][0]], [t["ci95"][1] - t["value"]]]
            chosen = t["index"] == summary["chosen"]
            axis.errorbar(
                [x], [t["value"]], yerr=error, fmt="o", capsize=4, color="tab:green" if chosen else "tab:gray"
            )
            axis.annotate(str(t["index"]), (x, t["value"]), textcoords="offset points", xytext=(6, 4), fontsize=9)
            if chosen:
                axis.scatter([x], [t["value"]], s=220, facecolors="none", edgecolors="tab:green", linewidths=2)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {metric}")
    figure.suptitle(f"{summary['recipe']}: trials (numbered as in the table; ringed: chosen)")
    figure.tight_layout()
    save(figure, path)


def write_curve_plot(curve: dict, path: Path) -> None:
    """The metric on the eval rows (95% CI) against training rows (log scale), the fit and the target."""
    plt = pyplot()
    import matplotlib.ticker

    metric = curve["metric"]
    points = curve["points"]
    figure, axis = plt.subplots(figsize=(7, 4.6))
    xs = [p["rows"] for p in points]
    ys = [p["value"] for p in points]
    error = [[p["value"] - p["ci95"][0] for p in points], [p["ci95"][1] - p["value"] for p in points]]
    axis.errorbar(xs, ys, yerr=error, fmt="o", capsize=4, color="tab:green", label="measured (95% CI)")
    fit = curve.get("fit")
    right = max(xs) * 4
    projection = curve.get("projection") or {}
    if projection.get("rows"):
        right = max(right, min(projection["rows"] * 1.3, max(xs) * 100))
    if fit:
        grid = [min(xs) * (right / min(xs)) ** (i / 99) for i in range(100)]
        axis.plot(grid, [1 - stats.predicted_error(fit, x) for x in grid], "--", color="tab:gray", label="fit")
    if curve.get("target") is not None:
        axis.axhline(curve["target"], color="tab:red", linewidth=1, label=f"target {curve['target']:g}")
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a log axis
    axis.set_xlabel("training rows (log)")
    axis.set_ylabel(f"{metric} on the eval rows")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9)
    axis.set_title(f"{curve['recipe']}: learning curve ({curve['eval_rows']} eval rows)")
    figure.tight_layout()
    save(figure, path)


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()).replace("|", "\\|") or "as written"


def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e6:.0f} MB"


def _seconds(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} s"
