"""`specialist submit sky`: a SkyPilot task file in the run folder, launched with `sky launch`.

The task syncs this project as its workdir, mounts every data file the recipe reads at the same path
it has here (so the run's resolved recipe works unchanged on the cloud machine), installs with the
README's command and runs the pipeline on the resolved recipe with `specialist run` (not `make train`,
whose exit status is 2 for every failure: the task's exit code is the pipeline's own). HF_TOKEN (and an
endpoint's API key variable) travel as SkyPilot secrets, named in the file and never written into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.errors import PipelineError
from pipeline.files import cache_root, write_text_atomic
from pipeline.launch import job_gpus
from pipeline.logs import log
from pipeline.processes import cache_lock
from pipeline.recipe import LoadedRecipe
from pipeline.run_layout import RunLayout

RUNS_MOUNT = "/specialist-runs"  # where launch.runs_bucket is mounted on the cloud machine


def task(loaded: LoadedRecipe, run_dir: Path, trial: int | None = None, inputs_of: list | None = None) -> dict:
    """The task file's content. `trial`: a sweep's trial alone (`run --trial N`); `inputs_of`: the recipes
    whose local files it mounts (a sweep's trials may each name another local base model)."""
    recipe = loaded.recipe
    launch = recipe.launch
    project = Path.cwd()
    resolved = RunLayout(run_dir).resolved_recipe
    mounts: dict = {str(resolved): str(resolved)}
    for source in inputs_of or [recipe]:
        for path in local_inputs(source):
            mounts[str(path)] = str(path)
    runs = "runs"
    if launch.runs_bucket:  # every task reads and writes the same run folders
        mounts[RUNS_MOUNT] = {"source": launch.runs_bucket, "mode": "MOUNT"}
        runs = RUNS_MOUNT
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
        "name": f"specialist-{recipe.name}" + (f"-trial-{trial}" if trial is not None else ""),
        "resources": resources,
        "workdir": str(project),
        "file_mounts": mounts,
        # the values come from `sky launch --secret NAME`, never this file
        "secrets": {name: None for name in secret_names(recipe)},
        "setup": "make setup",
        "run": f".venv/bin/specialist run {resolved} --runs-dir {runs}"
        + (f" --trial {trial}" if trial is not None else ""),
    }


SKYPILOT_VERSION = "0.14.1"


def sky_environment() -> Path:
    """SkyPilot's own virtual environment (it pins older versions of packages the pipeline's server uses)."""
    return cache_root() / "venvs" / f"skypilot-{SKYPILOT_VERSION}"


def sky_command() -> str | None:
    """`sky` on PATH, else the one `make skypilot` installed."""
    installed = sky_environment() / "bin" / "sky"
    return shutil.which("sky") or (str(installed) if installed.is_file() else None)


def install() -> Path:
    """Install SkyPilot once per machine into sky_environment(); returns its `sky`."""
    folder = sky_environment()
    with cache_lock(f"skypilot-{SKYPILOT_VERSION}", f"installing SkyPilot {SKYPILOT_VERSION}"):
        if not (folder / "bin" / "sky").is_file():
            log("skypilot", f"installing skypilot=={SKYPILOT_VERSION} into {folder} (once; about 460 MB)")
            for command in (
                [sys.executable, "-m", "venv", str(folder)],
                [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", f"skypilot=={SKYPILOT_VERSION}"],
            ):
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                    raise PipelineError(f"installing SkyPilot failed ({last}); it needs PyPI once")
    return folder / "bin" / "sky"


def secret_names(recipe) -> list[str]:
    """HF_TOKEN, and the variables holding the API keys of a reference or teacher behind an endpoint."""
    references = [recipe.evaluate.reference, recipe.teacher()]
    keys = [r.endpoint.api_key_env for r in references if r and r.endpoint and r.endpoint.api_key_env]
    return list(dict.fromkeys(["HF_TOKEN", *keys]))


def local_inputs(recipe) -> list[Path]:
    """Every file or folder on this machine the recipe reads: data, templates, user metrics, local models."""
    teacher = recipe.teacher()
    candidates = [
        recipe.data.train,
        recipe.data.eval,
        recipe.data.validation if isinstance(recipe.data.validation, str) else None,
        recipe.data.chat_template_file,
        recipe.distill.inputs if recipe.distill else None,
        recipe.model.base,
        *(r.model for r in (recipe.evaluate.reference, teacher) if r and r.endpoint is None),
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


def submit_sweep(loaded: LoadedRecipe, folder: Path, trials: list, dry_run: bool = False) -> int:
    """A sweep's trials as parallel tasks (one cluster each, taken down when its trial is done) writing to the
    bucket in launch.runs_bucket, then a task that chooses, evaluates and reports. Without a bucket the trials'
    run folders would be on separate machines: the sweep then runs as one task, trials one after another."""
    if not loaded.recipe.launch.runs_bucket:
        log("submit", "no launch.runs_bucket: the sweep runs as one task, its trials one after another")
        return submit(loaded, folder, dry_run)
    inputs = [trial.loaded.recipe for trial in trials]
    paths = []
    for trial in trials:
        paths.append(folder / "sky" / f"trial-{trial.index}.yaml")
        _write_task(paths[-1], task(loaded, folder, trial.index, inputs))
    choose = folder / "sky" / "choose.yaml"
    _write_task(choose, task(loaded, folder, None, inputs))
    log("submit", f"SkyPilot: {len(paths)} trial tasks and {choose}")
    if dry_run:
        print("\n".join(str(p) for p in [*paths, choose]))
        return 0
    sky = _sky_or_fail(choose)
    name = f"specialist-{loaded.recipe.name}"
    launches = [
        subprocess.Popen([sky, "launch", "-y", "--down", "-c", f"{name}-trial-{i}", str(p), *_secrets(loaded)])
        for i, p in enumerate(paths)
    ]
    codes = [launch.wait() for launch in launches]
    failed = {i: code for i, code in enumerate(codes) if code}
    if failed:
        log("submit", f"trial tasks failed (trial: exit code): {failed}; nothing chosen")
        return next(iter(failed.values()))  # the pipeline's own code of the first failed trial
    return subprocess.run([sky, "launch", "-y", "-c", name, str(choose), *_secrets(loaded)]).returncode


def _write_task(path: Path, content: dict) -> None:
    write_text_atomic(
        path, "# Written by specialist: `sky launch` this file.\n" + yaml.safe_dump(content, sort_keys=False)
    )


def _sky_or_fail(path: Path) -> str:
    sky = sky_command()
    if sky is None:
        raise PipelineError(
            f"submit sky: SkyPilot is not installed; `make skypilot` installs it in an environment of its own "
            f"(it pins other versions of packages the pipeline uses). The task is ready in {path}"
        )
    return sky


def _secrets(loaded: LoadedRecipe) -> list[str]:
    """`--secret NAME` for each secret set here: the name only, sky reads the value from this environment."""
    return [arg for name in secret_names(loaded.recipe) if os.environ.get(name) for arg in ("--secret", name)]


def submit(loaded: LoadedRecipe, run_dir: Path, dry_run: bool = False) -> int:
    path = RunLayout(run_dir).sky / "task.yaml"
    _write_task(path, task(loaded, run_dir))
    log("submit", f"SkyPilot task: {path}")
    if dry_run:
        return 0
    sky = _sky_or_fail(path)
    return subprocess.run(
        [sky, "launch", "-y", "-c", f"specialist-{loaded.recipe.name}", str(path), *_secrets(loaded)]
    ).returncode
