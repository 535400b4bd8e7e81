"""Runs as jobs: two training processes under accelerate, the run lock, reruns on new data, a real
single-node Slurm cluster (tests/slurm_cluster.py) running and requeueing the pipeline, SkyPilot task files."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.processes import run_lock
from pipeline.recipe import load_recipe
from pipeline.runs import read_manifest, run_dir_for
from tests import slurm_cluster

pytestmark = pytest.mark.integration


@pytest.mark.slow  # make test-slow: two training processes under accelerate (13 s); the quick suite trains one
def test_two_processes_train_the_same_steps_and_rank_0_alone_writes(tiny_recipe, tmp_path, capfd):
    runs = tmp_path / "runs"
    args = ["run", str(tiny_recipe), "--runs-dir", str(runs), "--set", "train.processes=2"]
    assert main(args) == 0
    err = capfd.readouterr().err
    run_dir = run_dir_for(load_recipe(tiny_recipe, ["train.processes=2"]), runs)
    result = json.loads((run_dir / "train" / "result.json").read_text())
    # 96 rows, 2 epochs, 16 rows per process x 2 processes per step
    assert result["processes"] == 2 and result["effective_batch_size"] == 32 and result["steps"] == 6
    assert "rank 0/2: 6 steps" in err and "rank 1/2: 6 steps" in err
    assert err.count("[train] done:") == 1  # one adapter, one result, one done marker
    assert "effective batch 32 = 16 per process x 2 processes x 1 accumulated" in err
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # logged once per step, not once per rank
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(args) == 0
    assert "[train] already done for this recipe and data; skipped" in capfd.readouterr().err


@pytest.mark.slow  # make test-slow: two training processes, twice (a refit); the quick suite refits in one
def test_two_processes_refit_to_the_step_rank_0_chose(tiny_recipe, tmp_path, capfd):
    runs = tmp_path / "runs"
    overrides = ["train.processes=2", "train.refit=true", "data.validation=32", "train.eval_every=1"]
    assert (
        main(["train", str(tiny_recipe), "--runs-dir", str(runs), *[a for o in overrides for a in ("--set", o)]]) == 0
    )
    err = capfd.readouterr().err
    run_dir = run_dir_for(load_recipe(tiny_recipe, overrides), runs)
    result = json.loads((run_dir / "train" / "result.json").read_text())
    # 64 rows trained, then 96: 2 and 3 steps an epoch at 32 rows a step, 2 epochs
    assert result["schedule_steps"] == 4 and result["refit"]["schedule_steps"] == 6
    chosen = result["validation"]["chosen_step"]
    assert result["refit"]["steps"] == max(1, round(chosen / 4 * 6))  # both ranks stopped where rank 0 chose
    assert err.count("[train] done:") == 1 and (run_dir / "train" / "validated-adapter").is_dir()


def test_a_second_invocation_of_a_running_recipe_exits_at_once(tiny_recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = run_dir_for(load_recipe(tiny_recipe), runs)
    with run_lock(run_dir):
        started = time.perf_counter()
        assert main(["run", str(tiny_recipe), "--runs-dir", str(runs)]) == 4
        assert time.perf_counter() - started < 10
        err = capsys.readouterr().err
        assert f"{run_dir} is in use by pid" in err and "already going" in err
        assert main(["train", str(tiny_recipe), "--runs-dir", str(runs)]) == 4
    assert not (run_dir / "train").exists()


def test_new_data_in_the_same_files_is_a_new_run(tiny_recipe, intents_rows):
    before = load_recipe(tiny_recipe).run_id
    assert load_recipe(tiny_recipe).run_id == before  # unchanged data: the same run, whose stages are done
    train, _ = intents_rows
    train.write_text(train.read_text() + json.dumps({"text": "where is my parcel", "label": "track_order"}) + "\n")
    assert load_recipe(tiny_recipe).run_id != before


# --- Slurm -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster, reason = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    if cluster is None:
        pytest.skip(f"no Slurm here: {reason}")
    yield cluster
    cluster.stop()


@pytest.mark.slow  # make test-slow: real Slurm jobs (started by the fixture)
def test_a_slurm_job_runs_the_recipe_and_returns_its_exit_code(slurm, tiny_recipe, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    runs = tmp_path / "runs"
    args = ["submit", "slurm", str(tiny_recipe), "--runs-dir", str(runs), "--set", "launch.cpus=2", "--wait"]
    assert main(args) == 0
    run_dir = run_dir_for(load_recipe(tiny_recipe), runs)
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --signal=B:USR1@120" in script
    job = capfd.readouterr().out.strip().splitlines()[0]
    log = (run_dir / "slurm" / f"{job}.out").read_text()
    assert "[slurm] pipeline exited with 0" in log
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert set(report["candidates"]) >= {"base", "specialized", "reference"}
    # failed gates come back as the job's exit code 1
    assert main([*args, "--set", "evaluate.gates.specialized_min=0.999"]) == 1


@pytest.mark.slow  # make test-slow: a real Slurm job array, then its choosing job
def test_a_sweep_runs_on_slurm_as_a_job_array_then_a_choosing_job(slurm, tiny_recipe, tmp_path, monkeypatch):
    from pipeline import sweep

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(
        f"extends: {tiny_recipe.name}\ndata: {{validation: 24}}\nquantize: []\n"
        "evaluate: {metrics: [chrf], reference: null, gates: {quantized_max_drop: null}}\n"
        "sweep:\n  params:\n    train.lr: [1.0e-3, 1.0e-2]\n"
    )
    runs = tmp_path / "runs"
    assert main(["submit", "slurm", str(recipe), "--runs-dir", str(runs), "--wait"]) == 0
    loaded = load_recipe(recipe)
    folder = sweep.summary_dir(loaded, runs, "sweep")
    summary = json.loads((folder / "sweep.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["done", "done"] and summary["chosen_eval"] is not None
    logs = sorted(p.name for p in (folder / "slurm").glob("*_*.out"))
    assert [name.rsplit("_", 1)[1] for name in logs] == ["0.out", "1.out"]  # one task per trial
    for trial in sweep.trials(loaded):  # each trained once, by its own task
        manifest = read_manifest(run_dir_for(trial.loaded, runs))
        assert len([e for e in manifest["invocations"] if "train" in e["stages_run"]]) == 1


@pytest.mark.slow  # make test-slow: a real Slurm job signalled, requeued, resumed
def test_a_slurm_job_signalled_before_its_time_limit_checkpoints_requeues_and_resumes(
    slurm, tiny_recipe, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    runs = tmp_path / "runs"
    overrides = ["train.max_steps=400", "train.save_steps=1000"]  # no periodic checkpoint: only the signal's
    args = ["submit", "slurm", str(tiny_recipe), "--runs-dir", str(runs)]
    assert main([*args, *(a for o in overrides for a in ("--set", o))]) == 0
    job = capfd.readouterr().out.strip().splitlines()[0]
    run_dir = run_dir_for(load_recipe(tiny_recipe, overrides), runs)
    metrics = run_dir / "train" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 20):
        assert time.time() < deadline, "training never started"
        time.sleep(0.2)
    # what Slurm sends signal_seconds before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, check=True)
    while "Restarts=1" not in _job(slurm, job):
        assert time.time() < deadline, _job(slurm, job)
        time.sleep(0.5)
    # Slurm holds a requeued job back until the old instance's credential expires (cred_expire, 10 s here;
    # 120 s by default), so the restart cannot collide with the instance that is still being killed
    log_path = run_dir / "slurm" / f"{job}.out"
    while "JobState=COMPLETED" not in _job(slurm, job):
        assert "JobState=FAILED" not in _job(slurm, job), log_path.read_text()[-3000:]
        assert time.time() < deadline + 120, _job(slurm, job)
        time.sleep(0.5)
    log = log_path.read_text()
    assert "[slurm] stop signal: checkpointing, then requeueing" in log
    assert "train: stopped by a signal at step" in log
    assert "restart 1" in log and "resuming from" in log
    result = json.loads((run_dir / "train" / "result.json").read_text())
    assert result["steps"] == 400 and "checkpoint-" in result["resumed_from"]


def _job(slurm, job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm.env, capture_output=True, text=True).stdout


# --- SkyPilot --------------------------------------------------------------------------------------


def test_the_skypilot_task_mounts_the_data_and_names_the_token_without_its_value(
    tiny_recipe, tiny_models, intents_rows, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", "hf_secretValueNeverWritten")
    runs = tmp_path / "runs"
    sets = ["launch.gpus=2", "launch.gpu_type=H100", "launch.cpus=16", "launch.memory=64G", "launch.cloud=aws"]
    assert main(["submit", "sky", str(tiny_recipe), "--runs-dir", str(runs), "--dry-run", *_sets(sets)]) == 0
    run_dir = run_dir_for(load_recipe(tiny_recipe, sets), runs)
    path = run_dir / "sky" / "task.yaml"
    text = path.read_text()
    assert "hf_secretValueNeverWritten" not in text
    task = yaml.safe_load(text)
    assert task["resources"] == {"accelerators": "H100:2", "cpus": "16+", "memory": "64+", "infra": "aws"}
    assert task["secrets"] == {"HF_TOKEN": None}
    assert task["setup"] == "make setup"
    assert task["run"] == f".venv/bin/specialist run {run_dir / 'recipe.resolved.yaml'} --runs-dir runs"
    train, test = intents_rows
    local = {str(train), str(test), str(run_dir / "recipe.resolved.yaml"), str(tiny_models["base"])}
    assert local | {str(tiny_models["reference"])} <= set(task["file_mounts"])
    assert all(remote == local for remote, local in task["file_mounts"].items())  # same paths on the cloud VM


def test_skypilot_reads_the_task_file(tiny_recipe, tmp_path):
    from pipeline.launch import skypilot

    python = skypilot.sky_environment() / "bin" / "python"
    if not python.is_file():  # CI installs it (.ci/run): there this check always runs
        pytest.skip(f"SkyPilot is not installed in {skypilot.sky_environment()}: `make skypilot`")
    runs = tmp_path / "runs"
    args = ["submit", "sky", str(tiny_recipe), "--runs-dir", str(runs), "--dry-run", "--set", "launch.gpus=1"]
    assert main(args) == 0
    path = run_dir_for(load_recipe(tiny_recipe, ["launch.gpus=1"]), runs) / "sky" / "task.yaml"
    read = "import json, sys, sky; t = sky.Task.from_yaml(sys.argv[1]); print(json.dumps([t.run, str(t.resources)]))"
    done = subprocess.run([str(python), "-c", read, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run, resources = json.loads(done.stdout.strip().splitlines()[-1])
    assert run == yaml.safe_load(path.read_text())["run"]
    assert "A100" in resources and "1" in resources


def test_a_sweep_goes_to_skypilot_as_parallel_trial_tasks_on_a_bucket_then_a_choosing_task(
    tiny_recipe, tmp_path, monkeypatch
):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(
        f"extends: {tiny_recipe.name}\ndata: {{validation: 24}}\nlaunch: {{runs_bucket: 's3://bucket/runs'}}\n"
        "sweep:\n  params:\n    train.lr: [1.0e-3, 1.0e-2]\n"
    )
    runs = tmp_path / "runs"
    # a stand-in for `sky` that records each launch and fails the task named in FAIL
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "sky"
    fake.parent.mkdir()
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\ncase "$*" in *"$FAIL"*) [ -n "$FAIL" ] && exit 3;; esac\nexit 0\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAIL", "")
    assert main(["submit", "sky", str(recipe), "--runs-dir", str(runs)]) == 0
    launched = calls.read_text().splitlines()
    assert len(launched) == 3 and all(line.startswith("launch -y") for line in launched)
    trials, choose = launched[:2], launched[2]
    assert all("--down" in line and "-trial-" in line for line in trials) and "--down" not in choose
    folder = Path(choose.split()[-1]).parent
    task = yaml.safe_load((folder / "trial-1.yaml").read_text())
    assert task["file_mounts"]["/specialist-runs"] == {"source": "s3://bucket/runs", "mode": "MOUNT"}
    assert task["run"].endswith("--runs-dir /specialist-runs --trial 1")
    assert yaml.safe_load((folder / "choose.yaml").read_text())["run"].endswith("--runs-dir /specialist-runs")
    calls.unlink()
    monkeypatch.setenv("FAIL", "trial-1")  # a failed trial: its exit code, and nothing is chosen
    assert main(["submit", "sky", str(recipe), "--runs-dir", str(runs)]) == 3
    assert len(calls.read_text().splitlines()) == 2


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]
