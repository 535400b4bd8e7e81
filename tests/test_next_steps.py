"""What would most likely help next: each point from the run's own evidence, and nothing where nothing stands out."""

from __future__ import annotations

import copy

from pipeline.next_steps import next_steps
from pipeline.render.markdown import next_steps_markdown


def _candidate(role: str, value: float) -> dict:
    return {"role": role, "metrics": {"exact_match": {"value": value, "ci95": [value - 0.03, value + 0.03]}}}


QUIET = {
    "metric": "exact_match",
    "eval_rows": 200,
    "candidates": {
        "base": _candidate("base", 0.0),
        "specialized": _candidate("specialized", 0.93),
        "gguf-q8_0": _candidate("quantized", 0.935),
        "gguf-q4_k_m": _candidate("quantized", 0.93),
        "reference": _candidate("reference", 0.80),
    },
    "comparisons": {
        "gguf-q8_0": {"wins": 0, "losses": 1, "test": "mcnemar_exact", "p_value": 1.0},
        "gguf-q4_k_m": {"wins": 1, "losses": 1, "test": "mcnemar_exact", "p_value": 1.0},
    },
    "validation": {
        "metric": "exact_match",
        "rows": 80,
        "stopped_early": False,
        "curve": [{"step": 45, "value": 0.9875}, {"step": 90, "value": 1.0}],
    },
    "labels": {
        "train_rows": {"a": 72, "b": 72, "c": 70},
        "candidates": {
            "specialized": {
                "per_label": {
                    "a": {"recall": 0.95, "support": 20},
                    "b": {"recall": 0.9, "support": 20},
                    "c": {"recall": 0.95, "support": 20},
                },
                "confusions": [{"expected": "b", "answered": "a", "rows": 2}],
            }
        },
    },
    "answers": {"max_new_tokens": 16, "candidates": {"specialized": {"cut_off": {"count": 0, "share": 0.0}}}},
}


def test_a_quiet_run_says_nothing_stands_out():
    (step,) = next_steps(QUIET)
    assert step["kind"] == "nothing" and step["advice"] == "nothing in this run's evidence stands out"
    assert step["evidence"] == (
        "the validation curve levelled off or reached its ceiling; no label is both thin in training and missed, and "
        "every answer is one of the labels; no answer was cut off at evaluate.max_new_tokens; the quantized files "
        "lose alike"
    )
    shown = next_steps_markdown({"next_steps": [step]})
    assert shown[0] == "## What would most likely help next"
    evidence = step["evidence"][:1].upper() + step["evidence"][1:]
    assert shown[2] == f"- **Nothing in this run's evidence stands out.** {evidence}."
    bare = {"metric": "exact_match", "eval_rows": 10, "candidates": {"specialized": _candidate("specialized", 0.5)}}
    assert (
        next_steps(bare)[0]["evidence"]
        == "this run has no validation curve, learning curve or per-label errors to read"
    )


def test_a_validation_curve_still_rising_says_train_longer():
    report = copy.deepcopy(QUIET)
    report["validation"]["curve"] = [{"step": 60, "value": 0.797}, {"step": 120, "value": 0.933}]
    (step,) = next_steps(report)
    assert step["kind"] == "train_longer" and "train.epochs" in step["advice"]
    assert step["evidence"] == (
        "validation exact_match 0.797 at step 60 → 0.933 at step 120, the last pass (11 more of 80 validation rows "
        "right)"
    )
    report["validation"]["curve"][-1]["value"] = 0.81  # one row's worth: within chance
    assert next_steps(report)[0]["kind"] == "nothing"
    report["validation"].update(stopped_early=True, curve=[{"step": 60, "value": 0.5}, {"step": 120, "value": 0.9}])
    assert next_steps(report)[0]["kind"] == "nothing"  # it stopped because validation stopped improving


def test_a_curve_that_has_not_flattened_asks_for_rows_and_a_flat_one_for_another_lever():
    report = copy.deepcopy(QUIET)
    report["learning_curve"] = {
        "flattened": False,
        "last_doubling_gain": 0.075,
        "points": [{"rows": 540, "value": 0.82}, {"rows": 1079, "value": 0.897}],
        "target": 0.9,
        "projection": {"rows": 1122},
    }
    (step,) = next_steps(report)
    assert step["kind"] == "more_rows"
    assert "the 80 validation rows are such rows: train.refit" in step["advice"]  # held out, and cheap to add
    assert (
        "to 1,079 rows gained +0.075 exact_match" in step["evidence"]
        and "about 1,122 rows projected" in (step["evidence"])
    )
    report["learning_curve"].update(flattened=True, last_doubling_gain=0.004)
    report["learning_curve"]["points"][-1]["value"] = 0.7  # below the reference's 0.80 and not rising
    (step,) = next_steps(report)
    assert step["kind"] == "rows_will_not_help" and "larger base" in step["advice"]


def test_a_thin_confused_label_and_invented_labels_are_named():
    report = copy.deepcopy(QUIET)
    report["labels"]["train_rows"]["c"] = 12
    mine = report["labels"]["candidates"]["specialized"]
    mine["per_label"]["c"]["recall"] = 0.55
    mine["confusions"] += [
        {"expected": "c", "answered": "a", "rows": 6},
        {"expected": "c", "answered": "swap_email", "rows": 3},
    ]
    thin, outside = next_steps(report)
    assert thin["kind"] == "thin_label" and "'c'" in thin["advice"]
    assert thin["evidence"] == (
        "12 training rows against a median of 72 per label; recall 0.550 on 20 eval rows against 0.930 overall; "
        "answered as 'a' on 6, 'swap_email' on 3"
    )
    assert outside["kind"] == "outside_labels" and outside["evidence"].startswith(
        "3 of 200 answers are none of the 3 labels (e.g. 'swap_email')"
    )


def test_answers_cut_off_a_quantized_outlier_and_a_better_larger_base():
    report = copy.deepcopy(QUIET)
    report["answers"]["candidates"]["specialized"]["cut_off"]["count"] = 4
    report["candidates"]["gguf-q4_0"] = _candidate("quantized", 0.86)
    report["comparisons"]["gguf-q4_0"] = {"wins": 15, "losses": 1, "test": "mcnemar_exact", "p_value": 0.0005}
    report["sweep"] = {
        "metric": "exact_match",
        "chosen": 0,
        "trials": [
            {"index": 0, "status": "done", "settings": {"model.base": "small"}, "value": 0.883, "ci95": [0.82, 0.94]},
            {"index": 1, "status": "done", "settings": {"model.base": "large"}, "value": 0.9, "ci95": [0.84, 0.96]},
        ],
    }
    kinds = {step["kind"]: step for step in next_steps(report)}
    assert set(kinds) == {"cut_off", "quantized_outlier", "larger_base"}
    assert "4 of 200 specialist answers reached evaluate.max_new_tokens (16)" in kinds["cut_off"]["evidence"]
    outlier = kinds["quantized_outlier"]
    assert outlier["advice"].startswith("ship gguf-q8_0 rather than gguf-q4_0") and "p = 0.0005" in outlier["evidence"]
    assert (
        "ship large" in kinds["larger_base"]["advice"]
        and "large 0.900 [0.840, 0.960]" in kinds["larger_base"]["evidence"]
    )
    # a sibling that drops as much but whose difference from the specialist is chance is no outlier
    report["comparisons"]["gguf-q4_0"]["p_value"] = 0.2
    assert "quantized_outlier" not in {step["kind"] for step in next_steps(report)}


def test_synthetic_rows_that_did_not_pay_and_labels_the_check_thinned_are_named():
    report = copy.deepcopy(QUIET)
    report["synthesis"] = {"balance": {"a": {"asked": 30, "kept": 21}, "b": {"asked": 30, "kept": 8}}}
    report["candidates"]["seed-only"] = _candidate("seed_only", 0.92)
    report["comparisons"]["seed-only"] = {"wins": 6, "losses": 4, "test": "mcnemar_exact", "p_value": 0.75}
    kinds = {step["kind"]: step for step in next_steps(report)}
    assert set(kinds) == {"synthetic_rows_did_not_pay", "synthetic_labels_thinned"}
    assert kinds["synthetic_rows_did_not_pay"]["evidence"] == (
        "exact_match 0.930 with them against 0.920 on the seed rows alone (won 6, lost 4, p = 0.75)"
    )
    assert kinds["synthetic_labels_thinned"]["evidence"] == "rows kept of those asked: b 8 of 30"
    report["comparisons"]["seed-only"] = {"wins": 45, "losses": 2, "test": "mcnemar_exact", "p_value": 1.6e-11}
    assert {step["kind"] for step in next_steps(report)} == {"synthetic_labels_thinned"}  # the rows paid


def test_a_refit_that_did_worse_than_the_chosen_adapter_says_turn_it_off():
    report = copy.deepcopy(QUIET)
    report["validation"]["refit"] = {"refitted": True, "why": "..."}
    report["candidates"]["before-refit"] = _candidate("before_refit", 0.97)
    report["comparisons"]["before-refit"] = {"wins": 1, "losses": 9, "test": "mcnemar_exact", "p_value": 0.021}
    (step,) = next_steps(report)
    assert step["kind"] == "refit_lost" and step["advice"].startswith("turn off train.refit")
    assert step["evidence"] == "exact_match 0.930 refitted against 0.970 before the refit (won 1, lost 9, p = 0.021)"
    report["comparisons"]["before-refit"] = {"wins": 10, "losses": 0, "test": "mcnemar_exact", "p_value": 0.002}
    assert [step["kind"] for step in next_steps(report)] == ["nothing"]  # the refit paid
