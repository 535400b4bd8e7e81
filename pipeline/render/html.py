"""report.html: one self-contained page per run (styles, script and charts inline; opens from a file, no
network). Jinja2 renders the page (pipeline/render/templates/report.html.j2, autoescaped); Plotly draws the
charts, its library inlined once. The page shows the verdict and gates, the candidates (sortable), what each
costs (log axes with plain-number ticks and the values on the points), the errors by label, the cascade,
the JSON fields, the answers' lengths (and which were cut off or are not JSON), and every eval row side
by side with filters and a text search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jinja2

from pipeline.files import write_text_atomic
from pipeline.render import tables
from pipeline.render.markdown import synthesis_markdown
from pipeline.render.plots import clear_of, tick_label

TEMPLATES = Path(__file__).resolve().parent / "templates"


def cost_charts(report: dict) -> str:
    """The metric against peak memory and against single-request latency, per candidate with its 95% CI, as
    HTML (Plotly's library inlined in this first figure)."""
    import plotly.colors
    import plotly.graph_objects as go
    import plotly.io as pio
    from plotly.subplots import make_subplots

    metric = report["metric"]
    candidates = report["candidates"]
    single = all(c.get("single_request_seconds_p50") for c in candidates.values())
    latency_key = "single_request_seconds_p50" if single else "seconds_per_example_p50"
    latency_title = "seconds per single request, p50" if single else "seconds per example, p50"
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                           subplot_titles=("peak memory (MB)", latency_title))  # fmt: skip
    palette = plotly.colors.qualitative.Plotly  # one color per candidate, the same in both charts
    color = {name: palette[i % len(palette)] for i, name in enumerate(candidates)}
    for column, key in ((1, "peak_memory_bytes"), (2, latency_key)):
        xs, labelled = [], []
        for name, c in candidates.items():
            if c.get(key) is None:  # an API's memory is its server's
                continue
            m = c["metrics"][metric]
            x = c[key] / 1e6 if key.endswith("bytes") else c[key]
            xs.append(x)
            text = f"{x:,.0f} MB" if key.endswith("bytes") else f"{x:.3g} s"
            # the value beside its point where it does not fall on another's (hovering shows every one)
            shown = clear_of(x, m["value"], labelled)
            labelled += [(x, m["value"])] if shown else []
            figure.add_trace(
                go.Scatter(
                    x=[x], y=[m["value"]], mode="markers+text", name=name, legendgroup=name, showlegend=column == 2,
                    text=[text if shown else ""], textposition="middle right", cliponaxis=False,
                    marker={"size": 10, "color": color[name]},
                    error_y={"type": "data", "symmetric": False, "array": [m["ci95"][1] - m["value"]],
                             "arrayminus": [m["value"] - m["ci95"][0]]},
                    hovertemplate=f"{name}: {metric} %{{y:.3f}} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}], {text}"
                    "<extra></extra>",
                ),
                row=1, col=column,
            )  # fmt: skip
        ticks = readable_ticks(xs)
        figure.update_xaxes(type="log", tickvals=ticks, ticktext=[tick_label(t) for t in ticks], row=1, col=column)
    figure.update_yaxes(title_text=metric, row=1, col=1)
    figure.update_layout(height=420, margin={"l": 60, "r": 20, "t": 40, "b": 40}, template="plotly_white")
    # a fixed id: the same report gives the same bytes (a bundle is rebuilt identically)
    return pio.to_html(
        figure, include_plotlyjs=True, full_html=False, config={"displaylogo": False}, div_id="cost-charts"
    )


def confusion_chart(report: dict, most_labels: int = 30) -> str | None:
    """The specialist's confusion matrix (expected label by row, its answer by column; answers outside the label
    set in one "other" column) where the labels are few enough to read; None otherwise. After cost_charts, whose
    figure carries the chart library."""
    import plotly.graph_objects as go
    import plotly.io as pio

    found = (report.get("labels") or {}).get("candidates", {}).get("specialized")
    if not found or len(found["per_label"]) > most_labels:
        return None
    labels = list(found["per_label"])
    columns = [*labels, "other"]
    counts = {e: dict.fromkeys(columns, 0) for e in labels}
    for e, scores in found["per_label"].items():
        counts[e][e] = round(scores["recall"] * scores["support"])
    for pair in found["confusions"]:
        if pair["expected"] in counts:
            column = pair["answered"] if pair["answered"] in counts else "other"
            counts[pair["expected"]][column] += pair["rows"]
    z = [[counts[e][a] for a in columns] for e in labels]
    figure = go.Figure(
        go.Heatmap(
            z=z, x=columns, y=labels, colorscale="Blues", text=z, texttemplate="%{text}", showscale=False,
            hovertemplate="expected %{y}, answered %{x}: %{z} rows<extra></extra>",
        )
    )  # fmt: skip
    figure.update_layout(
        height=120 + 22 * len(labels), margin={"l": 140, "r": 20, "t": 20, "b": 120}, template="plotly_white",
        xaxis={"title": "the specialist answered", "tickangle": -45},
        yaxis={"title": "expected", "autorange": "reversed"},
    )  # fmt: skip
    return pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id="confusion-matrix")


def answers_chart(report: dict) -> str | None:
    """How long the answers are: per candidate (and the expected answers, dashed) the rows per length bin, on the
    bins report.json's `answers` shares among them; None where there is no analysis. After cost_charts."""
    import plotly.graph_objects as go
    import plotly.io as pio

    found = report.get("answers")
    if not found:
        return None
    edges = found["length_bin_edges_chars"]
    bins = [f"{low}–{high - 1}" for low, high in zip(edges, edges[1:], strict=False)]
    figure = go.Figure()
    series = [("expected", found["expected"]["histogram"])]
    series += [(name, f["histogram"]) for name, f in found["candidates"].items()]
    for name, counts in series:
        line = {"shape": "hvh", **({"dash": "dash", "color": "black"} if name == "expected" else {})}
        figure.add_trace(
            go.Scatter(
                x=bins, y=counts, name=name, mode="lines+markers", line=line,
                hovertemplate=f"{name}: %{{y}} rows of %{{x}} characters<extra></extra>",
            )
        )  # fmt: skip
    figure.update_layout(
        height=340, margin={"l": 60, "r": 20, "t": 20, "b": 60}, template="plotly_white",
        xaxis={"title": "answer length (characters)", "type": "category"}, yaxis={"title": "rows"},
    )  # fmt: skip
    return pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id="answer-lengths")


def readable_ticks(values: list[float]) -> list[float]:
    """1, 2, 5 per decade over the values' range (at least one tick below and above each value)."""
    if not values:
        return []
    low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    ticks = [m * 10**e for e in range(low, high + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if min(values) / 2.5 <= t <= max(values) * 2.5]
    return inside or ticks


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )


def write_compare(found: dict, path: Path) -> None:
    """compare.html: runs of one task side by side (pipeline/compare.py's result), self-contained."""
    page = (
        _environment()
        .get_template("compare.html.j2")
        .render(
            found=found,
            runs=[r["id"] for r in found["runs"]],
            num=lambda x, d=3: "—" if x is None else f"{x:.{d}f}",
            dumps=lambda v: json.dumps(v),
            pairing=tables.pairing,
        )
    )
    write_text_atomic(path, page)


def write(report: dict, verdict: list[str], rows: list[dict] | None, path: Path) -> None:
    write_text_atomic(path, render(report, verdict, rows))


def render(report: dict, verdict: list[str], rows: list[dict] | None) -> str:
    """The page. `rows`: per eval row {row, source, input, expected, label, answers: {name: answer}, right: {name:
    bool}} (the gating metric's per-row score of 1); None where the rows' text must stay out (a public bundle)."""
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            report=report,
            title=tables.title(report),
            verdict=[line.removeprefix("- ").replace("**", "") for line in verdict],
            names=list(report["candidates"]),
            rows=rows,
            labels=sorted({r["label"] for r in rows or [] if r["label"] is not None}),
            charts=cost_charts(report),
            confusion=confusion_chart(report),
            json_fields=tables.json_fields(report, limit=50),
            # lengths, cut-off and not-JSON answers: their section for a generation task; the row filters for any
            answers=None if report.get("labels") else report.get("answers"),
            answers_chart=None if report.get("labels") else answers_chart(report),
            flagged_rows=flagged_rows(report),
            # the teacher's rows: the report's own points, as sentences (the balance table is drawn from the report)
            synthesis_points=[line.removeprefix("- ") for line in synthesis_markdown(report) if line.startswith("- ")],
            num=lambda x, d=3: "—" if x is None else f"{x:.{d}f}",
            mb=lambda n: "—" if n is None else f"{n / 1e6:,.0f}",
            runtime=tables.runtime_cell,
        )
    )


def flagged_rows(report: dict) -> dict[str, dict[str, set[int]]]:
    """Per row filter ("cut" off at max_new_tokens, "not-json") the eval rows each candidate's answer falls under;
    a filter no candidate's rows fall under is left out."""
    found = (report.get("answers") or {}).get("candidates", {})
    flags = {
        "cut": {name: set(f["cut_off"]["rows"]) for name, f in found.items()},
        "not-json": {name: set(f["invalid_json"]["rows"]) for name, f in found.items() if "invalid_json" in f},
    }
    return {kind: rows for kind, rows in flags.items() if any(rows.values())}
