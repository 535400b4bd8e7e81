"""The report's PNG plots (report.png, cascade.png) and what every plot shares: matplotlib without a display,
and a file written atomically."""

from __future__ import annotations

import math
from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path, tight: bool = True) -> None:
    """Write the figure as PNG through a temp file (a killed run never leaves half an image) and close it.
    tight: crop to what is drawn, legends outside the axes included."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(figure)
    tmp.replace(path)


def tick_label(value: float) -> str:
    """A log axis's 1-2-5 tick written as the number it is (0.05, 0.2, 5, 2,000), not as a power of ten."""
    decimals = max(0, -math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:,.{decimals}f}"


def clear_of(x: float, y: float, labelled: list[tuple[float, float]]) -> bool:
    """Whether a value written beside the point (x on a log axis, y linear) keeps clear of those already written."""
    return all(abs(math.log10(x / ox)) > 0.25 or abs(y - oy) > 0.06 for ox, oy in labelled)


def write_report_plot(report: dict, path: Path) -> None:
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
