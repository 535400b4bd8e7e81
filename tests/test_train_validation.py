"""Validation while training, on tiny models: held-out rows never trained on, the adapter chosen by the best
logged validation score, early stopping, resuming with the curve, and the test rows never choosing anything."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline import data, models, runtimes
from pipeline.cli import main
from pipeline.files import read_jsonl_records
from pipeline.metrics import scorer
from pipeline.recipe import DataSection, load_recipe
from pipeline.run_layout import RunLayout
from pipeline.runtimes.transformers import generate_batches
from tests.conftest import tiny_run_folder

pytestmark = pytest.mark.integration

# 96 training rows: 24 held out, 72 trained on in 5 steps of 16 per epoch; a pass every 2 steps
VALIDATION = [
    "data.validation=24",
    "train.eval_every=2",
    "train.frozen_dtype=float32",
    "train.epochs=4",
    "evaluate.metrics=[chrf]",
]


def _run(recipe, runs, overrides, verb: str = "run") -> dict:
    """`specialist run` (or `train` alone, for tests that read the training only), and what it wrote."""
    args = [str(recipe), "--runs-dir", str(runs), *[a for o in overrides for a in ("--set", o)]]
    assert main([verb, *args]) == 0
    loaded = load_recipe(recipe, overrides)
    run_dir = runs / loaded.recipe.name / loaded.run_id
    return {"loaded": loaded, "dir": run_dir, "result": json.loads((run_dir / "train" / "result.json").read_text())}


@pytest.fixture(scope="module")
def validated(tiny_models, tmp_path_factory) -> dict:
    """The tiny recipe run once with VALIDATION, for the tests that only read it."""
    folder = tmp_path_factory.mktemp("validated")
    return _run(tiny_run_folder(folder, tiny_models), folder / "runs", VALIDATION)


def test_the_default_split_holds_out_a_stratified_tenth_or_none(intents_rows, tmp_path):
    train, test = intents_rows
    rows = [json.loads(line) for line in train.open()]
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))  # 288 rows: 10% is 29
    section = DataSection(train=str(big), eval=str(test), prompt="M: {text}\nI:", target=" {label}")
    splits = data.load_splits(section)
    assert (len(splits.train), len(splits.validation)) == (259, 29)
    assert "29 of 288 training rows (the default), seeded (split_seed 0), stratified by target" == (
        splits.validation_source
    )
    assert sorted({r.target.strip() for r in splits.validation}) == sorted({r["label"] for r in rows})  # every label
    small = DataSection(train=str(train), eval=str(test), prompt="M: {text}\nI:", target=" {label}")
    splits = data.load_splits(small)  # 96 rows: 10 would be too few to tell checkpoints apart
    assert splits.validation == [] and len(splits.train) == 96 and "too few" in splits.validation_source
    with pytest.raises(data.PipelineError, match="would hold out 96 of the 96 training rows"):
        data.load_splits(small.model_copy(update={"validation": 96}))


def test_validation_rows_are_the_same_for_every_sample_size_and_never_an_eval_row(intents_rows, tmp_path):
    train, test = intents_rows
    rows = [json.loads(line) for line in train.open()]
    evals = [json.loads(line) for line in test.open()]
    big = tmp_path / "big.jsonl"  # 288 distinct rows: 29 held out by default
    copies = [rows, *([{**r, "text": f"{r['text']} ({k})"} for r in rows] for k in (2, 3))]
    big.write_text("".join(json.dumps(r) + "\n" for part in copies for r in part))
    shared = tmp_path / "eval.jsonl"  # the eval file repeats 5 training messages (as real data does)
    shared.write_text("".join(json.dumps(r) + "\n" for r in [*evals, *rows[:5]]))
    section = DataSection(train=str(big), eval=str(shared), prompt="M: {text}\nI:", target=" {label}")
    eval_keys = {r.dedup_key() for r in data.load_splits(section).eval}
    held = {}
    for limit in (None, 40, 120):  # a sweep over max_train_rows: each trial chooses on the same rows
        splits = data.load_splits(section.model_copy(update={"max_train_rows": limit}))
        held[limit] = [r.prompt for r in splits.validation]
        assert not {r.dedup_key() for r in splits.validation} & eval_keys  # never an eval row's input
        assert not {r.prompt for r in splits.validation} & {r.prompt for r in splits.train}
        assert len(splits.train) == (limit or 288 - 29)
    assert held[None] == held[40] == held[120] and len(held[None]) == 29
    assert "none of the 5 with an eval row's input" in data.load_splits(section).validation_source

    # a validation file: rows that are eval rows are left out of it, and said; mostly eval rows is refused
    some = tmp_path / "some.jsonl"
    some.write_text("".join(json.dumps(r) + "\n" for r in [*rows[40:60], *evals[:3]]))
    splits = data.load_splits(section.model_copy(update={"validation": str(some)}))
    assert len(splits.validation) == 20 and splits.validation_source.endswith(
        "3 rows with an eval row's input left out"
    )
    with pytest.raises(data.PipelineError, match=r"data.validation: 24 of the 24 rows of .*test.jsonl have the input"):
        data.load_splits(section.model_copy(update={"validation": str(test)}))


def test_validation_rows_are_never_trained_on(validated):
    run = validated
    splits = data.load_splits(run["loaded"].recipe.data)
    assert len(splits.validation) == 24 and len(splits.train) == 72 == run["result"]["rows"]
    held = {row.prompt for row in splits.validation}
    assert not held & {row.prompt for row in splits.train}
    tokenizer = models.load_tokenizer(models.ModelSource(str(run["dir"] / "train" / "adapter"), None, True))
    cache = next((run["dir"] / "data").glob("train-tokenized-*.json"))
    trained = {tokenizer.decode(ex["input_ids"]) for ex in json.loads(cache.read_text())["examples"]}
    assert not any(prompt in text for prompt in held for text in trained)


def test_the_kept_adapter_is_the_best_logged_pass_and_scores_what_was_logged(validated, tiny_models):
    from peft import PeftModel

    run = validated
    validation = run["result"]["validation"]
    curve = validation["curve"]
    assert [e["step"] for e in curve] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # and the last step, 20
    best = max(curve, key=lambda e: (e["value"], -e["step"]))  # the best; ties: the earlier
    assert (validation["chosen_step"], validation["chosen_value"]) == (best["step"], best["value"])
    logged = [r for r in read_jsonl_records(run["dir"] / "train" / "metrics.jsonl") if "validation" in r]
    assert [(r["step"], r["validation"]["chrf"]) for r in logged] == [(e["step"], e["value"]) for e in curve]
    # the adapter on disk answers the validation rows exactly as the chosen pass did
    loaded = run["loaded"]
    adapter_dir = run["dir"] / "train" / "adapter"
    tokenizer = models.load_tokenizer(models.ModelSource(str(adapter_dir), None, True))
    base = models.load_model(models.ModelSource(str(tiny_models["base"]), None, True), torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    rows = data.load_splits(loaded.recipe.data).validation
    prompts = [p.ids for p in runtimes.prompts_for(tokenizer, rows, False)]
    answers = {}
    for batch in generate_batches(model, tokenizer, prompts, list(range(len(rows))), 6, 8, progress=False):
        answers.update((e["row"], e["prediction"]) for e in batch)
    score = scorer("chrf")([answers[i] for i in range(len(rows))], [r.target for r in rows], False)
    assert score["value"] == best["value"]
    assert validation["chosen_step"] < run["result"]["steps"]  # so this was the kept best, not the last model
    assert not (run["dir"] / "train" / "best-adapter").exists()


def test_patience_stops_training_when_the_score_stops_improving(tiny_recipe, tmp_path):
    never_better = tmp_path / "worse.py"  # each pass scores below the one before: 1, 1/2, 1/3, ...
    never_better.write_text(
        "passes = [0]\n\ndef score(predictions, references):\n    passes[0] += 1\n"
        "    return [1 / passes[0] for _ in predictions]\n"
    )
    overrides = [*VALIDATION, "train.patience=2", f"evaluate.metrics=[{never_better}:score]"]
    run = _run(tiny_recipe, tmp_path / "runs", overrides, "train")
    validation = run["result"]["validation"]
    assert [e["step"] for e in validation["curve"]] == [2, 4, 6]  # the first pass, then two without a better one
    assert validation["stopped_early"] and run["result"]["steps"] == 6
    assert validation["chosen_step"] == 2 and "stopped early after 2 passes" in validation["why"]


@pytest.mark.slow  # make test-slow: a training killed mid-way, then resumed (14 s)
def test_a_killed_training_resumes_with_its_curve_and_its_best(tiny_recipe, tmp_path, monkeypatch):
    from pipeline.train_validation import ValidationCallback

    uninterrupted = _run(tiny_recipe, tmp_path / "whole", VALIDATION)["result"]["validation"]
    real = ValidationCallback._validate
    passes = []

    def killed_at_the_third_pass(self, model, state):
        passes.append(state.global_step)
        if len(passes) == 3:
            raise KeyboardInterrupt  # a kill: the pass at step 6 never finished, its checkpoint never written
        return real(self, model, state)

    monkeypatch.setattr(ValidationCallback, "_validate", killed_at_the_third_pass)
    args = [str(tiny_recipe), "--runs-dir", str(tmp_path / "runs"), *[a for o in VALIDATION for a in ("--set", o)]]
    assert main(["run", *args]) == 130
    monkeypatch.setattr(ValidationCallback, "_validate", real)
    resumed = _run(tiny_recipe, tmp_path / "runs", VALIDATION)
    assert resumed["result"]["resumed_from"].endswith("checkpoint-4")
    curve = [(e["step"], e["value"]) for e in resumed["result"]["validation"]["curve"]]
    assert curve == [(e["step"], e["value"]) for e in uninterrupted["curve"]]  # each pass once, the same scores
    assert resumed["result"]["validation"]["chosen_step"] == uninterrupted["chosen_step"]


def test_the_test_rows_never_choose_anything(validated, tiny_recipe, tmp_path):
    first = validated["result"]["validation"]  # the same rows as tiny_recipe's, with the test rows as shipped
    test_file = load_recipe(tiny_recipe).recipe.data.eval
    rows = [json.loads(line) for line in open(test_file)]
    with open(test_file, "w") as f:  # every expected answer of the test rows changed
        f.writelines(json.dumps({**row, "label": "something_else"}) + "\n" for row in rows)
    second = _run(tiny_recipe, tmp_path / "runs", VALIDATION, "train")["result"]["validation"]
    assert [(e["step"], e["value"]) for e in second["curve"]] == [(e["step"], e["value"]) for e in first["curve"]]
    assert second["chosen_step"] == first["chosen_step"]


def test_select_last_keeps_the_last_adapter_and_still_logs_the_curve(tiny_recipe, tmp_path):
    run = _run(tiny_recipe, tmp_path / "runs", [*VALIDATION, "train.select=last"], "train")
    validation = run["result"]["validation"]
    assert validation["chosen_step"] == run["result"]["steps"] == 20 and len(validation["curve"]) == 10
    assert validation["why"].startswith("train.select: last")


def test_validate_prints_the_split_and_how_the_adapter_is_chosen(tiny_recipe, capsys):
    args = ["validate", str(tiny_recipe), "--set", "data.validation=0.25", "--set", "train.patience=3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "validation: 24 of 96 training rows (data.validation: 0.25), seeded (split_seed 0), stratified by target;"
        in out
    )
    assert "scored on exact_match twice per epoch, stopping after 3 passes without a better score; the best" in out


def test_the_report_says_which_adapter_was_kept(validated):
    run = validated
    report = json.loads((run["dir"] / "report" / "report.json").read_text())
    assert report["validation"]["chosen_step"] == run["result"]["validation"]["chosen_step"]
    markdown = (run["dir"] / "report" / "report.md").read_text()
    assert "## Validation while training" in markdown and "| kept |" in markdown


def test_a_tie_on_the_metric_goes_to_the_pass_with_the_lower_validation_loss(tiny_recipe, tmp_path):
    flat = tmp_path / "flat.py"
    flat.write_text("def score(predictions, references):\n    return [0.5 for _ in predictions]\n")
    run = _run(tiny_recipe, tmp_path / "runs", [*VALIDATION, f"evaluate.metrics=[{flat}:score]"], "train")
    validation = run["result"]["validation"]
    lowest = min(validation["curve"], key=lambda e: e["loss"])
    assert validation["chosen_step"] == lowest["step"] and "the lowest validation loss" in validation["why"]
    assert len({e["loss"] for e in validation["curve"]}) > 1  # the loss moved while the metric stood still


def test_rows_the_teacher_forced_pass_already_answers_are_not_generated_and_get_the_generated_answer(
    tiny_recipe, tiny_models, tmp_path
):
    from peft import PeftModel

    from pipeline.train_validation import ValidationCallback

    trained = [*VALIDATION, "train.epochs=40", "train.eval_every=100", "train.lr=1e-2", "evaluate.max_new_tokens=16"]
    run = _run(tiny_recipe, tmp_path / "runs", trained, "train")  # long enough to learn most answers, each label whole
    curve = run["result"]["validation"]["curve"]
    assert all(0 <= e["generated_rows"] <= 24 for e in curve)
    assert curve[-1]["generated_rows"] < 24  # trained: most answers read from the loss pass, not generated
    adapter_dir = run["dir"] / "train" / "adapter"
    tokenizer = models.load_tokenizer(models.ModelSource(str(adapter_dir), None, True))
    base = models.load_model(models.ModelSource(str(tiny_models["base"]), None, True), torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    rows = data.load_splits(run["loaded"].recipe.data).validation
    callback = ValidationCallback(
        tokenizer=tokenizer,
        prompts=[p.ids for p in runtimes.prompts_for(tokenizer, rows, False)],
        targets=[r.target for r in rows],
        examples=[data.training_example(tokenizer, r, False) for r in rows],
        metric="chrf",
        score=scorer("chrf"),
        every=1,
        patience=None,
        keep_best=False,
        batch_size=8,
        max_new_tokens=16,
        ignore_case=False,
        stage_dir=tmp_path,
        main_process=False,
    )
    callback.eos_ids = [tokenizer.eos_token_id]
    with torch.inference_mode():
        _, known = callback._teacher_forced(model)
        generated = {}
        for batch in generate_batches(model, tokenizer, callback.prompts, list(range(24)), 16, 8, progress=False):
            generated.update((e["row"], e["prediction"]) for e in batch)
    assert 0 < len(known) < 24  # some read from the pass; the rest (answered otherwise) generated
    assert {i: generated[i] for i in known} == known
    assert all(known[i] == rows[i].target.strip() for i in known)
    short = callback
    short.max_new_tokens = 1  # an answer longer than generation may run is always generated
    with torch.inference_mode():
        assert short._teacher_forced(model)[1] == {}


def test_refit_trains_again_on_every_row_to_the_chosen_point_and_keeps_the_first_adapter_as_a_candidate(
    tiny_recipe, tmp_path, monkeypatch
):
    from pipeline.stages import train as train_stage

    refit = [*VALIDATION, "train.refit=true", "quantize=[]", "evaluate.gates.quantized_max_drop=null"]
    run = _run(tiny_recipe, tmp_path / "runs", refit)
    result, layout = run["result"], RunLayout(run["dir"])
    chosen, planned = result["validation"]["chosen_step"], result["schedule_steps"]
    assert planned == 20 and result["rows"] == 72  # the first pass: 72 rows, 5 steps an epoch, 4 epochs
    second = result["refit"]
    assert second["refitted"] and second["rows"] == 96 and second["validation_rows_added"] == 24
    assert second["schedule_steps"] == 24  # 96 rows: 6 steps an epoch, the same 4 epochs
    assert second["steps"] == max(1, round(chosen / planned * 24))  # stopped where validation chose
    logged = [r["step"] for r in read_jsonl_records(layout.refit_metrics) if "loss" in r]
    assert logged == list(range(1, second["steps"] + 1))
    # the refit's adapter ships; the one validation chose is the before-refit candidate, paired on the eval rows
    report = json.loads((run["dir"] / "report" / "report.json").read_text())
    assert report["candidates"]["before-refit"]["role"] == "before_refit"
    assert "before-refit" in report["comparisons"]
    shipped = load_file(layout.adapter / "adapter_model.safetensors")
    before = load_file(layout.validated_adapter / "adapter_model.safetensors")
    assert any(not torch.equal(shipped[k], before[k]) for k in shipped)
    markdown = (run["dir"] / "report" / "report.md").read_text()
    assert "Refit (train.refit): validation chose step" in markdown and "What the refit bought:" in markdown
    # the model card says the published adapter is the refit's
    publish = ["publish", str(tiny_recipe), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]
    assert main([*publish, *[a for o in [*refit, "publish={repo: me/refit}"] for a in ("--set", o)]]) == 0
    card = (run["dir"] / "publish" / "README.md").read_text()
    assert "| refit (the adapter published) | validation chose step" in card

    # killed during the refit: the rerun continues after the first pass, which it does not train again
    again = tmp_path / "again"
    original = train_stage.LossLog.on_log
    kill = min(5, second["steps"])  # past the checkpoint at step 4 where the refit goes that far

    def die_in_the_refit(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if self.path.name == "refit-metrics.jsonl" and state.global_step == kill:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_stage.LossLog, "on_log", die_in_the_refit)
    args = ["train", str(tiny_recipe), "--runs-dir", str(again), *[a for o in refit for a in ("--set", o)]]
    assert main(args) == 130
    monkeypatch.setattr(train_stage.LossLog, "on_log", original)
    monkeypatch.setattr(train_stage, "_train_and_choose", lambda *a: pytest.fail("the first pass trained again"))
    resumed = _run(tiny_recipe, again, refit, "train")["result"]
    assert resumed["refit"]["steps"] == second["steps"]
    assert (resumed["refit"]["resumed_from"] or "").endswith("checkpoint-4") == (kill == 5)
    assert resumed["validation"]["chosen_step"] == chosen


def test_refit_is_refused_beside_what_chooses_on_the_validation_rows(tiny_recipe, capsys):
    for extra, says in (
        (["data.validation=0"], "needs validation rows to choose the step on"),
        (["cascade={rule: max_defer, max_defer: 0.5}"], "cascade: chooses its threshold on the validation rows"),
    ):
        args = ["validate", str(tiny_recipe), "--set", "train.refit=true", *[a for e in extra for a in ("--set", e)]]
        assert main(args) == 2
        assert says in capsys.readouterr().err
