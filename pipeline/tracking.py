"""Experiment trackers (`train.report_to`): the Trainer's own integrations, with their logs kept in the
run folder where the tracker allows it, and the run's recipe, id and final evaluation logged too.

TensorBoard writes event files to runs/<name>/<id>/train/tensorboard/; MLflow, unless
MLFLOW_TRACKING_URI says otherwise, to a file store in runs/<name>/<id>/mlruns/. Other trackers
(wandb, trackio, ...) get the training metrics through transformers and log where they are set up to.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # annotations only: the recipe checks which trackers are installed
    from pipeline.recipe import LoadedRecipe
from pipeline.files import write_json_atomic
from pipeline.logs import log
from pipeline.run_layout import RunLayout

# tracker name (as transformers' report_to spells it) -> the module it needs


def start(loaded: LoadedRecipe, run_dir: Path) -> dict:
    """Before training: point the trackers at the run folder and open the MLflow run the Trainer logs into."""
    report_to = loaded.recipe.train.report_to
    record: dict = {}
    if "tensorboard" in report_to:
        folder = RunLayout(run_dir).tensorboard
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)
        record["tensorboard"] = str(folder)
    if "mlflow" in report_to:
        import mlflow

        mlflow.set_tracking_uri(_mlflow_uri(run_dir))
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or loaded.recipe.name)
        if mlflow.active_run():
            mlflow.end_run()
        run = mlflow.start_run(run_name=f"{loaded.recipe.name}-{loaded.run_id}")
        mlflow.set_tags({"specialist.recipe": loaded.recipe.name, "specialist.run_id": loaded.run_id})
        mlflow.log_text(yaml.safe_dump(loaded.resolved, sort_keys=False), "recipe.resolved.yaml")
        record["mlflow"] = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id}
    if record:
        write_json_atomic(RunLayout(run_dir).tracking, record)
    return record


def finish_training() -> None:
    if importlib.util.find_spec("mlflow") is not None:
        import mlflow

        if mlflow.active_run():
            mlflow.end_run()


def log_report(loaded: LoadedRecipe, run_dir: Path, report: dict) -> None:
    """After the report: every candidate's metrics, the gates and the run id, into the same tracker runs."""
    path = RunLayout(run_dir).tracking
    if not loaded.recipe.train.report_to or not path.is_file():
        return
    record = json.loads(path.read_text())
    metrics = {
        f"eval/{candidate}/{metric}": values["value"]
        for candidate, c in report["candidates"].items()
        for metric, values in c["metrics"].items()
    }
    for candidate, c in report["candidates"].items():
        if c.get("cost_per_1000_answers") is not None:
            metrics[f"eval/{candidate}/cost_per_1000_answers"] = c["cost_per_1000_answers"]
    metrics["eval/gates_passed"] = float(report["gates"]["passed"])
    if report.get("gap_closed") is not None:
        metrics["eval/gap_closed"] = report["gap_closed"]
    if "tensorboard" in record:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=record["tensorboard"]) as writer:
            writer.add_text("specialist/run_id", loaded.run_id)
            writer.add_text("specialist/recipe", "```yaml\n" + yaml.safe_dump(loaded.resolved, sort_keys=False) + "```")
            for name, value in metrics.items():
                writer.add_scalar(name, value)
    if "mlflow" in record:
        import mlflow

        if record["mlflow"]["tracking_uri"].startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(record["mlflow"]["tracking_uri"])
        with mlflow.start_run(run_id=record["mlflow"]["run_id"]):
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(RunLayout(run_dir).report_md))
    log("report", f"logged the evaluation to {', '.join(record)}")


def _mlflow_uri(run_dir: Path) -> str:
    """The user's MLFLOW_TRACKING_URI, else a file store in the run folder: no server, nothing to set up.
    (MLflow 3 asks for an explicit opt-in to file stores; this one is ours, so we give it.)"""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir / "mlruns").resolve().as_uri()
