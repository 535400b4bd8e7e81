"""Sweeps and learning curves: trials are ordinary runs chosen on validation rows only, a killed sweep
resumes without retraining finished trials, shares are nested, and the curve's fit and projection hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import data, results, stats, sweep
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.recipe import DataSection, ShipSection, load_recipe
from pipeline.run_layout import RunLayout
from pipeline.runs import read_manifest, run_dir_for
from tests.conftest import tiny_run_folder

# chrF rather than exact match: random-init tiny models never get a label exactly right, so exact match
# would tie every trial at 0 and the choice would say nothing
SETTINGS = """
train:
  frozen_dtype: float32
  epochs: 2
data:
  validation: 24
quantize: []
evaluate:
  metrics: [chrf]
  reference: null
  gates: {quantized_max_drop: null}
"""


@pytest.fixture
def sweep_recipe(tiny_recipe, write_recipe):
    def write(section: str, name: str = "sweep.yaml"):
        return write_recipe(f"extends: {tiny_recipe.name}\n{SETTINGS}{section}", name)

    return write


LR_SWEEP = """
sweep:
  params:
    train.lr: [1.0e-4, 2.0e-2]
    lora.r: [4, 8]
  method: random
  trials: 3
  seed: 1
"""


@pytest.fixture(scope="module")
def lr_sweep(tiny_models, tmp_path_factory) -> tuple:
    """LR_SWEEP run once for the module: (its recipe, its runs folder)."""
    folder = tmp_path_factory.mktemp("lr-sweep")
    tiny_run_folder(folder, tiny_models)  # recipe.yaml, which the sweep extends
    recipe = folder / "sweep.yaml"
    recipe.write_text(f"extends: recipe.yaml\n{SETTINGS}{LR_SWEEP}")
    assert main(["run", str(recipe), "--runs-dir", str(folder / "runs")]) == 0
    return recipe, folder / "runs"


def _summary(recipe, runs) -> dict:
    loaded = load_recipe(recipe)
    return json.loads((sweep.summary_dir(loaded, runs, "sweep") / "sweep.json").read_text())


# --- units -------------------------------------------------------------------------------------------


def test_shares_are_nested_stratified_and_seeded(intents_rows):
    train, test = intents_rows
    section = DataSection(train=str(train), eval=str(test), prompt="M: {text}\nI:", target=" {label}", validation=0)
    rows = data.load_splits(section).train
    chosen = {f: data.nested_fraction(rows, f, seed=0) for f in (0.125, 0.25, 0.5)}
    prompts = {f: {r.prompt for r in chosen[f]} for f in chosen}
    assert [len(chosen[f]) for f in chosen] == [12, 24, 48]
    assert prompts[0.125] < prompts[0.25] < prompts[0.5]  # a larger share adds rows, never swaps them
    counts = {label: sum(r.target == label for r in rows) for label in {r.target for r in rows}}
    for label, total in counts.items():  # every label at its share, give or take one row
        assert abs(sum(r.target == label for r in chosen[0.5]) - total / 2) <= 1
    assert data.nested_fraction(rows, 0.5, seed=0) == chosen[0.5]
    assert data.nested_fraction(rows, 0.5, seed=1) != chosen[0.5]
    with_share = data.load_splits(section.model_copy(update={"train_fraction": 0.25}))
    assert with_share.train == chosen[0.25] and with_share.train_fraction_of == {
        "gold": 96,
        "distilled": 0,
        "synthesized": 0,
    }


def test_the_saturating_fit_recovers_a_known_curve_and_projects_rows():
    sizes = [100, 200, 400, 800, 1600]
    errors = [0.6 * n**-0.5 + 0.04 for n in sizes]
    fit = stats.fit_saturating(sizes, errors)
    assert fit["b"] == pytest.approx(0.5, rel=0.02) and fit["c"] == pytest.approx(0.04, abs=0.002)
    assert stats.rows_for_error(fit, 0.05) == pytest.approx(3600, rel=0.05)  # (0.6 / 0.01)^2
    assert stats.rows_for_error(fit, 0.03) is None  # below the floor: no number of rows gets there
    assert stats.fit_saturating(sizes, [0.3, 0.3, 0.31, 0.3, 0.32]) is None  # not falling: nothing to fit
    assert stats.fit_saturating([100, 200], [0.5, 0.4]) is None


def test_choose_takes_the_best_then_the_lower_loss_and_the_ship_rule_the_smallest_close_enough():
    def trial(value, loss, parameters):
        return {"metric": "accuracy", "value": value, "validation_loss": loss, "parameters": parameters}

    results = {0: trial(0.80, 0.5, 100), 1: trial(0.90, 0.4, 500), 2: trial(0.90, 0.3, 900), 3: trial(0.895, 0.6, 50)}
    assert sweep.choose(results, None)[0] == 2  # tied at 0.90: the lower validation loss
    chosen, why = sweep.choose(results, ShipSection(within=0.01))
    assert chosen == 3 and "smallest by parameters of the 3 trials within 0.01" in why
    assert sweep.choose(results, ShipSection(within=0.001))[0] == 1  # 3 is now too far; of 1 and 2, the smaller
    assert sweep.choose(results, ShipSection(within=0))[0] == 2


def test_a_sweep_is_checked_with_file_and_line(sweep_recipe, capsys):
    bad = sweep_recipe("sweep:\n  params:\n    train.lr: [1.0e-3]\n    data.eval: [other.jsonl]\n", "bad.yaml")
    with pytest.raises(PipelineError, match=r"bad.yaml:\d+: sweep.params.data.eval: cannot be swept: trials must"):
        load_recipe(bad)
    random_without_budget = sweep_recipe("sweep:\n  params:\n    lora.r: [4, 8]\n  method: random\n", "r.yaml")
    with pytest.raises(PipelineError, match="sweep.trials: method random needs trials"):
        load_recipe(random_without_budget)
    wrong_value = sweep_recipe("sweep:\n  params:\n    lora.r: [8, 0]\n", "v.yaml")
    loaded = load_recipe(wrong_value)  # the sweep section itself is fine; trial 1 is not
    with pytest.raises(PipelineError) as error:
        sweep.trials(loaded)
    assert "v.yaml:" in str(error.value) and "lora.r" in str(error.value) and "greater than 0" in str(error.value)
    assert main(["validate", str(wrong_value)]) == 2
    assert "lora.r" in capsys.readouterr().err


def test_a_random_sweep_samples_a_huge_grid_without_listing_it_and_a_huge_grid_alone_is_refused(sweep_recipe):
    import itertools
    import random

    ten = {
        "lora.r": list(range(1, 11)),
        "lora.alpha": list(range(1, 11)),
        "train.seed": list(range(10)),
        "train.epochs": list(range(1, 11)),
        "train.batch_size": list(range(1, 11)),
        "train.grad_accum": list(range(1, 11)),
        "train.lr": [round(1e-4 * k, 6) for k in range(1, 11)],
        "train.warmup_ratio": [round(0.01 * k, 2) for k in range(10)],
        "train.weight_decay": [round(0.01 * k, 2) for k in range(10)],
    }

    def params(keys) -> str:
        return "sweep:\n  params:\n" + "".join(f"    {k}: {json.dumps(ten[k])}\n" for k in keys)

    # 10^9 combinations: listing them first ran out of memory; a sample of numbers decodes only the picked ones
    huge = sweep_recipe(params(ten) + "  method: random\n  trials: 3\n  seed: 5\n", "huge.yaml")
    picked = sweep.trials(load_recipe(huge))
    assert len(picked) == 3 and all(set(t.settings) == set(ten) for t in picked)
    # on a grid small enough to list, the same picks as sampling the listed grid (resumed sweeps keep their trials)
    small = load_recipe(sweep_recipe(LR_SWEEP, "small.yaml"))
    grid = list(itertools.product(*small.recipe.sweep.params.values()))
    expected = [grid[i] for i in sorted(random.Random(1).sample(range(len(grid)), 3))]
    assert [tuple(t.settings.values()) for t in sweep.trials(small)] == expected
    # a grid without trials is every combination: a million runs is refused at load, naming the field and the fix
    million = sweep_recipe(params(list(ten)[:6]), "million.yaml")
    with pytest.raises(PipelineError, match=r"million.yaml:\d+: sweep.params: make 1,000,000 combinations.*trials"):
        load_recipe(million)


# --- integration on tiny models ------------------------------------------------------------------


def test_the_sweep_chooses_on_validation_and_evaluates_only_the_chosen_trial(lr_sweep):
    recipe, runs = lr_sweep
    summary = _summary(recipe, runs)
    done = {t["index"]: t for t in summary["trials"]}
    assert len(done) == 3 and all(t["status"] == "done" for t in done.values())
    best = max(done.values(), key=lambda t: (t["value"], -(t["validation_loss"] or 0)))
    assert summary["chosen"] == best["index"] and summary["why"].startswith("the best validation chrf")
    assert len({t["value"] for t in done.values()}) > 1  # the trials differ, so the choice meant something
    for t in done.values():
        run_dir = runs / "tiny-test" / t["run_id"]
        train = json.loads((run_dir / "train" / "result.json").read_text())
        # scored again through the evaluate stage's runtime: the same answers as the chosen validation pass
        assert t["value"] == pytest.approx(train["validation"]["chosen_value"], abs=1e-9)
        assert t["ci95"][0] <= t["value"] <= t["ci95"][1] and t["peak_memory_bytes"] > 0 and t["latency_p50"] > 0
        assert (run_dir / "evaluate").exists() == (t["index"] == summary["chosen"])  # test rows: the chosen only
    chosen_dir = runs / "tiny-test" / summary["chosen_run_id"]
    report = json.loads((chosen_dir / "report" / "report.json").read_text())
    assert report["sweep"]["chosen"] == summary["chosen"]
    assert summary["chosen_eval"]["value"] == report["candidates"]["specialized"]["metrics"]["chrf"]["value"]
    markdown = (chosen_dir / "report" / "report.md").read_text()
    assert "## Sweep: 3 trials, chosen on 24 validation rows" in markdown and "**chosen**" in markdown
    kept = results.extract(chosen_dir)  # the manual's copy of the trials: the report's, without its heading
    trials = results.table(kept, "sweep")
    assert "Sweep:" not in trials and "**chosen**" in trials and f"Run `{chosen_dir.name}` of `tiny-test`" in trials
    with pytest.raises(PipelineError, match="has no learning_curve"):
        results.table(kept, "curve")
    assert (sweep.summary_dir(load_recipe(recipe), runs, "sweep") / "sweep.png").stat().st_size > 0
    # the verbs that act on a run act on the chosen trial
    assert main(["report", str(recipe), "--runs-dir", str(runs)]) == 0
    assert (chosen_dir / "report" / "report.md").is_file()


def test_the_test_rows_never_choose_a_trial(lr_sweep, sweep_recipe, tmp_path):
    first = _summary(*lr_sweep)  # the same rows and trials as sweep_recipe's, with the test rows as shipped
    recipe = sweep_recipe(LR_SWEEP)
    test_file = load_recipe(recipe).recipe.data.eval
    rows = [json.loads(line) for line in open(test_file)]
    with open(test_file, "w") as f:  # every expected answer of the test rows changed
        f.writelines(json.dumps({**row, "label": "something_else"}) + "\n" for row in rows)
    assert main(["run", str(recipe), "--runs-dir", str(tmp_path / "b")]) == 0
    second = _summary(recipe, tmp_path / "b")
    assert second["chosen"] == first["chosen"]
    assert [t["value"] for t in second["trials"]] == [t["value"] for t in first["trials"]]
    assert second["chosen_eval"]["value"] != first["chosen_eval"]["value"]  # the test rows did change


@pytest.mark.slow  # make test-slow: a sweep SIGKILLed after its first trial, then resumed
def test_a_killed_sweep_resumes_without_retraining_finished_trials(sweep_recipe, tmp_path):
    recipe = sweep_recipe(LR_SWEEP)
    runs = tmp_path / "runs"
    first = sweep.trials(load_recipe(recipe))[0]
    first_dir = run_dir_for(first.loaded, runs)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--runs-dir", str(runs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not (RunLayout(first_dir).sweep_validation / ".done.json").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before its first trial did"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: as an OOM kill or a lost node
    process.wait()
    finished_at = json.loads((first_dir / "train" / ".done.json").read_text())["finished_at"]
    assert not (sweep.summary_dir(load_recipe(recipe), runs, "sweep") / "sweep.json").exists()
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    trained = [e for e in read_manifest(first_dir)["invocations"] if "train" in e["stages_run"]]
    assert len(trained) == 1  # trained once, by the killed process
    assert json.loads((first_dir / "train" / ".done.json").read_text())["finished_at"] == finished_at
    assert len([t for t in _summary(recipe, runs)["trials"] if t["status"] == "done"]) == 3


def test_the_time_budget_stops_starting_trials(sweep_recipe, tmp_path):
    recipe = sweep_recipe("sweep:\n  params:\n    train.lr: [1.0e-3, 5.0e-3]\n  time_budget_minutes: 0.0001\n")
    assert main(["run", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 0
    summary = _summary(recipe, tmp_path / "runs")
    assert [t["status"] for t in summary["trials"]] == ["done", "not run (time budget)"]
    assert summary["chosen"] == 0


def test_the_learning_curve_trains_nested_shares_and_reports_them(sweep_recipe, tmp_path):
    recipe = sweep_recipe("learning_curve:\n  fractions: [0.25, 0.5]\n  target: 0.99\n")
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    loaded = load_recipe(recipe)
    curve = json.loads((sweep.summary_dir(loaded, runs, "curve") / "curve.json").read_text())
    points = curve["points"]
    assert [(p["fraction"], p["rows"]) for p in points] == [(0.25, 18), (0.5, 36), (1.0, 72)]  # 72 after validation
    main_run = sweep.main_run(loaded, runs)
    assert points[-1]["run_id"] == main_run.run_id  # the whole run is the last point, not trained twice
    report = json.loads((run_dir_for(main_run, runs) / "report" / "report.json").read_text())
    assert (
        report["learning_curve"]["points"][-1]["value"]
        == report["candidates"]["specialized"]["metrics"]["chrf"]["value"]
    )
    assert (
        "## Learning curve: chrf on the 24 eval rows"
        in (run_dir_for(main_run, runs) / "report" / "report.md").read_text()
    )
    shown = results.table(results.extract(run_dir_for(main_run, runs)), "curve")
    assert "| 0.25 | 18 |" in shown and "| 1 | 72 |" in shown and "Learning curve:" not in shown
    shares = [sweep.variant(loaded, {"data.train_fraction": p["fraction"]}) for p in points[:-1]]
    full = data.load_splits(main_run.recipe.data)
    # every share chooses on the same validation rows, and trains on a subset of the whole run's rows
    for splits in (data.load_splits(share.recipe.data) for share in shares):
        assert splits.validation == full.validation
        assert {r.prompt for r in splits.train} <= {r.prompt for r in full.train}


def test_a_sweep_goes_to_slurm_as_a_job_array_then_a_choosing_job(sweep_recipe, tmp_path, capsys):
    recipe = sweep_recipe(LR_SWEEP)
    runs = tmp_path / "runs"
    assert main(["submit", "slurm", str(recipe), "--runs-dir", str(runs), "--dry-run"]) == 0
    array, final = (p for p in capsys.readouterr().out.split())
    array_text, final_text = open(array).read(), open(final).read()
    assert "#SBATCH --array=0-2" in array_text and '--trial "$SLURM_ARRAY_TASK_ID"' in array_text
    assert "--array" not in final_text and "--trial" not in final_text
    assert f"--runs-dir {runs}" in array_text
    # a task runs its trial only: train and the validation scoring, no evaluation, no choice
    resolved = sweep.summary_dir(load_recipe(recipe), runs, "sweep") / "recipe.resolved.yaml"
    assert main(["run", str(resolved), "--runs-dir", str(runs), "--trial", "1"]) == 0
    trial = sweep.trials(load_recipe(recipe))[1]
    assert (RunLayout(run_dir_for(trial.loaded, runs)).sweep_validation / "result.json").is_file()
    assert not (run_dir_for(trial.loaded, runs) / "evaluate").exists()
    assert not (sweep.summary_dir(load_recipe(recipe), runs, "sweep") / "sweep.json").exists()
    assert main(["run", str(resolved), "--runs-dir", str(runs), "--trial", "7"]) == 2


def test_a_distillation_curve_counts_teacher_labels_asked_once(write_recipe, tiny_models, tmp_path):
    from pipeline.data import read_jsonl
    from pipeline.stages.distill import answers_file
    from tests.conftest import INTENTS

    rows = [row for _, row in read_jsonl(INTENTS / "train.jsonl")]
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:64]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[64:88]))
    (tmp_path / "test.jsonl").write_text("".join((INTENTS / "test.jsonl").read_text().splitlines(True)[:24]))
    recipe = write_recipe(f"""
        name: distill-curve
        model: {{base: {tiny_models["base"]}}}
        data:
          eval: test.jsonl
          validation: validation.jsonl
          prompt: "Message: {{text}}\\nIntent:"
          target: " {{label}}"
          chat_template: never
        distill: {{inputs: inputs.jsonl, choices: eval_labels}}
        train: {{epochs: 2, batch_size: 16, lr: 5.0e-3, frozen_dtype: float32}}
        quantize: []
        evaluate: {{metrics: [chrf], max_new_tokens: 6, batch_size: 8, bootstrap_samples: 200, latency_rows: 2,
                    reference: {{model: {tiny_models["reference"]}}}}}
        learning_curve: {{fractions: [0.25, 0.5]}}
    """)
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    curve = json.loads((sweep.summary_dir(load_recipe(recipe), runs, "curve") / "curve.json").read_text())
    assert [(p["teacher_labels"], p["gold_rows"]) for p in curve["points"]] == [(16, 0), (32, 0), (64, 0)]
    per_label = curve["labelling"]["seconds_per_label"]
    assert per_label > 0 and curve["points"][1]["teacher_seconds"] == pytest.approx(32 * per_label)
    asked = answers_file(run_dir_for(sweep.main_run(load_recipe(recipe), runs), runs)).read_text().splitlines()
    assert len(asked) == 64  # one answer per input: the shares reused the whole run's labels
    report = (run_dir_for(sweep.main_run(load_recipe(recipe), runs), runs) / "report" / "report.md").read_text()
    assert "| share | rows (teacher labels) |" in report


def test_validate_says_what_a_sweep_and_a_curve_will_run(sweep_recipe, tiny_recipe, write_recipe, capsys):
    recipe = sweep_recipe(LR_SWEEP + "learning_curve: {fractions: [0.25, 0.5], target: 0.9}\n")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "sweep: 3 trials (random) over train.lr, lora.r, each chosen on the validation rows;" in out
    assert "learning curve: shares 0.25, 0.5 and 1 of the training rows, each scored on the eval rows; projects" in out
    few = write_recipe(f"extends: {tiny_recipe.name}\ndata: {{max_train_rows: 50}}\n{LR_SWEEP}", "few.yaml")
    assert main(["validate", str(few)]) == 2
    assert "sweep: chooses on validation rows and this data has none" in capsys.readouterr().err


def test_a_base_model_sweep_ships_the_smallest_base_that_holds_the_accuracy(sweep_recipe, tiny_models, tmp_path):
    # the tiny reference is the larger model (hidden 128 against 64); within 1.0 every trial holds the accuracy
    bases = f"[{tiny_models['reference']}, {tiny_models['base']}]"
    recipe = sweep_recipe(f"sweep:\n  params:\n    model.base: {bases}\n  ship: {{within: 1.0, smallest_by: memory}}\n")
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    summary = _summary(recipe, runs)
    by_memory = sorted(summary["trials"], key=lambda t: t["peak_memory_bytes"])
    assert summary["trials"][1]["parameters"] < summary["trials"][0]["parameters"]
    assert summary["chosen"] == by_memory[0]["index"] == 1  # the small base, measured smaller
    assert "the smallest by memory of the 2 trials within 1 of the best" in summary["why"] or summary["why"].endswith(
        "which is also the smallest by memory within 1 of it"
    )
    chosen_dir = runs / "tiny-test" / summary["chosen_run_id"]
    report = json.loads((chosen_dir / "report" / "report.json").read_text())
    assert report["candidates"]["base"]["model"] == str(tiny_models["base"])
