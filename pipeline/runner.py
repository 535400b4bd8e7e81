"""A recipe's stages in order, each skipped when it is done for the same inputs: what `specialist run` does,
and what a sweep does for each trial (distill and train only) and for the trial it chose (all)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data import data_fingerprint
from pipeline.models import recorded_references
from pipeline.recipe import LoadedRecipe
from pipeline.runs import (
    STAGE_ORDER,
    in_launched_process,
    is_done,
    log,
    prepare_run_dir,
    record_stage_run,
    run_dir_for,
    run_lock,
)
from pipeline.stages import cascade, distill, evaluate, quantize, report, train

STAGES = {
    "distill": distill,
    "train": train,
    "quantize": quantize,
    "evaluate": evaluate,
    "cascade": cascade,
    "report": report,
}
OPTIONAL = {"distill": "distill", "cascade": "cascade"}  # stages that run only where the recipe has their section


def prepare(loaded: LoadedRecipe, runs_dir: Path, command: str) -> Path:
    """The run folder, with this invocation (and the commits Hub models resolved to) in its manifest."""
    references = None if in_launched_process() else recorded_references(loaded.recipe)
    return prepare_run_dir(loaded, runs_dir, data_fingerprint(loaded.recipe.data), command, references)


def run_stages(
    loaded: LoadedRecipe, runs_dir: Path, stages: tuple[str, ...] = STAGE_ORDER, force: bool = False,
    command: str = "run",
) -> tuple[Path, dict | None]:  # fmt: skip
    """Run `stages` of the recipe under its run lock; (the run folder, the report where it was built or read)."""
    with run_lock(run_dir_for(loaded, runs_dir)):
        run_dir = prepare(loaded, runs_dir, command)
        log("run", f"run folder {run_dir}")
        built = None
        for stage in stages:
            if stage in OPTIONAL and getattr(loaded.recipe, OPTIONAL[stage]) is None and len(stages) > 1:
                continue
            fingerprint = STAGES[stage].fingerprint(loaded, run_dir)
            if not force and is_done(run_dir / stage, fingerprint):
                log(stage, "already done for this recipe and data; skipped")
                if stage == "report":  # the exit code still says whether the gates passed
                    built = report.read(run_dir)
                continue
            result = STAGES[stage].run(loaded, run_dir)
            record_stage_run(run_dir, stage)
            if stage == "report":
                built = result
    return run_dir, built
