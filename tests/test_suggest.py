"""`specialist suggest`: the unlabelled inputs most worth labelling next, ranked as it says and spread out."""

import json

import pytest

from pipeline.cli import main
from pipeline.data import read_jsonl
from pipeline.recipe import load_recipe
from pipeline.suggest import _spread
from tests.conftest import INTENTS
from tests.test_synthesize import TeacherAPI

pytestmark = pytest.mark.integration


def test_suggest_ranks_disagreements_then_doubt_and_leaves_out_labelled_inputs(
    write_recipe, tiny_models, intents_rows, tmp_path, capsys
):
    train, test = intents_rows
    eval_text = next(row for _, row in read_jsonl(test))["text"]
    pool = [{"text": row["text"]} for _, row in read_jsonl(INTENTS / "train.jsonl")][200:240]
    pool += [{"text": eval_text}, {"text": pool[0]["text"].upper()}]  # an eval row, and an input asked twice
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    api = TeacherAPI(seed_copy="", eval_copy="")
    try:
        recipe = write_recipe(f"""
            name: suggest-test
            model: {{base: {tiny_models["base"]}}}
            data:
              train: {train}
              eval: {test}
              prompt: "Message: {{text}}\\nIntent:"
              target: " {{label}}"
              chat_template: never
            train: {{epochs: 1, batch_size: 16, lr: 5.0e-3}}
            evaluate:
              max_new_tokens: 6
              batch_size: 8
              reference:
                model: teacher
                prompt: "Message: {{text}}\\nIntent:"
                endpoint: {{base_url: {api.base_url}, max_retries: 0}}
        """)
        runs = tmp_path / "runs"
        assert main(["train", str(recipe), "--runs-dir", str(runs)]) == 0
        out = tmp_path / "next.jsonl"
        command = ["suggest", str(recipe), "--runs-dir", str(runs), "--inputs", str(tmp_path / "pool.jsonl")]
        assert main([*command, "--k", "8", "--out", str(out), "--near", "1"]) == 0
        assert "8 of 40 inputs to label next" in capsys.readouterr().out  # the eval row and the repeat left out
        rows = [row for _, row in read_jsonl(out)]
        assert len(rows) == 8 and len({r["text"].lower() for r in rows}) == 8
        assert all(r["label"] is None and r["text"] != eval_text for r in rows)  # ready to be labelled
        facts = [r["_suggested"] for r in rows]
        assert [f["rank"] for f in facts] == list(range(1, 9))
        # in turn across the teacher's labels: the first row of each label before any label's second
        labels = [f["teacher"] for f in facts]
        firsts = list(dict.fromkeys(labels))
        assert labels[: len(firsts)] == firsts
        for label in firsts:  # within a label: the disagreeing rows first, each kind least confident first
            mine = [f for f in facts if f["teacher"] == label]
            disagree = [f["teacher"] != f["specialist"] for f in mine]
            assert disagree == sorted(disagree, reverse=True)
            for kind in (True, False):
                confidences = [f["confidence"] for f, d in zip(mine, disagree, strict=True) if d is kind]
                assert confidences == sorted(confidences)
        asked = len(api.requests)
        assert main([*command, "--k", "3", "--out", str(tmp_path / "three.jsonl"), "--near", "1"]) == 0
        assert len(api.requests) == asked  # the teacher's answers and the specialist's are cached
        assert [r["text"] for _, r in read_jsonl(tmp_path / "three.jsonl")] == [r["text"] for r in rows[:3]]
    finally:
        api.close()
    assert load_recipe(recipe).recipe.evaluate.reference.model == "teacher"


def test_picks_go_in_turn_across_labels():
    from pipeline.suggest import _in_turn

    assert _in_turn([4, 0, 1, 3, 2], ["a", "b", "a", "b", "a"]) == [4, 1, 0, 3, 2]


def test_suggestions_are_spread_no_near_copies():
    texts = ["where is my parcel?", "where is my parcel please?", "I forgot my password", "cancel my order"]
    assert _spread(texts, [0, 1, 2, 3], 3, 0.85) == [0, 2, 3]
    assert _spread(texts, [1, 0, 3, 2], 2, 1.0) == [1, 0]  # near 1: no spreading
