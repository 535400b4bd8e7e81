"""train.report_to: TensorBoard event files and an MLflow file store in the run folder, holding the
training loss and, after the report, every candidate's evaluation metrics."""

import json

import pytest

from pipeline.cli import main
from pipeline.recipe import load_recipe

pytestmark = pytest.mark.integration


def test_tensorboard_and_mlflow_get_the_loss_and_the_evaluation(tiny_recipe, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="trackers are an extra: pip install -e '.[trackers]'")
    mlflow = pytest.importorskip("mlflow", reason="trackers are an extra: pip install -e '.[trackers]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    overrides = ["train.report_to=[tensorboard, mlflow]", "quantize=[{kind: bnb-nf4}]", "train.epochs=1"]
    assert main(["run", str(tiny_recipe), "--runs-dir", str(runs), *(a for o in overrides for a in ("--set", o))]) == 0
    loaded = load_recipe(tiny_recipe, overrides)
    run_dir = runs / "tiny-test" / loaded.run_id
    report = json.loads((run_dir / "report" / "report.json").read_text())
    expected = report["candidates"]["specialized"]["metrics"]["exact_match"]["value"]
    steps = json.loads((run_dir / "train" / "result.json").read_text())["steps"]

    events = EventAccumulator(str(run_dir / "train" / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == steps
    assert events.Scalars("eval/specialized/exact_match")[-1].value == pytest.approx(expected)
    assert {"eval/base/exact_match", "eval/reference/exact_match", "eval/bnb-nf4/exact_match"} <= set(
        events.Tags()["scalars"]
    )

    record = json.loads((run_dir / "train" / "tracking.json").read_text())["mlflow"]
    assert record["tracking_uri"] == (run_dir / "mlruns").resolve().as_uri()
    client = mlflow.MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.data.tags["specialist.run_id"] == loaded.run_id
    assert run.data.metrics["eval/specialized/exact_match"] == pytest.approx(expected)
    assert len(client.get_metric_history(record["run_id"], "loss")) == steps
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"recipe.resolved.yaml", "report.md"} <= artifacts
    # trackers watch a run; they do not make it another one
    assert load_recipe(tiny_recipe, overrides[1:]).run_id == loaded.run_id


def test_a_tracker_that_is_not_installed_is_named(tiny_recipe, capsys):
    assert main(["validate", str(tiny_recipe), "--set", "train.report_to=[swanlab]"]) == 2
    err = capsys.readouterr().err
    assert "train.report_to: swanlab not installed" in err and "Traceback" not in err
