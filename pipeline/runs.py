"""The run directory: where it is, what the manifest records, stage done markers and the list of runs.

runs/<recipe name>/<run id>/ where the run id is the hash of the resolved recipe, so the same recipe
always lands in the same folder and a rerun finds the stages it already finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.errors import PipelineError
from pipeline.files import remove_path, write_json_atomic, write_text_atomic
from pipeline.machine import git_changed, git_commit, machine_facts, package_versions
from pipeline.processes import in_launched_process
from pipeline.report_types import has_report, read_report
from pipeline.run_layout import DONE_MARKER, STAGES, RunLayout

if TYPE_CHECKING:  # annotations only: runs.py stays importable without the recipe schema (runtime processes)
    from pipeline.recipe import LoadedRecipe


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
    write_text_atomic(RunLayout(run_dir).resolved_recipe, yaml.safe_dump(loaded.resolved, sort_keys=False))
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
        "git_commit": git_commit(),
        "git_changed": git_changed(),
        "machine": machine_facts(),
    }
    if models:
        invocation["models"] = models
    invocations = [*manifest.get("invocations", []), invocation]
    # A nightly job on unchanged data adds an entry that ran nothing: keep the last few of those only.
    idle = [i for i, entry in enumerate(invocations) if not entry.get("stages_run")][:-KEEP_IDLE_INVOCATIONS]
    manifest["invocations"] = [entry for i, entry in enumerate(invocations) if i not in idle]
    write_json_atomic(RunLayout(run_dir).manifest, manifest)
    return run_dir


KEEP_IDLE_INVOCATIONS = 20


def read_manifest(run_dir: Path) -> dict:
    """The run's manifest; one written before manifests kept invocations becomes its first invocation."""
    path = RunLayout(run_dir).manifest
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
    """Note in this invocation's manifest entry that it ran (and finished) `stage`, and when: the last stage's
    time is when the invocation's work ended (its wall time, from started_at)."""
    manifest = read_manifest(run_dir)
    mine = [entry for entry in manifest.get("invocations", []) if entry.get("pid") == os.getpid()]
    if mine:
        mine[-1]["stages_run"].append(stage)
        mine[-1]["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(RunLayout(run_dir).manifest, manifest)


def training_invocation(manifest: dict) -> dict:
    """The invocation that trained the run's adapter (the last one that ran the train stage)."""
    invocations = manifest.get("invocations", [])
    trained = [entry for entry in invocations if "train" in entry.get("stages_run", [])]
    return (trained or invocations or [{}])[-1]


# --- stage done markers -------------------------------------------------------------------------


def start_stage(stage_dir: Path) -> Path:
    """Call before a stage touches any of its outputs: its done marker goes first, so a run killed at any
    later moment is redone by the next one, never taken as finished; temp files and folders (and old
    folders set aside) that a killed process left are removed. The run lock guarantees none is in use."""
    (stage_dir / DONE_MARKER).unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for pattern in (".*.tmp-*", ".*.old-*"):
        for leftover in stage_dir.glob(pattern):
            remove_path(leftover)
    return stage_dir


def stage_fingerprint(*parts: Any) -> str:
    """Hash of everything a stage's output depends on (recipe sections, upstream fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def is_done(stage_dir: Path, fingerprint: str) -> bool:
    return done_fingerprint(stage_dir) == fingerprint


def done_fingerprint(stage_dir: Path) -> str | None:
    """The fingerprint a finished stage (or summary folder) was marked done with; None where it is not done."""
    marker = stage_dir / DONE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("fingerprint")


def stage_done(run_dir: Path, stage: str) -> str | None:
    """done_fingerprint of one of the run's stages: what a later stage's fingerprint builds on."""
    return done_fingerprint(RunLayout(run_dir).stage(stage))


def mark_done(stage_dir: Path, fingerprint: str, **facts: Any) -> None:
    write_json_atomic(
        stage_dir / DONE_MARKER,
        {"fingerprint": fingerprint, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **facts},
    )


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
        except PipelineError as e:  # the report: cut short, or of another schema (its message says the fix)
            entry["damaged"] = str(e)[:300]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            entry["damaged"] = f"{type(e).__name__}: {e}"[:200]
        found.append(entry)
    return sorted(found, key=lambda e: e["last_run"] or "", reverse=True)


def _run_entry(run_dir: Path) -> dict:
    manifest = json.loads(RunLayout(run_dir).manifest.read_text())
    invocations = manifest.get("invocations") or [{}]
    entry = {
        "recipe_file": manifest.get("recipe"),
        "last_run": invocations[-1].get("started_at"),
        "stages_done": [s for s in STAGES if RunLayout(run_dir).done_marker(s).is_file()],
    }
    if has_report(run_dir):
        report = read_report(RunLayout(run_dir).report_json)  # an older version's: its message says the fix
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
