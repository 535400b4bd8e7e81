"""`specialist submit slurm`: an sbatch script in the run folder, submitted with sbatch.

Preemption-safe: Slurm signals the batch shell `launch.signal_seconds` before the time limit; the
script passes the signal on, the pipeline checkpoints and exits, and the script requeues the job, which
resumes from that checkpoint (finished stages are skipped).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import EXIT_CRASHED, PipelineError
from pipeline.files import write_text_atomic
from pipeline.launch import job_gpus
from pipeline.logs import log
from pipeline.recipe import LoadedRecipe
from pipeline.run_layout import RunLayout

STOPPED_BY_SLURM = {"CANCELLED", "TIMEOUT", "DEADLINE", "PREEMPTED"}
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def script(loaded: LoadedRecipe, run_dir: Path, trials: int | None = None, runs_dir: Path | None = None) -> str:
    """The batch script. With `trials`, a job array of a sweep's trials: task N trains and scores trial N."""
    launch = loaded.recipe.launch
    options = [
        f"--job-name=specialist-{loaded.recipe.name}{'-trials' if trials else ''}",
        f"--output={RunLayout(run_dir).slurm / ('%A_%a.out' if trials else '%j.out')}",
        "--open-mode=append",  # a requeued job's log continues the same file
        "--nodes=1",
        "--ntasks=1",
        "--requeue",
        f"--signal=B:USR1@{launch.signal_seconds}",
        f"--chdir={Path.cwd()}",
    ]
    if launch.cpus:
        options.append(f"--cpus-per-task={launch.cpus}")
    if launch.memory:
        options.append(f"--mem={launch.memory}")
    if launch.time:
        options.append(f"--time={launch.time}")
    if launch.partition:
        options.append(f"--partition={launch.partition}")
    if launch.account:
        options.append(f"--account={launch.account}")
    gpus = job_gpus(loaded.recipe)
    if gpus:
        options.append(f"--gres=gpu:{launch.gpu_type + ':' if launch.gpu_type else ''}{gpus}")
    if trials:
        options.append(f"--array=0-{trials - 1}")
    command = [sys.executable, "-m", "pipeline", "run", str(RunLayout(run_dir).resolved_recipe)]
    command += ["--runs-dir", str(runs_dir or run_dir.parent.parent)]
    run_line = shlex.join(command) + (' --trial "$SLURM_ARRAY_TASK_ID"' if trials else "")
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in options)]
    lines += [
        "# Written by specialist: the run of this recipe, as a job. Logs: the --output file above.",
        "set -u",
        'echo "[slurm] job $SLURM_JOB_ID on $(hostname), restart ${SLURM_RESTART_COUNT:-0}"',
        "requeue() {",
        '  echo "[slurm] stop signal: checkpointing, then requeueing job $SLURM_JOB_ID"',
        '  kill -USR1 "$pipeline" 2>/dev/null',
        '  wait "$pipeline"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "}",
        "trap requeue USR1 TERM",
        f"{run_line} &",
        "pipeline=$!",
        'wait "$pipeline"',
        "code=$?",
        'echo "[slurm] pipeline exited with $code"',
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def submit(loaded: LoadedRecipe, run_dir: Path, wait: bool = False, dry_run: bool = False) -> int:
    """Write runs/.../slurm/job.sbatch and sbatch it (unless dry_run); with wait, return the job's exit code."""
    path = RunLayout(run_dir).slurm / "job.sbatch"
    write_text_atomic(path, script(loaded, run_dir))
    path.chmod(0o755)
    if dry_run:
        print(path)
        return 0
    job = _sbatch([str(path)], path)
    log("submit", f"Slurm job {job}: {path}; log {RunLayout(run_dir).slurm / (job + '.out')}")
    print(job)
    return wait_for(job) if wait else 0


def submit_sweep(
    loaded: LoadedRecipe, folder: Path, trials: int, runs_dir: Path, wait: bool = False, dry_run: bool = False
) -> int:
    """A sweep as two jobs: an array with one task per trial, then (once every task succeeded) the plain run,
    which finds the trials done, chooses one, evaluates and reports it, and draws any learning curve."""
    array_path, final_path = folder / "slurm" / "trials.sbatch", folder / "slurm" / "choose.sbatch"
    write_text_atomic(array_path, script(loaded, folder, trials, runs_dir))
    write_text_atomic(final_path, script(loaded, folder, None, runs_dir))
    if dry_run:
        print(array_path)
        print(final_path)
        return 0
    array_job = _sbatch([str(array_path)], array_path)
    final_job = _sbatch([f"--dependency=afterok:{array_job}", "--kill-on-invalid-dep=yes", str(final_path)], final_path)
    log(
        "submit",
        f"Slurm array job {array_job} ({trials} trials), then job {final_job} chooses; logs in {folder / 'slurm'}",
    )
    print(final_job)
    return wait_for(final_job) if wait else 0


def _sbatch(arguments: list[str], path: Path) -> str:
    try:
        out = subprocess.run(["sbatch", "--parsable", *arguments], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise PipelineError(f"submit slurm: sbatch is not installed here; the script is ready in {path}") from None
    if out.returncode != 0:
        raise PipelineError(f"submit slurm: sbatch refused {path}: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def job_state(job: str) -> tuple[str, int | None]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise PipelineError(f"submit slurm: scontrol cannot find job {job}: {out.stderr.strip()}")
    state = re.search(r"JobState=(\S+)", out.stdout).group(1)
    code = re.search(r"ExitCode=(\d+):(\d+)", out.stdout)
    if code is None:
        return state, None
    status, signal_number = int(code.group(1)), int(code.group(2))
    return state, status or (128 + signal_number if signal_number else 0)  # killed by a signal: as a shell says


def wait_for(job: str, poll_seconds: float = 2.0) -> int:
    """Wait until the job has finished for good (a requeued job is not finished) and return its exit code."""
    while True:
        state, code = job_state(job)
        if state in FINISHED:
            log("submit", f"Slurm job {job} {state.lower()} (exit {code})")
            if state != "COMPLETED" and not code:  # ended by Slurm, not by the pipeline: never 1 (gates failed)
                return 130 if state in STOPPED_BY_SLURM else EXIT_CRASHED
            return code or 0
        time.sleep(poll_seconds)
