"""What a run says: progress lines on stderr, and the crash log an unexpected failure leaves, with no secret in
either.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from pipeline.files import cache_root, write_text_atomic
from pipeline.machine import git_commit, package_versions
from pipeline.run_layout import RunLayout


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


_active_run_dir: Path | None = None  # the run this process works on: where a crash log goes


def crash_logs_go_to(run_dir: Path) -> None:
    """The run this process works on: its logs/ folder takes the crash log if one is written."""
    global _active_run_dir
    _active_run_dir = run_dir


def write_crash_log(error: BaseException | str, runs_root: Path | None = None) -> Path:
    """The full traceback of an unexpected failure, with what ran, in the run's logs/ folder (else the runs
    folder, else the cache): the terminal gets one line naming this file. Secrets in the environment are
    replaced by *** wherever they would appear."""
    import traceback

    for folder in (
        RunLayout(_active_run_dir).logs if _active_run_dir else None,
        runs_root / "logs" if runs_root is not None and runs_root.is_dir() else None,
        cache_root() / "logs",
    ):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        text = "\n".join(
            [
                f"specialist crashed at {time.strftime('%Y-%m-%dT%H:%M:%S%z')} on {platform.node()}",
                f"command: {' '.join(sys.argv)}",
                f"run folder: {_active_run_dir}",
                f"versions: {json.dumps(package_versions())}",
                f"git commit: {git_commit()}",
                "",
                error if isinstance(error, str) else "".join(traceback.format_exception(error)),
            ]
        )
        try:
            write_text_atomic(path, scrub_secrets(text))
        except OSError:  # a full disk, say: try the next place
            continue
        return path
    raise OSError("no folder could take the crash log") from error


SECRET_NAME = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def scrub_secrets(text: str) -> str:
    """`text` with the value of every environment variable whose name says it holds a secret replaced."""
    for name, value in os.environ.items():
        if len(value) >= 8 and any(word in name.upper() for word in SECRET_NAME):
            text = text.replace(value, "***")
    return text
