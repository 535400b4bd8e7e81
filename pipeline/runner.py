"""A recipe's stages in order, each skipped when it is done for the same inputs: what `specialist run` does,
and what a sweep does for each trial (synthesize, distill and train only) and for the trial it chose (all)."""

from __future__ import annotations

from pathlib import Path

from pipeline.logs import log
from pipeline.models import recorded_references
from pipeline.processes import in_launched_process, run_lock
from pipeline.recipe import LoadedRecipe, data_fingerprint
from pipeline.run_layout import STAGES, RunLayout
from pipeline.runs import is_done, prepare_run_dir, record_stage_run, run_dir_for
from pipeline.stages import Stage, cascade, distill, evaluate, quantize, report, synthesize, train

STAGE_MODULES: dict[str, Stage] = {
    "synthesize": synthesize,
    "distill": distill,
    "train": train,
    "quantize": quantize,
    "evaluate": evaluate,
    "cascade": cascade,
    "report": report,
}
# stages that run only where the recipe has their section
OPTIONAL = {"synthesize": "synthesize", "distill": "distill", "cascade": "cascade"}


def prepare(loaded: LoadedRecipe, runs_dir: Path, command: str) -> Path:
    """The run folder, with this invocation (and the commits Hub models resolved to) in its manifest."""
    references = None if in_launched_process() else recorded_references(loaded.recipe)
    return prepare_run_dir(loaded, runs_dir, data_fingerprint(loaded.recipe.data), command, references)


def run_stages(
    loaded: LoadedRecipe, runs_dir: Path, stages: tuple[str, ...] = STAGES, force: bool = False,
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
            if stage == "evaluate":  # its candidates include the seed-only specialist, trained first
                _train_seed_only(loaded, runs_dir)
            fingerprint = STAGE_MODULES[stage].fingerprint(loaded, run_dir)
            if not force and is_done(RunLayout(run_dir).stage(stage), fingerprint):
                log(stage, "already done for this recipe and data; skipped")
                if stage == "report":  # the exit code still says whether the gates passed
                    built = report.read(run_dir)
                continue
            result = STAGE_MODULES[stage].run(loaded, run_dir)
            record_stage_run(run_dir, stage)
            if stage == "report":
                built = result
    return run_dir, built


def _train_seed_only(loaded: LoadedRecipe, runs_dir: Path) -> None:
    """A synthesize recipe's seed-only sibling, trained (once: it is an ordinary run) before the evaluation that
    compares it with the specialist trained on seeds + the teacher's rows."""
    sibling = synthesize.seed_only(loaded)
    if sibling is not None:
        log("run", "the seed-only specialist (this recipe without synthesize:) for the evaluation to compare")
        run_stages(sibling, runs_dir, ("train",), command="seed-only")
