"""The whole pipeline through the CLI on tiny random-init models."""

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import data
from pipeline.cli import main
from pipeline.models import ModelSource, load_model, load_tokenizer
from pipeline.next_steps import next_steps
from pipeline.recipe import load_recipe
from pipeline.render import html
from pipeline.run_layout import STAGES, RunLayout
from pipeline.runner import STAGE_MODULES
from pipeline.stages import train as train_stage
from tests.conftest import tiny_run_folder

pytestmark = pytest.mark.integration


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def pipeline_once(tiny_models, tmp_path_factory) -> Path:
    """The tiny recipe run once for the module: its recipe, data and runs folder."""
    folder = tmp_path_factory.mktemp("pipeline-once")
    assert run_cli("run", tiny_run_folder(folder, tiny_models), "--runs-dir", folder / "runs") == 0
    return folder


@pytest.fixture
def finished_run(pipeline_once, tmp_path, capsys):
    """A copy of the module's finished run (tests may change it): (its recipe, its run folder)."""
    capsys.readouterr()
    loaded = load_recipe(pipeline_once / "recipe.yaml")
    runs = tmp_path / "runs"
    shutil.copytree(pipeline_once / "runs", runs)
    return loaded, runs / "tiny-test" / loaded.run_id


def test_every_stage_keeps_the_stage_contract():
    assert tuple(STAGE_MODULES) == STAGES
    for name, module in STAGE_MODULES.items():
        assert module.STAGE == name  # its name is the one folder it writes
        for function in (module.fingerprint, module.run):
            assert list(inspect.signature(function).parameters) == ["loaded", "run_dir"], (name, function)


def test_run_writes_the_run_folder(finished_run, tiny_models):
    _, run_dir = finished_run
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    expected = {
        "recipe.resolved.yaml",
        "manifest.json",
        "train/adapter/adapter_model.safetensors",
        "train/adapter/adapter_config.json",
        "train/metrics.jsonl",
        "train/result.json",
        "train/.done.json",
        "quantize/merged/model.safetensors",
        "quantize/bnb-nf4/model.safetensors",
        "quantize/bnb-int8/model.safetensors",
        "quantize/result.json",
        "quantize/.done.json",
        "evaluate/results.json",
        "report/report.png",
        "report/report.json",
        "report/report.md",
        "report/report.html",
        "evaluate/.done.json",
        "report/.done.json",
        *(f"evaluate/generations/{c}.jsonl" for c in ("base", "specialized", "bnb-nf4", "bnb-int8", "reference")),
    }
    assert expected <= files
    # each stage wrote only its own folder; beside them only the run's own files
    assert {f.split("/")[0] for f in files} <= {*STAGES, "recipe.resolved.yaml", "manifest.json", ".lock", "data"}
    layout = RunLayout(run_dir)
    wanted = [layout.adapter, layout.train_result, layout.merged, layout.quantize_result, layout.eval_results]
    wanted += [layout.generations("specialized"), layout.report_json, layout.report_html, layout.plot("report")]
    assert all(path.exists() for path in wanted)
    assert any(f.startswith("data/train-tokenized-") for f in files)
    assert not any("checkpoint" in f or ".tmp-" in f for f in files)  # no leftovers of an unfinished write
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (invocation,) = manifest["invocations"]
    assert invocation["command"] == "run" and invocation["stages_run"] == ["train", "quantize", "evaluate", "report"]
    assert invocation["versions"]["transformers"] == "5.23.0" and manifest["data_fingerprint"]
    assert invocation["models"]["model.base"]["folder"] == str(tiny_models["base"])


def test_training_logs_loss_per_step_and_changes_only_the_adapter(finished_run, tiny_models):
    _, run_dir = finished_run
    steps = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 13))  # 96 rows / 16 per step * 2 epochs
    assert steps[-1]["loss"] < steps[0]["loss"]
    adapter = load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    base = load_file(tiny_models["base"] / "model.safetensors")
    merged = load_file(run_dir / "quantize" / "merged" / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q_proj], merged[q_proj])  # the adapter was merged in
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


def test_report_has_every_candidate_with_its_numbers(finished_run):
    loaded, run_dir = finished_run
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert list(report["candidates"]) == ["base", "specialized", "bnb-nf4", "bnb-int8", "reference"]
    targets = [row.target.strip() for row in data.load_rows(loaded.recipe.data, "eval")]
    for name, candidate in report["candidates"].items():
        lines = (run_dir / "evaluate" / "generations" / f"{name}.jsonl").read_text().splitlines()[1:]
        predictions = {e["row"]: e["prediction"] for e in map(json.loads, lines)}
        by_hand = sum(predictions[i] == t for i, t in enumerate(targets)) / len(targets)
        assert candidate["metrics"]["exact_match"]["value"] == by_hand, name
        low, high = candidate["metrics"]["exact_match"]["ci95"]
        assert low <= by_hand <= high
        for key in (
            "seconds_per_example_p50",
            "peak_memory_bytes",
            "size_on_disk_bytes",
            "generated_tokens_per_second",
            "prompt_tokens_per_example",
            "cpu_seconds_per_1000_answers",  # what answering costs the device, one request at a time
        ):
            assert candidate[key] is not None and candidate[key] >= 0, (name, key)
    sizes = {n: c["size_on_disk_bytes"] for n, c in report["candidates"].items()}
    assert sizes["bnb-nf4"] < sizes["bnb-int8"] < sizes["base"] < sizes["reference"]
    assert report["gates"]["passed"] is True
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "## Verdict" in markdown and "![exact_match against peak memory and latency](report.png)" in markdown
    # errors by label: the specialist's per-label scores recomputed from its answers, with the training rows
    labels = report["labels"]
    assert sum(labels["train_rows"].values()) == len(data.load_splits(loaded.recipe.data).train)
    per_label = labels["candidates"]["specialized"]["per_label"]
    assert sum(s["support"] for s in per_label.values()) == len(targets)
    right = sum(round(s["recall"] * s["support"]) for s in per_label.values())
    assert right == round(report["candidates"]["specialized"]["metrics"]["exact_match"]["value"] * len(targets))
    assert "## Errors by label" in markdown
    # what would help next: each point with its evidence, from this run's own report (no I/O of its own)
    assert report["next_steps"] == next_steps({k: v for k, v in report.items() if k != "next_steps"})
    assert report["next_steps"] and all(step["advice"] and step["evidence"] for step in report["next_steps"])
    assert "## What would most likely help next" in markdown and report["next_steps"][0]["evidence"] in markdown
    page = (run_dir / "report" / "report.html").read_text()
    assert 'id="next-steps"' in page
    before = {k: v for k, v in report.items() if k != "next_steps"}  # a report written before next_steps existed
    assert 'id="next-steps"' not in html.render(before, ["a verdict"], None)
    assert (run_dir / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["candidates"]["bnb-nf4"]["parameters"] == report["candidates"]["base"]["parameters"]


def test_adapter_and_quantized_variants_load_back_and_generate(finished_run):
    from peft import PeftModel

    _, run_dir = finished_run
    adapter_dir = run_dir / "train" / "adapter"
    tokenizer = load_tokenizer(ModelSource(str(adapter_dir), None, True))
    prompt = torch.tensor([tokenizer("Message: where is my parcel?\nIntent:")["input_ids"]])
    base_config = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    specialized = PeftModel.from_pretrained(
        load_model(ModelSource(base_config, None, True), torch.float32), adapter_dir
    )
    for model in [specialized] + [
        load_model(ModelSource(str(run_dir / "quantize" / kind), None, True), torch.float32)
        for kind in ("bnb-nf4", "bnb-int8")
    ]:
        out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] > prompt.shape[1]


def test_rerun_skips_finished_stages_and_report_does_not_generate(pipeline_once, capsys, monkeypatch):
    # the module's own run folder: a copied one would evaluate its moved variant folders again
    loaded = load_recipe(pipeline_once / "recipe.yaml")
    runs = pipeline_once / "runs"
    run_dir = runs / "tiny-test" / loaded.run_id
    capsys.readouterr()
    report = (run_dir / "report" / "report.json").stat().st_mtime_ns
    assert run_cli("run", loaded.path, "--runs-dir", runs) == 0
    err = capsys.readouterr().err
    for stage in ("train", "quantize", "evaluate", "report"):  # unchanged data (a nightly job): nothing to do
        assert f"[{stage}] already done for this recipe and data; skipped" in err
    assert (run_dir / "report" / "report.json").stat().st_mtime_ns == report

    def no_generation(*args, **kwargs):
        raise AssertionError("report must not generate")

    monkeypatch.setattr("pipeline.runtimes.transformers.generate_batches", no_generation)
    assert run_cli("report", loaded.path, "--runs-dir", runs) == 0
    # eval reruns from the generation cache, without generating either
    assert run_cli("eval", loaded.path, "--runs-dir", runs) == 0
    assert "5" not in [line for line in capsys.readouterr().err.splitlines() if "generating" in line]


def test_rerunning_train_reuses_the_tokenized_rows(finished_run, monkeypatch):
    loaded, run_dir = finished_run
    monkeypatch.setattr(data, "training_examples", lambda *a, **k: pytest.fail("tokenized again"))
    assert run_cli("train", loaded.path, "--runs-dir", run_dir.parent.parent) == 0


def test_killed_training_resumes_from_its_last_checkpoint(tiny_recipe, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    original = train_stage.LossLog.on_log

    def die_at_step_6(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_stage.LossLog, "on_log", die_at_step_6)
    assert run_cli("train", tiny_recipe, "--runs-dir", runs) == 130
    monkeypatch.setattr(train_stage.LossLog, "on_log", original)
    assert run_cli("train", tiny_recipe, "--runs-dir", runs) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-4" in err
    run_dir = runs / "tiny-test" / load_recipe(tiny_recipe).run_id
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_stage_out_of_order_is_a_clear_error(tiny_recipe, tmp_path, capsys):
    assert run_cli("eval", tiny_recipe, "--runs-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert "no finished train stage to evaluate; run `make train" in err and "Traceback" not in err


def test_bad_recipe_exits_2_with_file_and_line(write_recipe, capsys):
    path = write_recipe("name: t\nmodel:\n  bsae: x\n")
    assert run_cli("validate", path) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: model.bsae: unknown key (did you mean 'model.base'?)" in err
    assert "Traceback" not in err


def test_qlora_trains_an_adapter_on_a_4bit_base(tiny_recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    overrides = ["--set", "train.qlora=true", "--set", "train.max_steps=2"]
    assert run_cli("train", tiny_recipe, "--runs-dir", runs, *overrides) == 0
    assert "QLoRA (nf4 base)" in capsys.readouterr().err
    run_dir = runs / "tiny-test" / load_recipe(tiny_recipe, overrides[1::2]).run_id
    adapter = load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert all(v.dtype == torch.float32 for v in adapter.values())  # the adapter itself stays full precision


def test_messages_format_with_a_chat_template_file_and_packing(write_recipe, tiny_models, intents_rows, tmp_path):
    train, test = intents_rows
    for path in (train, test):  # the same task, as conversations
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": "Classify."},
                            {"role": "user", "content": r["text"]},
                            {"role": "assistant", "content": r["label"]},
                        ]
                    }
                )
                + "\n"
                for r in rows
            )
        )
    (tmp_path / "chatml.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    recipe = write_recipe(f"""
        name: messages-test
        model: {{base: {tiny_models["base"]}}}
        data:
          train: {train}
          eval: {test}
          format: messages
          chat_template_file: chatml.jinja
          packing: true
          max_seq_len: 128
        train: {{epochs: 4, batch_size: 4, lr: 5.0e-3}}
        quantize: []
        evaluate: {{max_new_tokens: 6, bootstrap_samples: 100}}
    """)
    runs = tmp_path / "runs"
    assert run_cli("run", recipe, "--runs-dir", runs) == 0
    run_dir = runs / "messages-test" / load_recipe(recipe).run_id
    result = json.loads((run_dir / "train" / "result.json").read_text())
    assert result["rows"] == 96 and result["sequences"] < 60  # rows of ~50 tokens: two or more per 128
    report = json.loads((run_dir / "report" / "report.json").read_text())
    specialized = report["candidates"]["specialized"]["metrics"]["exact_match"]["value"]
    assert specialized > report["candidates"]["base"]["metrics"]["exact_match"]["value"]
    # the eval prompt went through the recipe's chat template: system + user turn + assistant header
    assert report["candidates"]["specialized"]["prompt_tokens_per_example"] > 10


def test_interrupted_evaluation_continues_from_its_generation_cache(finished_run, capsys):
    loaded, run_dir = finished_run
    cache = run_dir / "evaluate" / "generations" / "reference.jsonl"
    complete = cache.read_text().splitlines()
    # as if killed while writing the 4th answer: a header, 3 answers and half a line
    cache.write_text("\n".join(complete[:4]) + "\n" + complete[4][:10])
    (run_dir / "evaluate" / "generations" / "reference.cost.json").unlink()
    assert run_cli("eval", loaded.path, "--runs-dir", run_dir.parent.parent) == 0
    assert "[evaluate] reference: generating 21 answers (3 cached)" in capsys.readouterr().err
    assert cache.read_text().splitlines()[:4] == complete[:4] and len(cache.read_text().splitlines()) == 25


def test_training_is_reproducible_from_the_seed(tiny_recipe, tmp_path):
    adapters = []
    for attempt in ("a", "b"):
        runs = tmp_path / attempt
        assert run_cli("train", tiny_recipe, "--runs-dir", runs, "--set", "train.max_steps=3") == 0
        run_dir = runs / "tiny-test" / load_recipe(tiny_recipe, ["train.max_steps=3"]).run_id
        adapters.append(load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_quantize_refuses_a_keep_pattern_that_names_no_module(finished_run, capsys):
    loaded, run_dir = finished_run
    # the overrides make a new run folder; copy the finished training into it
    overrides = ["quantize=[{kind: bnb-nf4, keep_full_precision: [transformer.h.0]}]"]
    loaded = load_recipe(loaded.path, overrides)
    new_run = run_dir.parent / loaded.run_id
    shutil.copytree(run_dir / "train", new_run / "train")
    args = ["quantize", loaded.path, "--runs-dir", run_dir.parent.parent, "--set", overrides[0]]
    assert run_cli(*args) == 2
    assert "no module of the model is named 'transformer.h.0'" in capsys.readouterr().err


def test_runs_lists_each_run_with_its_gates_and_metric(finished_run, capsys):
    loaded, run_dir = finished_run
    runs = run_dir.parent.parent
    (runs / "other" / "half-written").mkdir(parents=True)  # no manifest: not a run
    assert run_cli("runs", "--runs-dir", runs) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if loaded.run_id in line]
    report = json.loads((run_dir / "report" / "report.json").read_text())
    value = report["candidates"]["specialized"]["metrics"]["exact_match"]["value"]
    assert len(lines) == 1 and "| tiny-test |" in lines[0] and "| passed |" in lines[0]
    assert f"{value:.3f}" in lines[0] and "train, quantize, evaluate, report" in lines[0]
    assert run_cli("runs", "--runs-dir", runs, "--json", "nothing-by-this-name") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert run_cli("runs", "--runs-dir", runs / "missing") == 2

    # a run folder a crash or a full disk cut short is listed as damaged; the others are listed as before
    import shutil

    for name, cut in (("report-cut", "report/report.json"), ("manifest-cut", "manifest.json")):
        damaged = runs / "tiny-test" / name
        shutil.copytree(run_dir, damaged)
        (damaged / cut).write_text((damaged / cut).read_text()[:40])
    (runs / "tiny-test" / "manifest-a-list").mkdir()
    (runs / "tiny-test" / "manifest-a-list" / "manifest.json").write_text("[1, 2]")
    capsys.readouterr()
    assert run_cli("runs", "--runs-dir", runs) == 0
    out = capsys.readouterr().out
    assert f"{value:.3f}" in next(line for line in out.splitlines() if loaded.run_id in line)
    for name in ("report-cut", "manifest-cut", "manifest-a-list"):
        assert f"| {name} | damaged: " in out, name
    assert "report.json is not JSON (cut short?)" in out
    # compare names the cut file instead of crashing
    assert run_cli("compare", run_dir, runs / "tiny-test" / "report-cut", "--runs-dir", runs) == 2
    assert "report.json is not JSON (cut short?)" in capsys.readouterr().err
    # a run from before report/ (schema 6) says how to rebuild its report, in the list and in compare
    older = runs / "tiny-test" / "older"
    shutil.copytree(run_dir, older)
    (older / "evaluate" / "report.json").write_text((older / "report" / "report.json").read_text())
    shutil.rmtree(older / "report")
    assert run_cli("runs", "--runs-dir", runs) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "| older |" in line)
    assert "older version (evaluate/report.json); `make report" in line
    assert run_cli("compare", run_dir, older, "--runs-dir", runs) == 2
    assert "its report is from an older version" in capsys.readouterr().err
