"""Report numbers on generations fixed by hand, against values computed by hand."""

import evaluate
import pytest

from pipeline.metrics import available_metrics, metric_path
from pipeline.recipe import load_recipe
from pipeline.report import bootstrap_ci, build_report, gap_closed, mcnemar_exact_p, render_markdown


def test_exact_match_module_loads_offline_by_path_and_scores_per_row():
    assert "exact_match" in available_metrics()
    metric = evaluate.load(metric_path("exact_match"))
    out = metric.compute(
        predictions=[" refund_status", "Track_order", "cancel"],
        references=["refund_status", "track_order", "cancel_order"],
    )
    assert out == {"exact_match": 1 / 3, "per_row": [1, 0, 0]}
    out = metric.compute(predictions=["Track_order"], references=["track_order"], ignore_case=True)
    assert out["exact_match"] == 1.0


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    rows = [1] * 30 + [0] * 10
    low, high = bootstrap_ci(rows, samples=1000, seed=0)
    assert bootstrap_ci(rows, samples=1000, seed=0) == (low, high)
    standard_error = (0.75 * 0.25 / 40) ** 0.5  # the normal approximation agrees within a few points
    assert low == pytest.approx(0.75 - 1.96 * standard_error, abs=0.03)
    assert high == pytest.approx(0.75 + 1.96 * standard_error, abs=0.03)
    assert bootstrap_ci([1, 1, 1], samples=200) == (1.0, 1.0)


def test_gap_closed_and_mcnemar_by_hand():
    assert gap_closed(specialized=0.8, base=0.2, reference=0.9) == pytest.approx(0.6 / 0.7)
    assert gap_closed(0.5, 0.5, 0.5) is None
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0


def cost(**overrides):
    base = {
        "size_on_disk_bytes": 1000,
        "peak_memory_bytes": 2000,
        "seconds_per_example_p50": 0.01,
        "seconds_per_example_p95": 0.02,
        "generated_tokens_per_second": 100.0,
        "prompt_tokens_per_example": 12.0,
    }
    return {**base, **overrides}


def candidate(role, per_row, **kw):
    return {
        "role": role,
        "metrics": {"exact_match": {"value": sum(per_row) / len(per_row), "per_row": per_row}},
        **cost(**kw),
    }


@pytest.fixture
def results():
    return {
        "eval_rows": 4,
        "candidates": {
            "base": candidate("base", [0, 0, 1, 0]),
            "specialized": candidate("specialized", [1, 1, 1, 0], seconds_per_example_p50=0.01, peak_memory_bytes=1000),
            "bnb-nf4": candidate("quantized", [1, 1, 0, 0]),
            "reference": candidate("reference", [1, 1, 1, 1], seconds_per_example_p50=0.05, peak_memory_bytes=8000),
        },
    }


def test_report_numbers_comparisons_and_gates(results, write_recipe):
    recipe = write_recipe("""
        name: t
        model: {base: org/m}
        data: {train: a.jsonl, eval: b.jsonl, prompt: "{x}", target: "{y}"}
        evaluate:
          bootstrap_samples: 200
          reference: {model: org/big}
          gates: {specialized_min: 0.7, min_gap_closed: 0.9, quantized_max_drop: 0.2}
    """)
    report = build_report(results, load_recipe(recipe))
    assert report["candidates"]["specialized"]["metrics"]["exact_match"]["value"] == 0.75
    assert report["gap_closed"] == pytest.approx((0.75 - 0.25) / (1.0 - 0.25))
    assert report["comparisons"]["base"] == {
        "wins": 2,
        "losses": 0,
        "p_value": 0.5,
        "won_rows": [0, 1],
        "lost_rows": [],
    }
    assert report["comparisons"]["reference"]["losses"] == 1
    checks = report["gates"]["checks"]
    assert checks["specialized_min"]["passed"] is True
    assert checks["min_gap_closed"]["passed"] is False  # 0.667 < 0.9
    assert checks["quantized_max_drop"]["value"] == pytest.approx(0.25) and not checks["quantized_max_drop"]["passed"]
    assert report["gates"]["passed"] is False

    markdown = render_markdown(report, flips=[])
    assert "| specialized | specialized | 0.750 [" in markdown
    assert "5.0x as fast as the reference" in markdown
    assert "peaks at 0.12x the reference's memory" in markdown
    assert "**FAIL** `min_gap_closed`: 0.667 (threshold 0.9)" in markdown
