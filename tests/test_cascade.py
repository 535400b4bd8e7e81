"""The cascade on tiny models: the threshold is chosen on validation rows only, applied unchanged to the eval
rows, and the report states what the cascade answered locally and what it scored."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.runs import run_dir_for
from pipeline.stages.cascade import choose_threshold

CASCADE = """
data: {validation: 24}
quantize: []
evaluate: {metrics: [exact_match, chrf], gates: {quantized_max_drop: null}}
cascade: {rule: max_defer, max_defer: 0.5}
publish: {repo: someone/tiny-cascade, private: false}
"""


def _rule(**kwargs):
    return SimpleNamespace(**{"rule": "match_reference", "target": None, "max_defer": None, **kwargs})


def test_rules_on_a_known_validation_set():
    confidences = [0.9, 0.8, 0.7, 0.6, 0.5]
    local = [1, 1, 0, 1, 0]
    reference = [1, 1, 1, 0, 1]
    # the reference alone scores 4/5; answering locally at 0.6 and above (4 of 5 rows) also scores 4/5, and at
    # 0.8 too (2 of 5): the most local answers that match it is the threshold
    threshold, why = choose_threshold(confidences, local, reference, _rule())
    assert threshold == 0.6 and "80%" in why
    assert choose_threshold(confidences, local, reference, _rule(rule="target", target=1.0))[0] == math.inf
    threshold, _ = choose_threshold(confidences, local, reference, _rule(rule="max_defer", max_defer=0.2))
    assert threshold == 0.6  # at most 1 of 5 deferred: 0.6 (the 0.5 row deferred) scores 4/5, 0.5 scores 3/5


def test_a_cascades_latency_mixes_the_local_answers_with_the_deferred_ones():
    from pipeline.stats import cascade_latency

    # half the requests answered in 1 s locally; the other half wait 1 s there and 10 s more at the reference
    found = cascade_latency([1.0, 1.0], [10.0], share_local=0.5)
    assert found == {"mean": pytest.approx(6.0), "p50": 1.0, "p95": 11.0}
    assert cascade_latency([1.0, 3.0], [10.0, 20.0], share_local=1.0)["p95"] == 3.0  # nothing deferred
    assert cascade_latency([1.0], [10.0], share_local=0.0)["mean"] == pytest.approx(11.0)


def test_calibration_bins_and_expected_error():
    from pipeline.stats import calibration

    found = calibration([0.95, 0.95, 0.15, 0.15, 1.0], [1, 0, 0, 0, 1], bins=10)
    assert [(b["low"], b["rows"]) for b in found["bins"]] == [(0.1, 2), (0.9, 3)]  # 1.0 falls in the top bin
    top = found["bins"][1]
    assert top["accuracy"] == pytest.approx(2 / 3) and top["confidence"] == pytest.approx((0.95 + 0.95 + 1.0) / 3)
    # |0 - 0.15| over 2 rows, |2/3 - 0.9667| over 3 rows, weighted by rows
    assert found["ece"] == pytest.approx(2 / 5 * 0.15 + 3 / 5 * abs(2 / 3 - 2.9 / 3))


def test_a_cascade_chooses_on_validation_and_reports_on_the_eval_rows(tiny_recipe, write_recipe, tmp_path):
    recipe = write_recipe(f"extends: {tiny_recipe.name}\n{CASCADE}", "cascade.yaml")
    runs = tmp_path / "a"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    run_dir = run_dir_for(load_recipe(recipe), runs)
    result = json.loads((run_dir / "cascade" / "result.json").read_text())
    cascade = result["candidates"]["specialized"]
    assert cascade["validation"]["share_local"] >= 0.5  # the rule, on the rows that chose it
    assert cascade["calibration"]["rows"] == 24 and 0 <= cascade["calibration"]["ece"] <= 1
    assert 0 <= cascade["share_local"] <= 1 and cascade["ci95"][0] <= cascade["value"] <= cascade["ci95"][1]
    seconds = cascade["latency_seconds"]  # from the timed single requests of the specialist and the reference
    assert 0 < seconds["p50"] <= seconds["p95"] and seconds["mean"] > 0
    eval_answers = {
        name: [json.loads(line) for line in (run_dir / "evaluate" / "generations" / f"{name}.jsonl").open()][1:]
        for name in ("specialized", "reference")
    }
    threshold = cascade["threshold"] if cascade["threshold"] is not None else math.inf
    local = sum(e["confidence"] >= threshold for e in eval_answers["specialized"]) / len(eval_answers["specialized"])
    assert cascade["share_local"] == pytest.approx(local)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["cascade"]["candidates"]["specialized"]["value"] == cascade["value"]
    assert "## Cascade" in (run_dir / "report" / "report.md").read_text()
    assert (run_dir / "report" / "cascade.png").stat().st_size > 0
    # the card carries the operating point; a public bundle carries no text of the data's rows
    assert main(["publish", str(recipe), "--runs-dir", str(runs), "--dry-run", "--allow-failed-gates"]) == 0
    bundle = run_dir / "publish"
    card = (bundle / "README.md").read_text()
    assert "### Cascade" in card and (bundle / "cascade.png").is_file()
    shown = json.loads((bundle / "report.json").read_text())["cascade"]["candidates"]["specialized"]
    assert all(set(w) == {"row", "confidence"} for w in shown["confident_wrong"])
    # the test rows never move the threshold
    test_file = load_recipe(recipe).recipe.data.eval
    rows = [json.loads(line) for line in open(test_file)]
    with open(test_file, "w") as f:
        f.writelines(json.dumps({**row, "label": "something_else"}) + "\n" for row in rows)
    assert main(["run", str(recipe), "--runs-dir", str(tmp_path / "b")]) == 0
    again = json.loads((run_dir_for(load_recipe(recipe), tmp_path / "b") / "cascade" / "result.json").read_text())
    assert again["candidates"]["specialized"]["threshold"] == cascade["threshold"]
    assert again["candidates"]["specialized"]["value"] != cascade["value"] or cascade["value"] == 0


def test_a_reference_that_answers_only_the_deferred_rows_is_asked_for_those_alone(tiny_recipe, write_recipe, tmp_path):
    every = write_recipe(f"extends: {tiny_recipe.name}\n{CASCADE}", "every.yaml")
    deferred = write_recipe("extends: every.yaml\ncascade: {reference_answers: deferred_rows}\n", "deferred.yaml")
    assert main(["run", str(every), "--runs-dir", str(tmp_path / "every")]) == 0
    assert main(["run", str(deferred), "--runs-dir", str(tmp_path / "deferred")]) == 0
    both = [run_dir_for(load_recipe(r), tmp_path / name) for r, name in ((every, "every"), (deferred, "deferred"))]
    measured, only = (json.loads((d / "cascade" / "result.json").read_text()) for d in both)
    # the same threshold: it never depended on the eval rows
    assert only["candidates"]["specialized"]["threshold"] == measured["candidates"]["specialized"]["threshold"]
    run_dir = both[1]
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert "reference" not in results["candidates"]  # the evaluation did not ask it
    lines = (run_dir / "cascade" / "generations" / "reference-deferred.jsonl").read_text().splitlines()[1:]
    asked = {json.loads(line)["row"] for line in lines}
    threshold = only["candidates"]["specialized"]["threshold"]
    threshold = math.inf if threshold is None else threshold
    local = [json.loads(line) for line in (run_dir / "evaluate/generations/specialized.jsonl").open()][1:]
    below = [e["row"] for e in local if e["confidence"] < threshold]
    assert 0 < len(below) < len(local) and len(asked) == len(below) == only["reference_eval_rows"]
    assert only["candidates"]["specialized"]["versus_reference"] is None
    assert only["candidates"]["specialized"]["curve_rows"] == "validation"
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert "reference" not in report["candidates"] and report["cascade"]["reference_value"] is None
    assert f"answered only the {len(below)} of 24 eval rows" in (run_dir / "report" / "report.md").read_text()
