"""Publishing a finished run: the bundle, the model card, and the real huggingface_hub client pushing it
to a Hub stand-in on 127.0.0.1 (tests/fake_hub.py) that records every request and commit."""

import json
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from pipeline import llamacpp_install, results
from pipeline.cli import main
from pipeline.data import read_jsonl
from pipeline.recipe import load_recipe
from tests.conftest import INTENTS
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.integration

TOKEN = "hf_specialistTestTokenDoNotLeak0123456789"
REPO = "alice/tiny-specialist"
BASE_ID = "specialist-tests/tiny-llama"


@pytest.fixture(scope="module")
def finished(tiny_models, tmp_path_factory):
    """The tiny recipe trained, exported to GGUF q8_0 and evaluated once for every test here."""
    llamacpp_install.ensure()
    folder = tmp_path_factory.mktemp("publish")
    for name, count in (("train.jsonl", 96), ("test.jsonl", 24)):
        rows = [row for _, row in read_jsonl(INTENTS / name)][:count]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "name: tiny-publish\n"
        f"model: {{base: {tiny_models['base']}}}\n"
        "data:\n"
        "  train: train.jsonl\n"
        "  eval: test.jsonl\n"
        '  prompt: "Message: {text}\\nIntent:"\n'
        '  target: " {label}"\n'
        "  chat_template: never\n"
        "train: {epochs: 2, batch_size: 16, lr: 5.0e-3}\n"
        "quantize: [{kind: gguf, type: q8_0}, {kind: gguf-lora, base_type: q8_0}]\n"
        "evaluate:\n"
        "  max_new_tokens: 6\n"
        "  batch_size: 8\n"
        "  bootstrap_samples: 200\n"
        "  latency_rows: 2\n"
        f"  reference: {{model: {tiny_models['reference']}}}\n"
        "  gates: {quantized_max_drop: 1.0}\n"
        "publish:\n"
        f"  repo: {REPO}\n"
        "  merged: true\n"
        "  gguf: true\n"
        "  license: mit\n"
        f"  base_model: {BASE_ID}\n"
    )
    runs = folder / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    loaded = load_recipe(recipe)
    return recipe, runs, runs / "tiny-publish" / loaded.run_id


@pytest.fixture
def hub(monkeypatch):
    """The Hub stand-in, with alice (token TOKEN, member of org acme) and bob; the client pointed at it."""
    server = FakeHub({TOKEN: "alice", "hf_bobsToken": "bob", "hf_readOnly": "alice"}, orgs={"alice": ["acme"]})
    server.read_only.add("hf_readOnly")
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain LFS, which the stand-in speaks
    yield server
    server.stop()


def publish(finished, *extra) -> int:
    recipe, runs, _ = finished
    return main(["publish", str(recipe), "--runs-dir", str(runs), *map(str, extra)])


def bundle_files(run_dir) -> dict[str, bytes]:
    folder = run_dir / "publish"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_token_nowhere(tmp_root, outputs: str) -> None:
    assert TOKEN not in outputs
    for path in tmp_root.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_dry_run_builds_the_bundle_and_uploads_nothing(finished, hub, capfd):
    _, _, run_dir = finished
    assert publish(finished, "--dry-run") == 0
    err = capfd.readouterr().err
    files = bundle_files(run_dir)
    expected = {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.resolved.yaml",
        "report.md",
        "report.json",
        "report.png",
        "merged/model.safetensors",
        "merged/config.json",
        "tiny-publish-q8_0.gguf",
        "Modelfile.q8_0",
    }
    assert expected <= set(files)
    assert files["adapter_model.safetensors"] == (run_dir / "train/adapter/adapter_model.safetensors").read_bytes()
    assert files["tiny-publish-q8_0.gguf"] == (run_dir / "quantize/gguf-q8_0/model.gguf").read_bytes()
    assert "FROM ./tiny-publish-q8_0.gguf" in files["Modelfile.q8_0"].decode()
    # the adapter GGUF, named by its own type, and a Modelfile naming the base file the card says how to make
    assert files["tiny-publish-lora-f16.gguf"] == (run_dir / "quantize/gguf-lora-q8_0/adapter.gguf").read_bytes()
    modelfile = files["Modelfile.lora-q8_0"].decode()
    assert "\nFROM ./tiny-llama-q8_0.gguf\n" in modelfile and "\nADAPTER ./tiny-publish-lora-f16.gguf\n" in modelfile
    # what to run names no file of this machine's cache (report.json says which file was evaluated)
    assert not any(b"gguf-bases" in files[name] for name in files if name.startswith(("Modelfile", "README")))
    # the adapter names the base on the Hub, not this machine's folder, so AutoPeftModel can load it anywhere
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    assert "dry run: nothing uploaded" in err and REPO in err
    assert hub.requests == []
    assert not (run_dir / "published.json").exists()


def test_the_card_parses_back_to_the_reports_numbers(finished, hub):
    _, _, run_dir = finished
    assert publish(finished, "--dry-run") == 0
    report = json.loads((run_dir / "report" / "report.json").read_text())
    card = ModelCard.load(run_dir / "publish" / "README.md")
    data = card.data
    assert data.base_model == BASE_ID and data.library_name == "peft" and data.license == "mit"
    assert {"specialist", "lora", "gguf"} <= set(data.tags)
    assert data.model_name == REPO
    found = {}
    for result in data.eval_results:
        candidate = result.metric_name.removeprefix(f"{result.metric_type} (").removesuffix(")")
        found[(candidate, result.metric_type)] = result.metric_value
        assert result.dataset_split == "test" and result.task_type == "text-generation"
    expected = {
        (name, metric): values["value"]
        for name, c in report["candidates"].items()
        for metric, values in c["metrics"].items()
    }
    assert found == expected
    assert {"base", "specialized", "gguf-q8_0", "gguf-lora-q8_0", "reference"} == {name for name, _ in found}
    text = card.text
    spec = report["candidates"]["specialized"]["metrics"][report["metric"]]
    assert f"{spec['value']:.3f} [{spec['ci95'][0]:.3f}, {spec['ci95'][1]:.3f}]" in text  # the table, with its CI
    assert "### Verdict" in text and "### Gates" in text and "### Fidelity" in text
    assert f'AutoPeftModelForCausalLM.from_pretrained("{REPO}")' in text
    assert f"llama-cli -hf {REPO}:Q8_0" in text
    assert f"hf download {BASE_ID} --local-dir base" in text
    assert "convert_hf_to_gguf.py base --outtype q8_0 --outfile tiny-llama-q8_0.gguf" in text
    assert "llama-cli -m tiny-llama-q8_0.gguf --lora tiny-publish-lora-f16.gguf" in text
    assert "`tiny-publish-lora-f16.gguf`, `Modelfile.lora-q8_0`: the adapter alone as a LoRA GGUF (f16)" in text
    assert "- **gguf-lora-q8_0**: this adapter as a LoRA GGUF (f16) on the base as a q8_0 GGUF (llama.cpp)" in text
    assert yaml.safe_load((run_dir / "publish" / "recipe.resolved.yaml").read_text())["publish"]["repo"] == REPO
    assert not text.lstrip().startswith("> **Warning")
    # the manual shows the card's opening from the bundle itself, its metadata condensed to the gating metric
    kept = results.add(run_dir / "publish", "tiny-card", run_dir.parent / "kept")
    shown = results.table(json.loads(kept.read_text()))
    assert f"- name: {REPO}" in shown and f"every candidate x every metric ({len(expected)} here)" in shown
    assert f"name: {report['metric']} (specialized)" in shown and "A LoRA adapter that specializes" in shown
    assert "## Evaluation" not in shown and f"The bundle of run `{run_dir.name}`:" in shown


def test_the_bundle_is_the_same_bytes_every_time(finished, hub):
    _, _, run_dir = finished
    assert publish(finished, "--dry-run") == 0
    first = bundle_files(run_dir)
    assert publish(finished, "--dry-run") == 0
    assert bundle_files(run_dir) == first


def test_publish_pushes_the_bundle_and_only_the_authorization_header_carries_the_token(finished, hub, capfd):
    recipe, runs, run_dir = finished
    assert publish(finished) == 0
    out, err = capfd.readouterr()
    repo = hub.repos[REPO]
    assert repo.private  # publish.private defaults to true
    head = repo.head("main")
    assert head.files == bundle_files(run_dir)  # every file, byte for byte
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["run_id"] in head.message and "gates passed" in head.description
    record = json.loads((run_dir / "published.json").read_text())
    assert record["changed"] and record["commit"] == head.sha and record["repo"] == REPO
    lfs_puts = [r for r in hub.requests if r.method == "PUT"]
    assert lfs_puts and all("authorization" not in r.headers for r in lfs_puts)  # storage never sees it
    for request in hub.requests:
        assert TOKEN not in request.path and TOKEN.encode() not in request.body
        for name, value in request.headers.items():
            assert TOKEN not in value or (name == "authorization" and value == f"Bearer {TOKEN}")
    assert_token_nowhere(recipe.parent, out + err)


def test_publishing_the_same_run_twice_changes_nothing(finished, hub, capfd):
    _, _, run_dir = finished
    assert publish(finished) == 0
    commits, requests = len(hub.repos[REPO].branches["main"]), len(hub.requests)
    assert publish(finished) == 0
    assert len(hub.repos[REPO].branches["main"]) == commits
    assert not json.loads((run_dir / "published.json").read_text())["changed"]
    assert "nothing changed" in capfd.readouterr().err
    second = hub.requests[requests:]
    assert second and not [r for r in second if r.path.endswith("/commit/main") or r.method == "PUT"]


def test_a_revision_is_committed_to_its_own_branch(finished, hub):
    assert publish(finished, "--set", "publish.revision=experiment-1", "--set", "publish.private=false") == 0
    repo = hub.repos[REPO]
    assert not repo.private
    assert len(repo.branches["main"]) == 1  # only the repo's initial commit
    assert "README.md" in repo.head("experiment-1").files


def test_a_run_that_failed_its_gates_is_refused_unless_asked(finished, hub, tmp_path, capfd):
    recipe, runs, run_dir = finished
    failed_runs = tmp_path / "runs"
    shutil.copytree(run_dir, failed_runs / run_dir.parent.name / run_dir.name)
    report_path = failed_runs / run_dir.parent.name / run_dir.name / "report" / "report.json"
    report = json.loads(report_path.read_text())
    failed = {"specialized_min": {"threshold": 0.99, "value": 0.5, "passed": False}}
    report["gates"] = {"passed": False, "checks": failed}
    report_path.write_text(json.dumps(report))

    assert main(["publish", str(recipe), "--runs-dir", str(failed_runs)]) == 1
    err = capfd.readouterr().err
    assert "failed its gates (specialized_min)" in err and "--allow-failed-gates" in err and "Traceback" not in err
    assert hub.repos == {}

    assert main(["publish", str(recipe), "--runs-dir", str(failed_runs), "--allow-failed-gates"]) == 0
    card = hub.repos[REPO].head("main").files["README.md"].decode()
    body = card.split("---", 2)[2].lstrip()
    assert body.startswith("> **Warning: this run failed its gates (specialized_min).**")
    assert "FAILED: specialized_min" in hub.repos[REPO].head("main").description


@pytest.mark.parametrize(
    "case",
    ["no token", "wrong token", "read-only token", "someone else's repo", "rejected push", "hub unreachable"],
)
def test_publish_failures_are_clear_errors_and_keep_the_bundle(finished, hub, case, monkeypatch, tmp_path, capfd):
    recipe, runs, run_dir = finished
    extra = []
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        code, expect = 2, "no Hugging Face token; set HF_TOKEN"
    elif case == "wrong token":
        monkeypatch.setenv("HF_TOKEN", "hf_notAValidToken")
        code, expect = 2, "the Hub rejected the token (401)"
    elif case == "read-only token":
        monkeypatch.setenv("HF_TOKEN", "hf_readOnly")
        code, expect = 2, "token is read-only"
    elif case == "someone else's repo":
        hub.add_repo("bob/their-model", owner="bob")
        extra = ["--set", "publish.repo=bob/their-model"]
        code, expect = 2, "publish.repo: bob/their-model is under 'bob', which this token's user ('alice') cannot"
    elif case == "rejected push":
        hub.reject_commits = "pre-receive hook declined: repository storage quota exceeded"
        code, expect = 2, "storage quota exceeded"
    else:
        hub.stop()
        code, expect = 3, f"could not reach {hub.url}"
    assert publish(finished, *extra) == code
    out, err = capfd.readouterr()
    assert expect in err, err
    assert "Traceback" not in err
    assert (run_dir / "publish" / "README.md").is_file()  # the bundle stays for the retry
    if case not in ("no token", "hub unreachable"):
        assert "bundle is kept in" in err
    assert "bob/their-model" not in hub.repos or len(hub.repos["bob/their-model"].branches["main"]) == 1
    assert_token_nowhere(recipe.parent, out + err)


def test_publish_needs_a_section_and_a_finished_run(finished, tiny_recipe, hub, tmp_path, capsys):
    assert main(["publish", str(tiny_recipe), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "no publish: section; add `publish: {repo: your-name/tiny-test}`" in capsys.readouterr().err
    args = ["publish", str(tiny_recipe), "--runs-dir", str(tmp_path / "runs"), "--set", "publish.repo=alice/x"]
    assert main(args) == 2
    assert "no finished run" in capsys.readouterr().err


def test_rows_of_the_data_go_to_a_private_repo_and_not_to_a_public_one(finished, hub, capfd):
    recipe, _, run_dir = finished
    inputs = [row["text"] for _, row in read_jsonl(recipe.parent / "test.jsonl")]

    def data_in(files: dict[str, bytes]) -> set[str]:
        texts = [
            content.decode("utf-8", "replace")
            for name, content in files.items()
            if name.endswith((".md", ".json", ".html"))
        ]
        return {text for text in inputs if any(text in content for content in texts)}

    report_path = run_dir / "report" / "report.json"
    original = report_path.read_text()
    report = json.loads(original)
    first = read_jsonl(recipe.parent / "test.jsonl")[0][1]
    flip = {"row": 0, "source": "test.jsonl:1", "input": f"Message: {first['text']}\nIntent:", "versus": "base"}
    report["flipped_rows"] = [{**flip, "expected": first["label"], "other": "x", "specialized": "y", "kind": "won"}]
    # and a wrong answer that quotes its row, among the confusions of the errors by label
    confusion = {"expected": first["label"], "answered": first["text"], "rows": 1}
    report["labels"]["candidates"]["specialized"]["confusions"].insert(0, confusion)
    # and an answer that is not JSON, quoting another row, among the answers' examples
    second = read_jsonl(recipe.parent / "test.jsonl")[1][1]
    example = {"row": 1, "answer": second["text"], "cut_off": False}
    invalid = {"count": 1, "share": 0.04, "cut_off": 0, "rows": [1], "examples": [example]}
    report["answers"]["candidates"]["specialized"]["invalid_json"] = invalid
    report_path.write_text(json.dumps(report))  # a flipped row, whatever the tiny models happened to answer
    try:
        _check_examples_by_privacy(finished, run_dir, data_in, capfd)
    finally:
        report_path.write_text(original)


def _check_examples_by_privacy(finished, run_dir, data_in, capfd):
    assert publish(finished, "--dry-run") == 0  # private (the default): examples included
    private = bundle_files(run_dir)
    report = json.loads(private["report.json"])
    assert report["flipped_rows"] and data_in(private)
    assert read_jsonl(finished[0].parent / "test.jsonl")[1][1]["text"] in data_in(private)  # the answer example
    assert "## Rows that flipped" in private["report.md"].decode()
    card = private["README.md"].decode()
    assert "## Data in this repository" in card and "the first evaluation row's prompt" in card
    capfd.readouterr()

    assert publish(finished, "--dry-run", "--set", "publish.private=false") == 0  # public: no row of the data
    public = bundle_files(run_dir)
    assert data_in(public) == set()
    report = json.loads(public["report.json"])
    assert "flipped_rows" not in report and report["flipped_rows_omitted"] == 1
    assert "## Rows that flipped" not in public["report.md"].decode()
    card = public["README.md"].decode()
    assert "Message: <text>\nIntent:" in card and "No row of the training or evaluation data" in card
    assert "data in the bundle: No row of the training or evaluation data" in capfd.readouterr().err

    assert (
        publish(finished, "--dry-run", "--set", "publish.private=false", "--set", "publish.include_examples=true") == 0
    )
    assert data_in(bundle_files(run_dir)) == data_in(private)  # a public repo with examples, as the recipe says
