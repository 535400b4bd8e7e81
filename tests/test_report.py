"""Report numbers on generations fixed by hand, against values computed by hand."""

import json
import re

import evaluate
import pytest
from pydantic import ValidationError

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.metrics import available_metrics, metric_path, score_function
from pipeline.recipe import load_recipe
from pipeline.render import tables
from pipeline.render.markdown import render_markdown
from pipeline.stages.report import build_report
from pipeline.stats import bootstrap_ci, gap_closed, mcnemar_exact_p


def test_exact_match_module_loads_offline_by_path_and_scores_per_row():
    assert "exact_match" in available_metrics()
    metric = evaluate.load(metric_path("exact_match"))
    out = metric.compute(
        predictions=[" refund_status", "Track_order", "cancel"],
        references=["refund_status", "track_order", "cancel_order"],
    )
    assert out == {"exact_match": 1 / 3, "per_row": [1, 0, 0], "mean_of_rows": True}
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
          gates: {specialized_min: 0.7, min_gap_closed: 0.9, quantized_max_drop: 0.2, max_latency_ratio: 0.5}
    """)
    report = build_report(results, load_recipe(recipe))
    assert report["candidates"]["specialized"]["metrics"]["exact_match"]["value"] == 0.75
    assert report["gap_closed"] == pytest.approx((0.75 - 0.25) / (1.0 - 0.25))
    assert report["comparisons"]["base"] == {
        "test": "mcnemar_exact",
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
    assert checks["max_latency_ratio"]["value"] == pytest.approx(0.2) and checks["max_latency_ratio"]["passed"]
    assert report["gates"]["passed"] is False

    markdown = render_markdown(report, flips=[])
    assert markdown.startswith("# t: specialized vs base vs reference\n")
    assert "| specialized | specialized | transformers | 0.750 [" in markdown
    assert "5.0x as fast as the reference" in markdown
    assert "peaks at 0.12x the reference's memory" in markdown
    assert "**FAIL** `min_gap_closed`: 0.667 (threshold 0.9)" in markdown


def test_a_run_without_a_reference_is_not_titled_as_one(results, write_recipe):
    del results["candidates"]["reference"]
    recipe = write_recipe("""
        name: t
        model: {base: org/m}
        data: {train: a.jsonl, eval: b.jsonl, prompt: "{x}", target: "{y}"}
        evaluate: {bootstrap_samples: 100}
    """)
    report = build_report(results, load_recipe(recipe))
    assert render_markdown(report, flips=[]).startswith("# t: specialized vs base\n")
    assert tables.title(report) == "t: specialized vs base"  # report.html's heading too


def test_gguf_variants_get_single_request_speed_and_a_fidelity_table_with_warnings(results, write_recipe):
    recipe = write_recipe("""
        name: t
        model: {base: org/m}
        data: {train: a.jsonl, eval: b.jsonl, prompt: "{x}", target: "{y}"}
        quantize: [{kind: gguf, type: q4_k_m}]
        evaluate: {bootstrap_samples: 200}
    """)
    del results["candidates"]["bnb-nf4"], results["candidates"]["reference"]
    results["candidates"]["specialized"].update(single_request_seconds_p50=0.3, stopped_at_end_token=1.0)
    results["candidates"]["gguf-q4_k_m"] = candidate(
        "quantized", [1, 1, 1, 1], runtime="llama.cpp", single_request_seconds_p50=0.1, stopped_at_end_token=0.5
    )
    quantized = {
        "variants": {
            "merged": {
                "fidelity": {"merge": {"rows": 4, "positions": 40, "top1_agreement": 1.0, "max_abs_logit_diff": 2e-5}}
            },
            "gguf-q4_k_m": {
                "kind": "gguf",
                "type": "q4_k_m",
                "tensor_types": {"Q5_0": 166, "F32": 61},
                "fidelity": {
                    "export": {
                        "rows": 4,
                        "positions": 40,
                        "top1_agreement": 0.84,
                        "nll": 1.2,
                        "nll_merged": 1.1,
                        "answer_top1_agreement": 0.95,
                        "answer_nll": 0.1,
                        "answer_nll_merged": 0.05,
                    },
                    "token_parity": {"prompts": 4, "identical": 3, "mismatched_rows": [2]},
                    "end_token": {"trained": 2, "gguf": 0, "same": False},
                },
            },
        }
    }
    report = build_report(results, load_recipe(recipe), quantized=quantized)
    assert report["fidelity"]["gguf-q4_k_m"]["tensor_types"] == {"Q5_0": 166, "F32": 61}
    markdown = render_markdown(report, flips=[])
    assert "- gguf-q4_k_m (llama.cpp): exact_match 1.000 (+0.250 vs specialized), 3.0x the specialized" in markdown
    assert "WARNING gguf-q4_k_m: llama.cpp tokenizes 1 of 4 prompts differently" in markdown
    assert "WARNING gguf-q4_k_m: the file's end token is not the one" in markdown
    row = "| gguf-q4_k_m | q4_k_m | 166 Q5_0, 61 F32 | 0.840 | 0.950 | 1.200 (1.100) | 0.100 (0.050) | 3/4 | NO | 50% |"
    assert row in markdown
    assert "agrees with base + adapter on 100.0% of top-1 tokens over 40 positions" in markdown


def scores(name, predictions, references, **kw):
    return evaluate.load(metric_path(name)).compute(predictions=predictions, references=references, **kw)


def test_label_accuracy_forgives_case_quotes_and_punctuation():
    out = scores(
        "accuracy", ["`Cancel_Order`.", "track_order", "refund"], ["cancel_order", "track_order", "refund_status"]
    )
    assert out["per_row"] == [1.0, 1.0, 0.0]


def test_macro_f1_by_hand():
    preds, refs = ["a", "a", "b", "x", "a"], ["a", "b", "b", "c", "a"]
    out = scores("macro_f1", preds, refs)
    # a: tp 2 (rows 0, 4), fp 1 (row 1), fn 0 -> 4/5; b: tp 1, fp 0, fn 1 -> 2/3; c: 0
    assert out["macro_f1"] == pytest.approx((4 / 5 + 2 / 3 + 0) / 3)
    assert out["per_row"] == [1.0, 0.0, 1.0, 0.0, 1.0] and out["mean_of_rows"] is False


def test_rouge_l_and_chrf_by_hand():
    # LCS of "the cat sat" and "the cat sat down" is 3 words: F1 = 2 * 3 / (3 + 4)
    assert scores("rouge_l", ["the cat sat"], ["The cat sat down"])["rouge_l"] == pytest.approx(6 / 7)
    assert scores("rouge_l", ["dog"], ["cat"])["rouge_l"] == 0.0
    assert scores("chrf", ["same text"], ["same text"])["chrf"] == pytest.approx(1.0)
    assert scores("chrf", ["xyz"], ["abc"])["chrf"] == 0.0
    assert 0.0 < scores("chrf", ["track order"], ["track_order"])["chrf"] < 1.0


def test_json_match_scores_fields_and_validity():
    out = scores(
        "json_match",
        ['{"city": "Lyon", "qty": 2}', '{"city": "Porto"}', "not json"],
        ['{"city": "Lyon", "qty": 3}', '{"city": "Porto"}', '{"city": "Oslo"}'],
    )
    assert out["per_row"] == [0.5, 1.0, 0.0]
    assert out["json_valid"] == pytest.approx(2 / 3)


def test_json_in_one_code_fence_is_read_inside_it_and_nothing_else_around_it_is():
    fence = "```"
    answers = [f'{fence}json\n{{"city": "Lyon"}}\n{fence}', f'Here it is:\n{fence}json\n{{"city": "Lyon"}}\n{fence}',
               f'{fence}\n{{"city": "Lyon"}}\n{fence}', f'{fence}json\n{{"city": "Lyon"}}']  # fmt: skip
    out = scores("json_match", answers, ['{"city": "Lyon"}'] * 4)
    assert out["per_row"] == [1.0, 0.0, 1.0, 0.0]  # text around the fence, or a fence never closed: not JSON
    assert scores("json_top_level", answers, ['{"city": "Lyon"}'] * 4)["per_row"] == [1.0, 0.0, 1.0, 0.0]


def test_json_match_scores_nested_fields_list_items_and_extra_fields():
    reference = '{"intent": "book", "slots": {"city": "Lyon", "date": "friday"}, "tags": ["a", "b"]}'
    predictions = [
        '{"tags": ["b", "a"], "slots": {"date": "friday", "city": "Lyon"}, "intent": "book"}',  # the same object
        '{"intent": "book", "slots": {"city": "Porto", "date": "friday", "time": "9"}, "tags": ["a"]}',
        '{"intent": "book", "slots": {}}',
        "{not json",
    ]
    out = scores("json_match", predictions, [reference] * 4)
    # fields: intent, slots.city, slots.date, tags[] x2 = 5 expected. Row 2 predicts 5 (time extra, city wrong,
    # one tag missing): 3 match, F1 = 6 / 10. Row 3 predicts intent and an empty slots object: 1 match, 2 / 7.
    assert out["per_row"] == pytest.approx([1.0, 0.6, 2 / 7, 0.0])
    assert out["exact_object"] == 0.25 and out["json_valid"] == 0.75
    assert out["field_recall"] == pytest.approx((5 + 3 + 1) / 20)
    assert out["field_precision"] == pytest.approx((5 + 3 + 1) / (5 + 5 + 2))
    city, time = out["per_field"]["slots.city"], out["per_field"]["slots.time"]
    assert city["support"] == 4 and city["recall"] == 0.25 and city["precision"] == 0.5
    assert time["support"] == 0 and time["precision"] == 0.0 and time["recall"] is None
    assert out["per_field"]["tags[]"]["recall"] == pytest.approx(3 / 8)
    # the report's JSON fields section: per candidate the object rates, then each field's F1, most expected first
    from pipeline.render.markdown import json_fields_markdown

    perfect = scores("json_match", [reference], [reference])
    shown = "\n".join(
        json_fields_markdown(
            {
                "candidates": {
                    "specialized": {"metrics": {"json_match": out}},
                    "reference": {"metrics": {"json_match": perfect}},
                }
            }
        )
    )
    assert "| whole object right | 0.250 | 1.000 |" in shown
    assert shown.index("`tags[]` (8)") < shown.index("`intent` (4)") and "| `slots.city` (4) | 0.333 | 1.000 |" in shown
    # the earlier score, under its own name: top-level keys of the reference, a nested object as one value
    top = scores("json_top_level", predictions, [reference] * 4)
    assert top["per_row"] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0.0])


def test_paired_test_is_mcnemar_for_binary_rows_and_a_bootstrap_otherwise():
    from pipeline.stats import paired

    assert paired([1, 1, 0], [0, 1, 0])["test"] == "mcnemar_exact"
    graded = paired([0.9] * 30, [0.1] * 30, samples=200)
    assert graded["test"] == "paired_bootstrap" and graded["wins"] == 30 and graded["p_value"] == 0.0
    assert paired([0.5, 0.7], [0.5, 0.7], samples=200)["p_value"] == 1.0


def test_macro_f1_interval_is_recomputed_on_resampled_rows(write_recipe):
    recipe = load_recipe(
        write_recipe("""
        name: t
        model: {base: org/m}
        data: {train: a.jsonl, eval: b.jsonl, prompt: "{x}", target: "{y}"}
        evaluate: {metrics: [macro_f1], bootstrap_samples: 200}
    """)
    )
    preds, refs = ["a", "b"] * 20, ["a", "a"] * 20
    value, per_row = score_function("macro_f1")(preds, refs)
    results = {
        "eval_rows": 40,
        "candidates": {
            "specialized": {
                "role": "specialized",
                **cost(),
                "metrics": {"macro_f1": {"value": value, "per_row": per_row, "mean_of_rows": False}},
            }
        },
    }
    report = build_report(results, recipe, {"specialized": (preds, refs)})
    low, high = report["candidates"]["specialized"]["metrics"]["macro_f1"]["ci95"]
    # only label a is in the references: tp 20, fp 0, fn 20 -> F1 2/3, while the 0/1 rows average 0.5;
    # an interval of the row mean would be centred on 0.5
    assert value == pytest.approx(2 / 3)
    assert low <= value <= high and (low + high) / 2 > 0.6


def test_user_metric_from_a_file(tmp_path):
    from pipeline.metrics import scorer as metric_scorer

    (tmp_path / "my_metric.py").write_text(
        "def length_ok(preds, refs):\n    return [len(p) <= len(r) for p, r in zip(preds, refs)]\n"
    )
    scorer = metric_scorer(f"{tmp_path / 'my_metric.py'}:length_ok")
    assert scorer(["ab", "abcd"], ["abc", "abc"], False) == {"value": 0.5, "per_row": [1.0, 0.0], "mean_of_rows": True}


def test_bench_gives_the_same_answers_both_ways_and_its_figures_reach_the_manual(tiny_recipe, tmp_path, capsys):
    from pipeline import results

    figures = tmp_path / "bench.json"
    args = ["bench", str(tiny_recipe), "--rows", "12", "--set", "evaluate.batch_size=4", "--out", str(figures)]
    assert main(args) == 0
    assert "batched / naive tokens/s" in capsys.readouterr().out
    measured = json.loads(figures.read_text())["figures"]
    assert measured["identical"] == measured["rows"] == 12
    assert measured["batched"]["tokens"] == measured["naive"]["tokens"]  # same work, so tokens/s compare honestly
    kept = results.add(figures, "bench-tiny", tmp_path / "kept")
    table = results.table(json.loads(kept.read_text()))
    assert f"| batched | {measured['batched']['tokens_per_second']:.1f} |" in table
    assert f"Batched / one at a time: **{measured['ratio']:.2f}x** tokens/s; the same answer on 12 of 12 rows" in table
    assert f"Measured by `specialist bench {tiny_recipe} --set evaluate.batch_size=4 --rows 12` at commit" in table
    with pytest.raises(PipelineError, match="is not a benchmark's JSON"):
        results.add(tiny_recipe, "not-a-benchmark", tmp_path / "kept")
    (tmp_path / "other.json").write_text('{"rows": 3}')
    with pytest.raises(PipelineError, match="neither a run folder nor a benchmark"):
        results.add(tmp_path / "other.json", "not-a-benchmark", tmp_path / "kept")


def test_errors_by_label_count_each_labels_precision_recall_and_confusions():
    from pipeline import error_analysis
    from pipeline.render.markdown import labels_markdown

    references = ["a", "a", "a", "b", "b", "c"]
    predictions = ["a", "b", "x", "b", "b", "a"]
    scores = error_analysis.per_label(predictions, references)
    assert scores["a"] == {"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3, "predicted": 2}
    assert scores["b"]["precision"] == 2 / 3 and scores["b"]["recall"] == 1.0
    assert scores["c"]["precision"] is None and scores["c"]["f1"] == 0.0  # never answered
    pairs = error_analysis.confusions(predictions, references)
    assert {(p["expected"], p["answered"], p["rows"]) for p in pairs} == {("a", "b", 1), ("a", "x", 1), ("c", "a", 1)}
    found = error_analysis.label_analysis({"specialized": (predictions, references)}, ["a", "a", "b", "c"] * 2, False)
    assert found["train_rows"] == {"a": 4, "b": 2, "c": 2}
    table = "\n".join(labels_markdown({"labels": found}))
    assert table.index("| c | 2 | 1 |") < table.index("| a | 4 | 3 |")  # the worst F1 first


def test_log_axis_ticks_are_written_as_plain_numbers():
    from pipeline.render.plots import tick_label

    assert [tick_label(v) for v in (0.05, 0.2, 1.0, 2.0, 500.0, 2000.0)] == [
        "0.05", "0.2", "1", "2", "500", "2,000"
    ]  # fmt: skip


def test_device_cost_counts_cpu_seconds_and_reads_rapl_where_there_is_one(tmp_path, monkeypatch):
    from pipeline import runtimes

    with runtimes.DeviceCost() as cost:
        sum(i * i for i in range(2_000_000))  # CPU work in this process
    assert cost.cpu_seconds > 0.01
    # a machine with RAPL: two packages, one of whose counters wraps while we answer
    for name, before in {"intel-rapl:0": 1_000_000, "intel-rapl:1": 9_000_000}.items():
        zone = tmp_path / name
        zone.mkdir()
        (zone / "energy_uj").write_text(str(before))
        (zone / "max_energy_range_uj").write_text("10000000")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a subzone (core), inside its package's figure: not added again
    monkeypatch.setattr(runtimes, "RAPL", tmp_path)
    with runtimes.DeviceCost() as cost:
        (tmp_path / "intel-rapl:0" / "energy_uj").write_text("4000000")
        (tmp_path / "intel-rapl:1" / "energy_uj").write_text("1000000")
    assert cost.energy_counter == "rapl" and cost.energy_joules == pytest.approx(3.0 + 2.0)
    monkeypatch.setattr(runtimes, "RAPL", tmp_path / "none")
    with runtimes.DeviceCost() as cost:
        pass
    assert cost.energy_counter is None and cost.energy_joules is None


def test_answer_analysis_counts_lengths_cut_off_rows_and_answers_that_are_not_json():
    from pipeline.error_analysis import answer_analysis, is_json_task
    from pipeline.render.markdown import answers_markdown

    references = ['{"a": 1}', '{"a": 2}', '{"a": 3}', '{"a": 4}']
    assert is_json_task(["exact_match"], references) and is_json_task(["json_match"], ["free text"])
    assert not is_json_task(["chrf"], ["free text", '{"a": 1}'])
    generations = {
        "specialized": [
            {"prediction": '{"a": 1}', "generated_tokens": 5, "stopped": True},
            {"prediction": '{"a": 2', "generated_tokens": 8, "stopped": False},  # cut off mid-object
            {"prediction": "sure! a=3", "generated_tokens": 4, "stopped": True},
            {"prediction": " ", "generated_tokens": 1, "stopped": True},
        ],
    }
    found = answer_analysis(generations, references, json_task=True)
    mine = found["candidates"]["specialized"]
    assert found["expected"]["chars"] == {"mean": 8, "p50": 8, "p95": 8, "max": 8}
    assert mine["chars"]["max"] == 9 and mine["chars"]["p50"] == 7.5  # lengths 8, 7, 9, 0 (stripped)
    assert mine["generated_tokens"] == {"mean": 4.5, "p50": 4.5, "p95": 8, "max": 8}
    assert mine["median_length_ratio"] == 7.5 / 8
    assert mine["empty_rows"] == 1
    assert mine["cut_off"] == {"count": 1, "share": 0.25, "rows": [1]}
    bad = mine["invalid_json"]
    assert (bad["count"], bad["cut_off"], bad["rows"]) == (3, 1, [1, 2, 3])
    assert [(e["row"], e["cut_off"]) for e in bad["examples"]] == [(1, True), (2, False), (3, False)]
    # shared bins hold every row of every candidate and of the expected answers
    assert sum(mine["histogram"]) == sum(found["expected"]["histogram"]) == 4
    assert found["length_bin_edges_chars"][-1] > 9
    table = "\n".join(answers_markdown({"answers": {**found, "max_new_tokens": 8}}))
    assert "| specialized | 8 / 9 / 9 | 0.94 | 4 / 8 | 1 (25.0%) | 1 | 3 (75.0%; 1) |" in table
    assert '| 1 | yes | {"a": 2 |' in table and "cut off on 1 row: an answer longer than" in table
    assert answers_markdown({"answers": found, "labels": {"candidates": {}}}) == []  # label tasks: errors by label


def test_the_report_keeps_its_typed_contract_and_readers_refuse_what_breaks_it(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.report_types import REPORT_SCHEMA_VERSION, check, read_report

    metrics = {"exact_match": {"value": 0.9, "ci95": [0.8, 0.95]}}
    report = {
        "schema_version": REPORT_SCHEMA_VERSION, "recipe": "r", "run_id": "abc", "metric": "exact_match",
        "eval_rows": 20, "candidates": {"specialized": {"role": "specialized", "metrics": metrics}},
        "comparisons": {}, "gap_closed": None, "gates": {"passed": True, "checks": {}}, "fidelity": {},
        "savings": None,
    }  # fmt: skip
    assert check(report) is report
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert read_report(path) == report
    with pytest.raises(ValidationError):  # a key the contract does not name is a bug in the report stage
        check({**report, "surprise": 1})
    with pytest.raises(ValidationError):
        check({**report, "candidates": {"x": {"role": "teacher", "metrics": metrics}}})
    for text, says in (
        (json.dumps({**report, "schema_version": 5}), "report schema 5, this version reads"),
        (json.dumps(report)[:40], "is not JSON (cut short?)"),
        (json.dumps({**report, "gates": {"passed": "maybe", "checks": {}}}), "gates.passed:"),
    ):
        path.write_text(text)
        with pytest.raises(PipelineError, match=re.escape(says)) as caught:
            read_report(path)
        assert str(path) in str(caught.value) and "make report" in str(caught.value)
