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
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.errors import Interrupted, RunLocked

if TYPE_CHECKING:  # annotations only: runs.py stays importable without the recipe schema (runtime processes)
    from pipeline.recipe import LoadedRecipe

DONE_MARKER = ".done.json"


def run_dir_for(loaded: LoadedRecipe, runs_root: Path) -> Path:
    return runs_root / loaded.recipe.name / loaded.run_id


def prepare_run_dir(
    loaded: LoadedRecipe, runs_root: Path, data_fingerprint: str, command: str, models: dict | None = None
) -> Path:
    """Create the run folder (if new) with the resolved recipe, and add this invocation to the manifest.

    The manifest keeps one entry per invocation (`run`, `eval`, a nightly run that finds everything done):
    each later one is appended, so the entry of the invocation that trained the adapter (its versions,
    commit and machine) is never overwritten. `models` maps each model field to what it resolved to (a Hub
    id's commit), recorded as of this invocation.
    """
    run_dir = run_dir_for(loaded, runs_root)
    if in_launched_process():  # a training rank under accelerate: the launching process wrote these
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.resolved.yaml", yaml.safe_dump(loaded.resolved, sort_keys=False))
    manifest = read_manifest(run_dir)
    manifest.update(
        {
            "recipe": str(loaded.path),
            "recipe_sha256": loaded.sha256,
            "data_fingerprint": data_fingerprint,
            "seed": loaded.recipe.train.seed,
        }
    )
    invocation = {
        "command": command,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
        "stages_run": [],
        "versions": package_versions(),
        "git_commit": _git_commit(),
        "machine": machine_facts(),
    }
    if models:
        invocation["models"] = models
    invocations = [*manifest.get("invocations", []), invocation]
    # A nightly job on unchanged data adds an entry that ran nothing: keep the last few of those only.
    idle = [i for i, entry in enumerate(invocations) if not entry.get("stages_run")][:-KEEP_IDLE_INVOCATIONS]
    manifest["invocations"] = [entry for i, entry in enumerate(invocations) if i not in idle]
    write_json_atomic(run_dir / "manifest.json", manifest)
    return run_dir


KEEP_IDLE_INVOCATIONS = 20


def read_manifest(run_dir: Path) -> dict:
    """The run's manifest; one written before manifests kept invocations becomes its first invocation."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    if "invocations" not in manifest:
        moved = ("versions", "git_commit", "machine", "created_at")
        first = {"command": "run", "stages_run": ["train"], **{k: manifest.pop(k) for k in moved if k in manifest}}
        first["started_at"] = first.pop("created_at", None)
        manifest["invocations"] = [first]
    return manifest


def record_stage_run(run_dir: Path, stage: str) -> None:
    """Note in this invocation's manifest entry that it ran (and finished) `stage`."""
    manifest = read_manifest(run_dir)
    mine = [entry for entry in manifest.get("invocations", []) if entry.get("pid") == os.getpid()]
    if mine:
        mine[-1]["stages_run"].append(stage)
        write_json_atomic(run_dir / "manifest.json", manifest)


def training_invocation(manifest: dict) -> dict:
    """The invocation that trained the run's adapter (the last one that ran the train stage)."""
    invocations = manifest.get("invocations", [])
    trained = [entry for entry in invocations if "train" in entry.get("stages_run", [])]
    return (trained or invocations or [{}])[-1]


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
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_count"] = torch.cuda.device_count()
    return facts


def cpu_name() -> str:
    """The CPU's model name (what every timing is measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU as a measurement should name it: model name, family/model numbers, and the vector units that decide
    how fast bf16 runs (a virtual machine often reports only "AMD EPYC")."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return cpu_name()
    flags = set(fields.get("flags", "").split())
    units = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    family = f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else ""
    details = "; ".join(part for part in (family, " ".join(units)) if part)
    return f"{cpu_name()} ({details})" if details else cpu_name()


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


_active_run_dir: Path | None = None  # the run this process works on: where a crash log goes


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder's lock for the duration; a second process on the same run exits at once.

    flock, so the lock dies with its process: a killed run never leaves a stale lock behind.
    """
    global _active_run_dir
    _active_run_dir = run_dir
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


def cache_root() -> Path:
    """$SPECIALIST_CACHE, else ~/.cache/specialist: converted models, llama.cpp builds, crash logs."""
    return Path(os.environ.get("SPECIALIST_CACHE") or Path.home() / ".cache" / "specialist")


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


def write_crash_log(error: BaseException | str, runs_root: Path | None = None) -> Path:
    """The full traceback of an unexpected failure, with what ran, in the run's logs/ folder (else the runs
    folder, else the cache): the terminal gets one line naming this file. Secrets in the environment are
    replaced by *** wherever they would appear."""
    import traceback

    for folder in (
        _active_run_dir / "logs" if _active_run_dir else None,
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
                f"git commit: {_git_commit()}",
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
    """Move a fully written temp folder into place, replacing an older one.

    Two renames: the old folder aside, the new one in. Whatever moment a kill comes, the final path holds
    either a complete folder or none (never half of one); the stage's done marker is gone before this
    runs (start_stage), so a folder missing after a kill is redone, and the aside copy is removed then.
    """
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old)


def temp_dir_for(final_dir: Path) -> Path:
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- append-only caches (generations, teacher answers, training metrics) -------------------------


def read_jsonl_records(path: Path) -> list[dict]:
    """The records of an append-only JSON-lines cache, the same way for every cache.

    A kill can cut the last line short; a line that is not a whole JSON object (that one, or a damaged
    one) is dropped, and the file is rewritten without it (atomically), so the next append starts on a
    line of its own and no reader sees the damage twice.
    """
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    records, damaged = [], False
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged = True
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged = True
    if damaged or (text and not text.endswith("\n")):
        write_jsonl_atomic(path, records)
    return records


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append whole lines, flushed at once: a kill loses at most the line being written."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


# --- stage done markers -------------------------------------------------------------------------


def start_stage(stage_dir: Path) -> Path:
    """Call before a stage touches any of its outputs: its done marker goes first, so a run killed at any
    later moment is redone by the next one, never taken as finished; temp files and folders (and old
    folders set aside) that a killed process left are removed. The run lock guarantees none is in use."""
    (stage_dir / DONE_MARKER).unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for pattern in (".*.tmp-*", ".*.old-*"):
        for leftover in stage_dir.glob(pattern):
            _remove(leftover)
    return stage_dir


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


# written into a run folder by pipeline/sweep.py (the sweep that chose it, its learning curve); read by its report
SWEEP_FILE, CURVE_FILE = "sweep.json", "curve.json"
# a run's stages in order, each with its folder: here, so the cli and the listing need not import the stages (torch)
STAGE_ORDER = ("distill", "train", "quantize", "evaluate", "cascade", "report")


def list_runs(runs_root: Path, name: str | None = None) -> list[dict]:
    """Every run folder under runs_root (or under runs_root/name): recipe, run id, when it last ran, the stages
    done, and from its report the gates and the specialist's metric beside the reference's. Newest first. A folder
    whose files a crash or a full disk cut short is listed with what is wrong (`damaged`), never stops the list."""
    found = []
    for manifest_path in sorted(runs_root.glob(f"{name or '*'}/*/manifest.json")):
        run_dir = manifest_path.parent
        entry = {"recipe": run_dir.parent.name, "run_id": run_dir.name, "recipe_file": None, "last_run": None,
                 "stages_done": [], "gates_passed": None, "metric": None, "specialized": None, "reference": None,
                 "damaged": None}  # fmt: skip
        try:
            entry.update(_run_entry(run_dir))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            entry["damaged"] = f"{type(e).__name__}: {e}"[:200]
        found.append(entry)
    return sorted(found, key=lambda e: e["last_run"] or "", reverse=True)


def _run_entry(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    invocations = manifest.get("invocations") or [{}]
    entry = {
        "recipe_file": manifest.get("recipe"),
        "last_run": invocations[-1].get("started_at"),
        "stages_done": [s for s in STAGE_ORDER if (run_dir / s / DONE_MARKER).is_file()],
    }
    report_path = run_dir / "evaluate" / "report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            raise ValueError("evaluate/report.json is not JSON (cut short?); `make report` rebuilds it") from None
        metric = report.get("metric")
        candidates = report.get("candidates", {})

        def value(candidate: str) -> dict | None:
            scores = candidates.get(candidate, {}).get("metrics", {}).get(metric)
            return None if scores is None else {"value": scores["value"], "ci95": scores["ci95"]}

        entry.update(
            gates_passed=report.get("gates", {}).get("passed"),
            metric=metric,
            specialized=value("specialized"),
            reference=value("reference"),
        )
    return entry
