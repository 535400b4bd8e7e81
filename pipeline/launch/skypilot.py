"""`specialist submit sky`: a SkyPilot task file in the run folder, launched with `sky launch`.

The task syncs this project as its workdir, mounts every data file the recipe reads at the same path
it has here (so the run's resolved recipe works unchanged on the cloud machine), installs with the
README's command and runs `make train` on the resolved recipe. HF_TOKEN travels as a SkyPilot secret,
named in the file and never written into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from pipeline.errors import PipelineError
from pipeline.launch import job_gpus
from pipeline.recipe import LoadedRecipe
from pipeline.runs import log, write_text_atomic


def task(loaded: LoadedRecipe, run_dir: Path) -> dict:
    recipe = loaded.recipe
    launch = recipe.launch
    project = Path.cwd()
    resolved = run_dir / "recipe.resolved.yaml"
    mounts = {str(resolved): str(resolved)}
    for path in local_inputs(recipe):
        mounts[str(path)] = str(path)
    resources: dict = {}
    gpus = job_gpus(recipe)
    if gpus:
        resources["accelerators"] = f"{launch.gpu_type or 'A100'}:{gpus}"
    if launch.cpus:
        resources["cpus"] = f"{launch.cpus}+"
    if launch.memory:
        resources["memory"] = f"{_gigabytes(launch.memory)}+"
    if launch.cloud:
        resources["infra"] = launch.cloud
    return {
        "name": f"specialist-{recipe.name}",
        "resources": resources,
        "workdir": str(project),
        "file_mounts": mounts,
        "secrets": {"HF_TOKEN": None},  # the value comes from `sky launch --secret HF_TOKEN`, never this file
        "setup": "make setup",
        "run": f"make train RECIPE={resolved} RUNS=runs",
    }


def local_inputs(recipe) -> list[Path]:
    """Every file or folder on this machine the recipe reads: data, templates, user metrics, local models."""
    teacher = recipe.teacher()
    candidates = [
        recipe.data.train,
        recipe.data.eval,
        recipe.data.chat_template_file,
        recipe.distill.inputs if recipe.distill else None,
        recipe.model.base,
        recipe.evaluate.reference.model if recipe.evaluate.reference else None,
        teacher.model if teacher else None,
        *(metric.rpartition(":")[0] for metric in recipe.evaluate.metrics if ".py:" in metric),
    ]
    paths = []
    for source in candidates:
        if source and not str(source).startswith(("hub:", "packaged:")) and Path(source).exists():
            path = Path(source).resolve()
            if path not in paths:
                paths.append(path)
    return paths


def _gigabytes(memory: str) -> int:
    number, unit = int(memory.rstrip("KMGT")), (memory[-1] if memory[-1] in "KMGT" else "M")
    return max(1, int(number * {"K": 1 / 2**20, "M": 1 / 1024, "G": 1, "T": 1024}[unit]))


def submit(loaded: LoadedRecipe, run_dir: Path, dry_run: bool = False) -> int:
    path = run_dir / "sky" / "task.yaml"
    write_text_atomic(
        path,
        "# Written by specialist: `sky launch` this file.\n" + yaml.safe_dump(task(loaded, run_dir), sort_keys=False),
    )
    log("submit", f"SkyPilot task: {path}")
    if dry_run:
        return 0
    sky = shutil.which("sky")
    if sky is None:
        raise PipelineError(
            "submit sky: SkyPilot is not installed (pip install 'specialist-pipeline[sky]'); "
            f"the task is ready in {path}"
        )
    command = [sky, "launch", "-y", "-c", f"specialist-{loaded.recipe.name}", str(path)]
    if os.environ.get("HF_TOKEN"):
        command += ["--secret", "HF_TOKEN"]  # the name only: sky reads the value from this environment
    return subprocess.run(command).returncode
