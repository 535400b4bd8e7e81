"""Rows as people really write them: empty and non-text values, BOMs, CRLF, wrong delimiters and
extensions, and samples that represent a file sorted by label."""

import json

import pytest

from pipeline import data
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.recipe import DataSection

LABELS = [f"label_{i}" for i in range(10)]


def section(tmp_path, train, eval_=None, **extra) -> DataSection:
    return DataSection(
        train=str(train),
        eval=str(eval_ or train),
        prompt="Q: {text}\nA:",
        target=" {label}",
        **({"overlap": "warn", "validation": 0} | extra),  # eval is train here: no rows would be left to hold out
    )


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("value", [None, "", "   ", "\t\n"])
def test_an_empty_field_is_an_error_naming_file_line_and_column(tmp_path, value):
    path = tmp_path / "rows.jsonl"
    jsonl(path, [{"text": "hello", "label": "a"}, {"text": value, "label": "b"}])
    with pytest.raises(PipelineError) as e:
        data.load_splits(section(tmp_path, path))
    assert str(e.value).startswith(f"{path}:2: column 'text' is empty")
    assert "data.empty_rows: drop" in str(e.value)


def test_empty_rows_can_be_dropped_and_are_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": f"t{i}", "label": "a"} for i in range(6)] + [{"text": None, "label": "b"}, {"text": "x"}]
    rows[-1]["label"] = "  "
    jsonl(path, rows)
    splits = data.load_splits(section(tmp_path, path, empty_rows="drop"))
    assert len(splits.train) == 6 and all(row.target == " a" for row in splits.train)
    assert splits.dropped_empty["train"] == [f"{path}:7 (text)", f"{path}:8 (label)"]


def test_numbers_booleans_lists_and_objects_are_text_as_json_spells_them(tmp_path):
    path = tmp_path / "rows.jsonl"
    target = {"intent": "alarm_set", "slots": {"time": "nine am", "date": ["today", "tomorrow"]}, "ok": True}
    jsonl(path, [{"text": 12.5, "label": 3}, {"text": True, "label": False}, {"text": ["a", "é"], "label": target}])
    rows = data.load_splits(section(tmp_path, path)).train
    assert [(r.prompt, r.target) for r in rows] == [
        ("Q: 12.5\nA:", " 3"),
        ("Q: true\nA:", " false"),
        (
            'Q: ["a", "é"]\nA:',
            ' {"intent": "alarm_set", "slots": {"time": "nine am", "date": ["today", "tomorrow"]}, "ok": true}',
        ),
    ]  # an object keeps the file's key order, so the model learns the order the user wrote


def test_an_empty_conversation_turn_and_alpaca_output_are_errors(tmp_path):
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]
    jsonl(path, [{"messages": turns}])
    chat = DataSection(train=str(path), eval=str(path), format="messages", overlap="warn")
    with pytest.raises(PipelineError, match=r"chat.jsonl:1: column 'messages\[1\].content' is empty"):
        data.load_splits(chat)
    path = tmp_path / "alpaca.jsonl"
    jsonl(path, [{"instruction": "Say hi", "input": None, "output": "hi"}, {"instruction": "x", "output": None}])
    alpaca = DataSection(train=str(path), eval=str(path), format="alpaca", overlap="warn")
    with pytest.raises(PipelineError, match=r"alpaca.jsonl:2: column 'output' is empty"):
        data.load_splits(alpaca)


def test_files_as_excel_and_windows_write_them(tmp_path):
    """A byte-order mark, CRLF line ends, blank lines, no newline at the end: read as meant."""
    rows = [{"text": "hello", "label": "a"}, {"text": "line\u2028separator inside", "label": "b"}]
    jsonl_path = tmp_path / "rows.jsonl"
    body = "\r\n\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    jsonl_path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    csv_path = tmp_path / "rows.csv"
    csv_path.write_bytes(
        b'\xef\xbb\xbftext,label\r\nhello,a\r\n\r\n"line\u2028separator inside",b'.replace(
            "\u2028".encode("unicode_escape"), "\u2028".encode()
        )
    )
    tsv_path = tmp_path / "rows.tsv"
    tsv_path.write_text("text\tlabel\nhello\ta\nline\u2028separator inside\tb\n")
    for path in (jsonl_path, csv_path, tsv_path):
        got = [(r.prompt, r.target) for r in data.load_splits(section(tmp_path, path)).train]
        assert got == [("Q: hello\nA:", " a"), ("Q: line\u2028separator inside\nA:", " b")], path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("rows.csv", b"text;label\nhello;a\n", "rows.csv:1: the header is semicolon-separated, not CSV"),
        (
            "rows.csv",
            b"text\tlabel\nhello\ta\n",
            "rows.csv:1: the header is tab-separated, not CSV; name the file .tsv",
        ),
        ("rows.csv", b'{"text": "hello", "label": "a"}\n', "looks like JSON, not a table; name the file .jsonl"),
        ("rows.csv", b"PK\x03\x04\x14\x00\x06\x00", "rows.csv: this is a zip archive (an Excel .xlsx workbook?)"),
        ("rows.csv", b"text,label\nh\xe9llo,a\n", "rows.csv:2: not UTF-8 text"),
        ("rows.jsonl", b'[{"text": "hello", "label": "a"}]\n', "a JSON array of objects goes in a .json file"),
        ("rows.jsonl", b"text,label\nhello,a\n", "it looks like a table with a header row: name the file .csv"),
        ("rows.json", b'{"text": "a", "label": "a"}\n{"text": "b", "label": "b"}\n', "name the file .jsonl"),
        ("rows.parquet", b"text,label\n", "rows.parquet: not a Parquet file"),
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PipelineError) as e:
        data.load_splits(section(tmp_path, path))
    assert message in str(e.value)


def _sorted_by_label(tmp_path, per_label=30):
    """Like banking77's files: every row of one label, then the next."""
    rows = [{"text": f"{label} message {i}", "label": label} for label in LABELS for i in range(per_label)]
    return jsonl(tmp_path / "sorted.jsonl", rows)


def test_max_rows_draw_a_seeded_sample_stratified_by_label(tmp_path):
    path = _sorted_by_label(tmp_path)
    first_n = [f" {LABELS[0]}"] * 20  # what taking the first rows would give
    splits = data.load_splits(section(tmp_path, path, max_train_rows=20, max_eval_rows=40))
    targets = [row.target for row in splits.train]
    assert targets != first_n
    assert sorted(set(targets)) == [f" {label}" for label in LABELS] and len(targets) == 20
    assert all(targets.count(f" {label}") == 2 for label in LABELS)  # each label's share, as in the file
    assert all(targets.count(f" {label}") == 4 for label in LABELS for targets in [[r.target for r in splits.eval]])
    again = data.load_splits(section(tmp_path, path, max_train_rows=20, max_eval_rows=40))
    assert [r.prompt for r in again.train] == [r.prompt for r in splits.train]  # seeded
    other = data.load_splits(section(tmp_path, path, max_train_rows=20, split_seed=1))
    assert [r.prompt for r in other.train] != [r.prompt for r in splits.train]
    fewer = data.load_splits(section(tmp_path, path, max_train_rows=5))
    assert len(fewer.train) == 5 and len({r.target for r in fewer.train}) == 5  # fewer rows than labels


def test_free_text_targets_are_sampled_at_random(tmp_path):
    rows = [{"text": f"question {i}", "label": f"answer number {i}"} for i in range(100)]
    splits = data.load_splits(section(tmp_path, jsonl(tmp_path / "qa.jsonl", rows), max_train_rows=10))
    indices = [int(r.prompt.split()[2].rstrip("\nA:")) for r in splits.train]
    assert len(indices) == 10 and indices == sorted(indices) and indices != list(range(10))


def test_validate_says_what_was_sampled_and_which_eval_labels_training_lacks(
    write_recipe, tiny_models, tmp_path, capsys
):
    train = _sorted_by_label(tmp_path)
    eval_rows = [{"text": f"new {label}", "label": label} for label in [*LABELS, "label_new", "label_other"]]
    recipe = write_recipe(f"""
        name: sampled
        model: {{base: {tiny_models["base"]}}}
        data:
          train: {train}
          eval: {jsonl(tmp_path / "eval.jsonl", eval_rows * 3)}
          prompt: "Q: {{text}}\\nA:"
          target: " {{label}}"
          max_train_rows: 50
    """)
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    # the validation rows (30, the default tenth of the file) are held out first, then the sample is drawn
    assert (
        "train: a seeded sample of 50 of 270 rows left after the validation rows, stratified by target "
        "(data.max_train_rows, split_seed 0)"
    ) in out
    assert "targets: 10 distinct in train, 12 in eval" in out
    assert "2 eval targets never occur in training (6 eval rows): ' label_new', ' label_other'" in out


def test_an_eval_row_past_the_models_context_is_refused_by_validate_and_run(
    write_recipe, tiny_models, intents_rows, tmp_path, capsys
):
    train, test = intents_rows
    long_eval = tmp_path / "long.jsonl"
    long_eval.write_text(
        test.read_text() + json.dumps({"text": "please cancel my order now " * 300, "label": "cancel_order"}) + "\n"
    )
    recipe = write_recipe(f"""
        name: long-row
        model: {{base: {tiny_models["base"]}}}
        data: {{train: {train}, eval: {long_eval}, prompt: "Message: {{text}}\\nIntent:", target: " {{label}}",
                chat_template: never}}
        quantize: []
        evaluate: {{gates: {{quantized_max_drop: null}}}}
    """)
    # the tiny base's context is 512 tokens: the row would be answered past it (garbage) or crash a model
    expected = f"data.eval: 1 eval rows do not fit {tiny_models['base']}'s context of 512 tokens"
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert expected in err and f"{long_eval}:25" in err and "Traceback" not in err
    assert main(["run", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert expected in capsys.readouterr().err
