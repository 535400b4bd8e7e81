"""Distillation on tiny models: the teacher labels unlabelled inputs once, the student trains on its answers."""

import json

import pytest

from pipeline.cli import main
from pipeline.data import read_jsonl
from pipeline.recipe import load_recipe
from pipeline.stages.distill import answers_file
from pipeline.teacher import AnswerTrie
from tests.conftest import INTENTS

pytestmark = pytest.mark.integration


@pytest.fixture
def distill_recipe(write_recipe, tiny_models, tmp_path):
    """60 training messages without their labels, the gold test set, the tiny reference as teacher."""
    inputs = [{"text": row["text"]} for _, row in read_jsonl(INTENTS / "train.jsonl")][:60]
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    (tmp_path / "test.jsonl").write_text("".join((INTENTS / "test.jsonl").read_text().splitlines(True)[:24]))
    return write_recipe(f"""
        name: distill-test
        model: {{base: {tiny_models["base"]}}}
        data:
          eval: test.jsonl
          prompt: "Message: {{text}}\\nIntent:"
          target: " {{label}}"
          chat_template: never
        distill:
          inputs: inputs.jsonl
          choices: eval_labels
        train: {{epochs: 2, batch_size: 16, lr: 5.0e-3}}
        quantize: []
        evaluate:
          max_new_tokens: 6
          batch_size: 8
          bootstrap_samples: 200
          latency_rows: 2
          reference: {{model: {tiny_models["reference"]}}}
    """)


def _run_dir(recipe, runs, overrides=()):
    return runs / "distill-test" / load_recipe(recipe, list(overrides)).run_id


def test_teacher_labels_the_inputs_and_the_student_trains_on_them(distill_recipe, tmp_path):
    runs = tmp_path / "runs"
    assert main(["run", str(distill_recipe), "--runs-dir", str(runs)]) == 0
    run_dir = _run_dir(distill_recipe, runs)
    labels = {row["label"] for _, row in read_jsonl(tmp_path / "test.jsonl")}
    labelled = [row for _, row in read_jsonl(run_dir / "distill" / "labelled.jsonl")]
    assert len(labelled) == 60 and all(row["label"] in labels for row in labelled)  # only members of the set
    answers = [json.loads(line) for line in answers_file(run_dir).read_text().splitlines()]
    assert len(answers) == 60 and all(0 < a["confidence"] <= 1 for a in answers)
    train = json.loads((run_dir / "train" / "result.json").read_text())
    assert train["rows"] == 60  # no gold rows: the student learned from the teacher alone
    report = json.loads((run_dir / "report" / "report.json").read_text())
    distilled = report["distillation"]
    assert (distilled["labelled_rows"], distilled["dropped_rows"], distilled["gold_rows"]) == (60, 0, 0)
    assert distilled["teacher_seconds"] > 0 and 0 <= distilled["agreement_with_teacher"] <= 1
    assert distilled["teacher_gold_agreement"] is None  # the inputs carry no labels
    assert "## Distillation" in (run_dir / "report" / "report.md").read_text()


def test_a_killed_labelling_continues_and_a_changed_prompt_relabels(distill_recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["distill", str(distill_recipe), "--runs-dir", str(runs)]) == 0
    answers = answers_file(_run_dir(distill_recipe, runs))
    complete = answers.read_text().splitlines()
    answers.write_text("\n".join(complete[:10]) + "\n" + complete[10][:15])  # killed while writing answer 11
    capsys.readouterr()
    assert main(["distill", str(distill_recipe), "--runs-dir", str(runs)]) == 0
    assert "50 of 60 inputs to label (10 cached)" in capsys.readouterr().err
    assert answers.read_text().splitlines()[:10] == complete[:10] and len(answers.read_text().splitlines()) == 60

    changed = ["evaluate.reference.prompt=The customer wrote {text} and the intent is"]
    assert main(["distill", str(distill_recipe), "--runs-dir", str(runs), "--set", changed[0]]) == 0
    assert "60 of 60 inputs to label (0 cached)" in capsys.readouterr().err


def test_the_confidence_filter_drops_and_counts(distill_recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    overrides = ["distill.min_confidence=0.5"]
    assert main(["distill", str(distill_recipe), "--runs-dir", str(runs), "--set", overrides[0]]) == 0
    run_dir = _run_dir(distill_recipe, runs, overrides)
    result = json.loads((run_dir / "distill" / "result.json").read_text())
    answers = [json.loads(line) for line in answers_file(run_dir).read_text().splitlines()]
    below = sum(a["confidence"] < 0.5 for a in answers)
    assert 0 < below < 60 and result["dropped"] == below and result["labelled"] == 60 - below
    assert len((run_dir / "distill" / "labelled.jsonl").read_text().splitlines()) == 60 - below
    # another threshold is another run folder, but the teacher's answers are reused, not asked again
    capsys.readouterr()
    assert main(["distill", str(distill_recipe), "--runs-dir", str(runs), "--set", "distill.min_confidence=0.3"]) == 0
    assert "0 of 60 inputs to label (60 cached)" in capsys.readouterr().err


def test_answer_trie_allows_only_continuations_of_an_answer():
    trie = AnswerTrie([[5, 6, 2], [5, 7, 2], [8, 2]], finished=[0, 2])
    assert sorted(trie.allowed([])) == [5, 8]
    assert sorted(trie.allowed([5])) == [6, 7]
    assert trie.allowed([5, 6]) == [2]
    assert trie.allowed([5, 6, 2, 0]) == [0, 2]  # after the end token: padding only


def test_inspect_shows_the_teachers_answers_as_trained_tokens(distill_recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["inspect", str(distill_recipe), "--runs-dir", str(runs)]) == 2  # nothing labelled yet
    assert "run the distill stage first" in capsys.readouterr().err
    assert main(["distill", str(distill_recipe), "--runs-dir", str(runs)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(distill_recipe), "--runs-dir", str(runs), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    first = json.loads((_run_dir(distill_recipe, runs) / "distill" / "labelled.jsonl").read_text().splitlines()[0])
    assert out.startswith("60 training rows") and f"[[ {first['label']}<eos>]]" in out


def test_gold_labels_in_the_inputs_are_replaced_by_the_teachers_and_scored(distill_recipe, tmp_path):
    labelled_inputs = [row for _, row in read_jsonl(INTENTS / "train.jsonl")][:60]
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled_inputs))
    runs = tmp_path / "runs"
    assert main(["distill", str(distill_recipe), "--runs-dir", str(runs)]) == 0
    run_dir = _run_dir(distill_recipe, runs)
    result = json.loads((run_dir / "distill" / "result.json").read_text())
    answers = {json.loads(line)["prediction"] for line in answers_file(run_dir).read_text().splitlines()}
    labelled = [row for _, row in read_jsonl(run_dir / "distill" / "labelled.jsonl")]
    assert {row["label"] for row in labelled} <= answers  # the teacher's answers, not the gold ones
    same = sum(row["label"] == gold["label"] for row, gold in zip(labelled, labelled_inputs, strict=True))
    assert result["gold_answers"] == 60 and result["teacher_gold_agreement"] == same / 60
    assert result["kept_gold_agreement"] == same / 60  # no filter: every row kept


def test_a_conversation_gets_the_teachers_answer_as_its_last_assistant_turn():
    from pipeline.teacher import UNLABELLED, blank_answer, filled_answer

    asked = [{"role": "user", "content": "where is my parcel?"}]
    answered = [*asked, {"role": "assistant", "content": "gold answer"}]
    blank = {"role": "assistant", "content": UNLABELLED}  # the gold answer gone; never part of the teacher's prompt
    assert blank_answer("messages", answered, "f:1", "messages") == [*asked, blank]
    assert blank_answer("messages", asked, "f:1", "messages")[-1] == blank
    assert filled_answer("messages", answered, "track_order") == [
        *asked,
        {"role": "assistant", "content": "track_order"},
    ]


def test_gold_rows_and_the_teachers_rows_train_together_and_are_counted(distill_recipe, tmp_path):
    gold = [row for _, row in read_jsonl(INTENTS / "train.jsonl")][100:124]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gold))
    runs = tmp_path / "runs"
    overrides = [f"data.train={tmp_path / 'gold.jsonl'}", "quantize=[]"]
    args = ["run", str(distill_recipe), "--runs-dir", str(runs)]
    assert main([*args, "--set", overrides[0], "--set", overrides[1]]) == 0
    run_dir = _run_dir(distill_recipe, runs, overrides)
    assert json.loads((run_dir / "train" / "result.json").read_text())["rows"] == 24 + 60
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert (report["distillation"]["gold_rows"], report["distillation"]["labelled_rows"]) == (24, 60)
