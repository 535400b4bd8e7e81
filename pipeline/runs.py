"""The run directory: where it is, what the manifest records, atomic writes and stage done markers.

runs/<recipe name>/<run id>/ where the run id is the hash of the resolved recipe, so the same recipe
always lands in the same folder and a rerun finds the stages it already finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.recipe import LoadedRecipe

DONE_MARKER = ".done.json"


def run_dir_for(loaded: LoadedRecipe, runs_root: Path) -> Path:
    return runs_root / loaded.recipe.name / loaded.run_id


def prepare_run_dir(loaded: LoadedRecipe, runs_root: Path, data_fingerprint: str) -> Path:
    """Create the run folder (if new) with the resolved recipe and the manifest."""
    run_dir = run_dir_for(loaded, runs_root)
    if in_launched_process():  # a training rank under accelerate: the launching process wrote these
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.resolved.yaml", yaml.safe_dump(loaded.resolved, sort_keys=False))
    manifest = {
        "recipe": str(loaded.path),
        "recipe_sha256": loaded.sha256,
        "data_fingerprint": data_fingerprint,
        "seed": loaded.recipe.train.seed,
        "versions": package_versions(),
        "git_commit": _git_commit(),
        "machine": machine_facts(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(run_dir / "manifest.json", manifest)
    return run_dir


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_count"] = torch.cuda.device_count()
    return facts


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def is_main_process() -> bool:
    """False in the other ranks of a multi-process training launch: only rank 0 writes run files."""
    return int(os.environ.get("RANK", "0")) == 0


def in_launched_process() -> bool:
    """Whether this process is one of several started by accelerate launch / torchrun."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


class Interrupted(PipelineError):
    """Asked to stop (a scheduler's warning signal): finished stages and a fresh checkpoint are kept."""

    exit_code = 130


class StopSignal:
    """SIGUSR1 / SIGTERM, as Slurm sends before a time limit or preemption, become a clean stop.

    While the train stage runs, the signal only sets `requested`: training saves a checkpoint at the
    end of its current step and exits. Elsewhere it interrupts at once; caches keep what was done.
    """

    requested = False
    training = False

    @classmethod
    def install(cls) -> None:
        if in_launched_process():  # a training rank: ranks must stop at the same step, so they just die
            return
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.requested = True
        if not cls.training:
            raise Interrupted(f"stopped by signal {signal.Signals(signum).name}; rerun to continue")


class RunLocked(PipelineError):
    """Another process is working on this run folder."""

    exit_code = 4


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder's lock for the duration; a second process on the same run exits at once.

    flock, so the lock dies with its process: a killed run never leaves a stale lock behind.
    """
    if in_launched_process():  # the launching process holds it for its training ranks
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunLocked(
                f"{run_dir} is in use by {holder}; this run of the recipe is already going. Wait for it to "
                "finish (or stop it) and rerun: finished stages are skipped"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()


# --- atomic writes ------------------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside the target, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written temp folder into place, replacing an older one."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def temp_dir_for(final_dir: Path) -> Path:
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


# --- stage done markers -------------------------------------------------------------------------


def stage_fingerprint(*parts: Any) -> str:
    """Hash of everything a stage's output depends on (recipe sections, upstream fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def is_done(stage_dir: Path, fingerprint: str) -> bool:
    marker = stage_dir / DONE_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("fingerprint") == fingerprint


def done_fingerprint(stage_dir: Path) -> str | None:
    marker = stage_dir / DONE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("fingerprint")


def mark_done(stage_dir: Path, fingerprint: str, **facts: Any) -> None:
    write_json_atomic(
        stage_dir / DONE_MARKER,
        {"fingerprint": fingerprint, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **facts},
    )


def dir_size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)
